"""Whole-network training steps (issue 3): torchvision MobileNetV2 and ResNet18, batch 256, 224×224, bf16
autocast, channels_last, SGD — FP eager, LSQ W4A4 compiled, DDQ W4A4 eager, DDQ W4A4 compiled, and DDQ W4A4
compiled with CUDA graphs (mode="reduce-overhead") (first and last layers at 8 bits, `ddq.quantize_model`'s
default policy). Records CUDA-event median ms per step, img/s
and peak memory per step; benchmarks/print_ratios.py prints them against FP of the same run.

Run on a GPU: pytest benchmarks/bench_models.py --benchmark-only --benchmark-json=FILE [-k mobilenet_v2].
Compiling a quantized network takes minutes: select with -k where a call's time is short. CUDNN_BENCHMARK=1
sets torch.backends.cudnn.benchmark for every variant (cuDNN times its algorithms per shape, as
torchvision's reference training does); the default leaves PyTorch's default (heuristic choice).
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cuda_timing import record

BATCH = 256
IMAGE = 224
MODELS = ("mobilenet_v2", "resnet18")
VARIANTS = ("fp", "lsq_compiled", "ddq_eager", "ddq_compiled", "ddq_cudagraphs")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch of images (channels_last, on the GPU) and labels."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, device="cuda").to(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (BATCH,), device="cuda")


def build_model(name: str, variant: str, x: torch.Tensor) -> nn.Module:
    """The network in channels_last on x's device, quantized as `variant` says and initialised on x."""
    import torchvision

    import ddq

    model = getattr(torchvision.models, name)(num_classes=1000).to(x.device, memory_format=torch.channels_last)
    if variant != "fp":
        model = ddq.quantize_model(model, weight_bits=4, act_bits=4, method=variant.split("_")[0])
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            ddq.initialize_quantizers(model, x)
    return model


def training_step(model: nn.Module, variant: str, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One SGD step under bf16 autocast (the optimizer sees every trainable parameter). `*_compiled` compiles
    the model (forward and backward) with torch.compile's default mode; `*_cudagraphs` with
    mode="reduce-overhead", which replays each compiled graph as one CUDA graph (no per-kernel launch cost)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    if variant.endswith("compiled"):
        forward = torch.compile(model)
    elif variant.endswith("cudagraphs"):
        forward = torch.compile(model, mode="reduce-overhead")
    else:
        forward = model

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peak_bytes(step: Callable[[], None]) -> int:
    """Peak allocated memory over one step, weights and optimizer state included (measured after warm-up)."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_training_step(benchmark, model_name, variant):
    torch.backends.cudnn.benchmark = os.environ.get("CUDNN_BENCHMARK", "0") == "1"
    x, labels = batch()
    model = build_model(model_name, variant, x)
    step = training_step(model, variant, x, labels)
    peak = peak_bytes(step)
    median_ms = record(benchmark, step, model=model_name, variant=variant, batch=BATCH, image=IMAGE,
                       cudnn_benchmark=torch.backends.cudnn.benchmark)
    benchmark.extra_info.update(img_per_s=BATCH / (median_ms / 1e3), peak_gib=peak / 2**30)
