"""GPU time of the activation's backward element pass (docs/kernels.md, run 9): the SHARED pass
(`shared_histogram.reductions_shared`) on a ReLU and a spread-out bf16 x of 401408×576, per channel on a
4096×4096 weight and on a float32 x (which keeps the float bins), and the CUDA C backward-input GEMM with the
reductions in its epilogue (`linear_backward_input_cuda`) on the four CNN shapes, with one and two load
buffers where the checkout has them, and where it has the pass with ∂W_q fused in (N ≤ 64 until run 12, N ≤ 256 since), that pass
against the backward-input and backward-weight CUDA C GEMMs one after the other.

Usage on a CUDA machine: python benchmarks/probe_backward_input.py [--root DIR]. `--root` imports
`ddq_kernels` from another checkout (e.g. `git worktree add /tmp/before 8e5e9f5` for the kernels before the
integer bins), so that two versions are timed on one card; it prints one JSON line of medians in ms.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

from bench_linear import gemm_operands

CNN_SHAPES = [(401408, 576, 64), (100352, 32, 192), (100352, 192, 32), (25088, 1024, 256)]


def shared_pass_cases(reductions_shared, median_ms) -> dict[str, float]:
    def run(x, v, lo, hi):
        grad_x = torch.empty_like(x)
        histogram = torch.zeros(lo.shape[0], 256, device="cuda")
        sums = torch.zeros(lo.shape[0], 2, device="cuda")
        reductions_shared(v, x, lo, hi, grad_x, histogram, sums)

    torch.manual_seed(0)
    relu = torch.randn(401408, 576, device="cuda", dtype=torch.bfloat16).relu()
    spread = torch.randn_like(relu)
    v = torch.randn_like(relu)
    zero, three, minus_three = (torch.full((1,), value, device="cuda") for value in (0.0, 3.0, -3.0))
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    weight_v = torch.randn_like(weight)
    alpha = weight.float().abs().amax(1)
    minus_alpha = -alpha
    x32 = torch.randn(8192, 4096, device="cuda")
    v32 = torch.randn_like(x32)
    return {
        "shared_relu_401408x576": median_ms(lambda: run(relu, v, zero, three)),
        "shared_spread_401408x576": median_ms(lambda: run(spread, v, minus_three, three)),
        "shared_per_channel_4096x4096": median_ms(lambda: run(weight, weight_v, minus_alpha, alpha)),
        "shared_float32_8192x4096": median_ms(lambda: run(x32, v32, minus_three, three)),
    }


def fused_cases(linear_backward_input_shared, median_ms) -> dict[str, float]:
    has_stages = "stages" in inspect.signature(linear_backward_input_shared).parameters
    times = {}
    for M, K, N in CNN_SHAPES:
        x, w_q, grad_y, zero, three = gemm_operands(M, K, N)
        for stages in (1, 2) if has_stages else (None,):
            extra = {} if stages is None else {"stages": stages}
            name = f"fused_{M}x{K}x{N}" + ("" if stages is None else f"_stages{stages}")
            times[name] = median_ms(lambda: linear_backward_input_shared(grad_y, w_q, x, zero, three, **extra), rep_ms=1000)
    return times


def fused_weight_gradient_cases(median_ms) -> dict[str, float]:
    """The backward pass with ∂W_q fused in, against the two CUDA C GEMMs run one after the other."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward_input_cuda import linear_backward_input_shared, linear_backward_shared
    from ddq_kernels.linear_backward_input_cuda import supports
    from ddq_kernels.linear_backward_weight_cuda import linear_backward_weight_cuda

    logits = torch.tensor([1.0] * 4 + [-1.0] * 4, device="cuda")
    times = {}
    for M, K, N in CNN_SHAPES:
        x, w_q, grad_y, zero, three = gemm_operands(M, K, N)
        table = level_table(zero, three, torch.zeros(1, 256, device="cuda"), logits, 2)
        if not supports(grad_y, w_q, x):
            continue

        def separate():
            linear_backward_input_shared(grad_y, w_q, x, zero, three)
            linear_backward_weight_cuda(grad_y, x, zero, three, table, logits, 2)

        times[f"separate_{M}x{K}x{N}"] = median_ms(separate, rep_ms=1000)
        times[f"fused_weight_{M}x{K}x{N}"] = median_ms(
            lambda: linear_backward_shared(grad_y, w_q, x, zero, three, table, logits, 2), rep_ms=1000)
        # A sparse x (95 % zeros: a tenth of a ReLU output), where most warps' 32 elements all lie in the cell of
        # 0, which the pass sums in a register: a change to that path (branch-free adds) is timed on both x.
        sparse = x * (torch.rand_like(x, dtype=torch.float32) < 0.1).to(x.dtype)
        times[f"fused_weight_sparse_{M}x{K}x{N}"] = median_ms(
            lambda: linear_backward_shared(grad_y, w_q, sparse, zero, three, table, logits, 2), rep_ms=1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="a checkout whose ddq_kernels to time")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    sys.path.insert(0, str((args.root or here.parent).resolve()))
    from cuda_timing import cuda_median_ms
    from ddq_kernels.linear_backward_input_cuda import linear_backward_input_shared
    from ddq_kernels.shared_histogram import reductions_shared

    times = {"kernels_from": str(Path(inspect.getfile(reductions_shared)).parent)}
    times.update(shared_pass_cases(reductions_shared, cuda_median_ms))
    times.update(fused_cases(linear_backward_input_shared, cuda_median_ms))
    if hasattr(sys.modules[linear_backward_input_shared.__module__], "linear_backward_shared"):
        times.update(fused_weight_gradient_cases(cuda_median_ms))
    print(json.dumps({k: round(t, 4) if isinstance(t, float) else t for k, t in times.items()}))


if __name__ == "__main__":
    main()
