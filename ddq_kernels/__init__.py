"""Triton kernels of the ddq project (see each module for the spec section it implements)."""
