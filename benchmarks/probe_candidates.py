"""Every candidate that `fastest_config` weighs for the DDQLinear GEMMs, timed two ways on one card
(docs/kernels.md, run 10): by launches, as `fastest_config` timed them before run 10 (do_bench, L2 flushed,
one launch per event pair, so host launch cost shows on small shapes), and by GPU time, as it times them
now (`launch.graph_times`: CUDA-graph replays, as a network under CUDA graphs runs them). Prints one JSON
line per (shape, op, candidate) and the pick.

Usage on a CUDA machine: python benchmarks/probe_candidates.py [--op NAME] [M K N ...]  (default: the issue's
shapes, all ops: forward, backward_input, backward_weight, backward_activation, and weight_reductions where
the fused backward pass runs)
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from bench_linear import SHAPES, gemm_operands
from ddq_kernels.launch import graph_times


def operations(M: int, K: int, N: int):
    """The ops of one shape, [(op name, candidates, run(config))] (run(None) lets `fastest_config`
    pick), and the cache its picks go into."""
    from ddq_kernels.launch import _FASTEST
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward import backward_activation_configs, linear_backward_activation
    from ddq_kernels.linear_backward_input import backward_input_configs, linear_backward_input
    from ddq_kernels.linear_backward_input_cuda import supports
    from ddq_kernels.linear_backward_weight import backward_weight_configs, linear_backward_weight
    from ddq_kernels.linear_backward_weight_cuda import supports as weight_supports
    from ddq_kernels.linear_forward import forward_configs, linear_forward
    from ddq_kernels.linear_forward_cuda import supports as forward_supports
    from ddq_kernels.linear_forward_wgmma import supports as wgmma_supports

    x, w_q, grad_y, lo, hi = gemm_operands(M, K, N)
    logits = torch.tensor([3.0] * 4 + [-3.0] * 4, device="cuda")
    table = level_table(lo, hi, torch.zeros(1, 256, device="cuda"), logits, 2)
    ops = [
        ("forward", forward_configs(M, N, K, forward_supports(x, w_q), wgmma_supports(x, w_q)),
         lambda c: linear_forward(x, w_q, None, lo, hi, table, logits, 2, c)),
        ("backward_input", backward_input_configs(M, N, K, supports(grad_y, w_q, x)),
         lambda c: linear_backward_input(grad_y, w_q, x, lo, hi, c)),
        ("backward_weight", backward_weight_configs(M, N, K, weight_supports(grad_y, x)),
         lambda c: linear_backward_weight(grad_y, x, lo, hi, table, logits, 2, config=c)),
        ("backward_activation", backward_activation_configs(grad_y, w_q, x),
         lambda c: linear_backward_activation(grad_y, w_q, x, lo, hi, table, logits, 2, c)),
    ]
    if supports(grad_y, w_q, x):
        ops.append(weight_reductions_op(x, w_q, grad_y, lo, hi, table, logits))
    return ops, _FASTEST


def weight_reductions_op(x, w_q, grad_y, lo, hi, table, logits):
    """The weight quantizer's pass over the fused backward's partial sums of ∂W_q (W_q stands in for the weight)."""
    from ddq_kernels.linear_backward_input_cuda import linear_backward_shared_parts
    from ddq_kernels.weight_reductions import SUM_THEN_REDUCE, SUMMED_CONFIGS, weight_reductions

    parts = linear_backward_shared_parts(grad_y, w_q, x, lo, hi, table, logits, 2)[-1]
    top = w_q.float().abs().amax(dim=1) + 1e-3
    return ("weight_reductions", SUMMED_CONFIGS + (SUM_THEN_REDUCE,),
            lambda c: weight_reductions(parts, w_q, -top, top, c))


def main(shapes, only: str | None = None) -> None:
    print(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for M, K, N in shapes:
        ops, cache = operations(M, K, N)
        for name, candidates, run in ops:
            if only is not None and name != only:
                continue
            for config in candidates:
                try:
                    run(config)
                    row = {"bench_ms": do_bench(lambda: run(config), warmup=5, rep=50, return_mode="median"),
                           "graph_ms": graph_times([config], run)[0]}
                except Exception as error:  # a tile too large for the card: report it and go on
                    row = {"error": type(error).__name__}
                print(json.dumps({"shape": [M, K, N], "op": name, "config": config, **row}), flush=True)
            before = set(cache)
            run(None)
            chosen = {repr(key): value for key, value in cache.items() if key not in before}
            print(json.dumps({"shape": [M, K, N], "op": name, "picked": chosen}, default=str), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("forward", "backward_input", "backward_weight", "backward_activation",
                                         "weight_reductions"))
    parser.add_argument("sizes", nargs="*", type=int, help="M K N, repeated")
    args = parser.parse_args()
    numbers = args.sizes
    main([tuple(numbers[i:i + 3]) for i in range(0, len(numbers), 3)] if numbers else SHAPES, args.op)
