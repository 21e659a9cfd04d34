"""Experiments at GPU scale on real data (CIFAR-10: `python -m ddq.experiments.cifar10`)."""
