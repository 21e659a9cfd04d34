"""Quantize-and-matmul speed (issue 3): cuBLAS bf16, LSQ W4A4 (eager, compiled) and DDQ, forward and
forward+backward, CUDA-event medians. Run: pytest benchmarks --benchmark-only --benchmark-json=FILE;
benchmarks/print_ratios.py FILE prints the ratio table. Shapes are M×K×N with x (M, K), w (N, K).

Variants beyond the issue's four, for the evidence in docs/kernels.md:
- ddq_kernels: the Triton kernels alone (no quantizer-parameter table math, no autograd);
- ddq_unfused: quantize kernels around cuBLAS (x_q materialised, separate reduction pass);
- ddq_cudagraphs: the DDQ layer under torch.compile(mode="reduce-overhead"), replayed as CUDA graphs
  (the mode that brought whole networks to FP speed, docs/kernels.md);
- cublas_graph, ddq_graph: the whole eager step (forward, or forward and backward) captured in one CUDA
  graph and replayed: GPU time alone, with no launch cost, as in a network captured whole. On the small
  shapes every eager variant, cuBLAS included, waits on the host; these compare the GPU work;
- ddq_compiled_graph, lsq_compiled_graph: the layer under torch.compile (Inductor fuses the quantizers'
  parameter math around the ops), its whole step captured the same way: the GPU work of a network
  compiled and replayed as CUDA graphs, the mode bench_models measures;
- ddq_compiled_combo_graph: the same with Inductor's horizontal fusion (`combo_kernels`), which put the
  activation's and the weight's range math (two small kernels in the forward, two in the backward on the
  small shapes, docs/kernels.md run 14) into one launch each; since run 23 the op computes the ranges in its
  own kernels, so there is nothing of DDQ's left for it to merge.
"""

from __future__ import annotations

import pytest
import torch

from cuda_timing import captured, record

SHAPES = [(8192, 4096, 4096), (401408, 576, 64), (100352, 32, 192), (100352, 192, 32), (25088, 1024, 256)]
VARIANTS = ("cublas", "lsq_eager", "lsq_compiled", "ddq", "ddq_kernels", "ddq_unfused", "ddq_cudagraphs",
            "cublas_graph", "ddq_graph", "ddq_compiled_graph", "lsq_compiled_graph", "ddq_compiled_combo_graph")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_layer(method: str, K: int, N: int, weight: torch.Tensor, x: torch.Tensor):
    from ddq.nn import DDQLinear

    layer = DDQLinear(K, N, bias=False, weight_bits=4, act_bits=4, method=method).cuda().to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer(x)  # initialises the quantizers from this batch
    return layer


def layer_step(layer, x, grad_y, backward: bool):
    if not backward:
        with torch.no_grad():
            return layer(x)
    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    return torch.autograd.grad(y, [x, *params], grad_y)


def kernel_steps(layer, x, grad_y, fused: bool):
    """The DDQ kernels called directly, fused (Triton GEMMs) or around cuBLAS (quantize passes)."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward import linear_backward_activation
    from ddq_kernels.linear_forward import linear_forward
    from ddq_kernels.quantize import quantize
    from ddq_kernels.quantize_backward import quantize_reductions

    aq, wq_ = layer.input_quantizer, layer.weight_quantizer
    with torch.no_grad():
        a_lo, a_hi = (t.detach().contiguous() for t in aq.range())
        w_lo, w_hi = (t.detach().contiguous() for t in wq_.range())
    a_res, a_log = aq.residuals.detach(), aq.gate_logits.detach()
    w_res, w_log = wq_.residuals.detach(), wq_.gate_logits.detach()
    w = layer.weight.detach()
    x = x.detach()

    def forward():
        w_q = quantize(w, w_lo, w_hi, w_res, w_log, wq_.min_bits)
        if fused:
            table = level_table(a_lo, a_hi, a_res, a_log, aq.min_bits)
            return linear_forward(x, w_q, None, a_lo, a_hi, table, a_log, aq.min_bits), w_q
        return quantize(x, a_lo, a_hi, a_res, a_log, aq.min_bits) @ w_q.t(), w_q

    def forward_backward():
        _, w_q = forward()
        if fused:
            table = level_table(a_lo, a_hi, a_res, a_log, aq.min_bits)
            _, grad_w_q = linear_backward_activation(grad_y, w_q, x, a_lo, a_hi, table, a_log, aq.min_bits)
        else:
            quantize_reductions(grad_y @ w_q, x, a_lo, a_hi)
            grad_w_q = grad_y.t() @ quantize(x, a_lo, a_hi, a_res, a_log, aq.min_bits)
        return quantize_reductions(grad_w_q, w, w_lo, w_hi)

    return forward, forward_backward


def build_step(variant: str, M: int, K: int, N: int, backward: bool):
    if variant.endswith("_graph"):
        return captured(build_step(variant.removesuffix("_graph"), M, K, N, backward))
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    grad_y = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    if variant == "cublas":
        x.requires_grad_(backward)
        weight.requires_grad_(backward)

        def step():
            if not backward:
                with torch.no_grad():
                    return x @ weight.t()
            return torch.autograd.grad(x @ weight.t(), (x, weight), grad_y)

        return step
    method = "lsq" if variant.startswith("lsq") else "ddq"
    layer = make_layer(method, K, N, weight, x)
    if variant in ("ddq_kernels", "ddq_unfused"):
        forward, forward_backward = kernel_steps(layer, x, grad_y, fused=variant == "ddq_kernels")
        return forward_backward if backward else forward
    x.requires_grad_(backward)
    if variant in ("lsq_compiled", "ddq_compiled", "ddq_compiled_combo", "ddq_cudagraphs"):
        # Each test compiles a fresh layer: without a reset, Dynamo recompiles DDQLinear.forward per shape until
        # its recompile limit, then runs it eagerly (the 2026-11-27 run 6 cudagraph numbers were such fallbacks).
        torch._dynamo.reset()
    if variant in ("lsq_compiled", "ddq_compiled"):
        layer = torch.compile(layer)
    if variant == "ddq_compiled_combo":
        layer = torch.compile(layer, options={"combo_kernels": True})
    if variant == "ddq_cudagraphs":
        # A network's inner layers take inputs that live in the graph's own memory; without this, every replay
        # would first copy x into the graph's static input buffer (0.46 GB on 401408×576).
        torch._dynamo.mark_static_address(x)
        layer = torch.compile(layer, mode="reduce-overhead")
    return lambda: layer_step(layer, x, grad_y, backward)


def peak_extra_bytes(step) -> int:
    """Peak memory a step allocates beyond what is already held (inputs, parameters)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - held


@pytest.mark.parametrize("phase", ["forward", "forward_backward"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear(benchmark, shape, variant, phase):
    M, K, N = shape
    step = build_step(variant, M, K, N, backward=phase == "forward_backward")
    step()  # compile / autotune / initialise outside the timing
    peak = peak_extra_bytes(step)
    record(benchmark, step, shape=list(shape), variant=variant, phase=phase, peak_extra_bytes=peak)
    torch.cuda.empty_cache()


def gemm_operands(M: int, K: int, N: int):
    """bf16 operands of one strategy benchmark: x a ReLU output (half of it in the cell of 0), W_q (N, K), dY,
    and a per-tensor range [0, 3]."""
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16).relu()
    w_q = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    grad_y = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    lo, hi = torch.zeros(1, device="cuda"), torch.full((1,), 3.0, device="cuda")
    return x, w_q, grad_y, lo, hi


@pytest.mark.parametrize("strategy", ["unfused", "shared_epilogue"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_input_strategy(benchmark, shape, strategy):
    """The backward-input GEMM with the activation reductions alone: cuBLAS then the SHARED pass, or the
    CUDA C GEMM with the histogram in its epilogue (where it supports the shape)."""
    from ddq_kernels.linear_backward_input import SHARED_EPILOGUE, linear_backward_input
    from ddq_kernels.linear_backward_input_cuda import supports
    from ddq_kernels.linear_forward import UNFUSED

    M, K, N = shape
    x, w_q, grad_y, lo, hi = gemm_operands(M, K, N)
    if strategy == "shared_epilogue" and not supports(grad_y, w_q, x):
        pytest.skip("outside the CUDA C kernel's scope")
    config = SHARED_EPILOGUE if strategy == "shared_epilogue" else UNFUSED
    step = lambda: linear_backward_input(grad_y, w_q, x, lo, hi, config)
    step()
    record(benchmark, step, kernel=f"backward_input_{strategy}", case="×".join(map(str, shape)))


@pytest.mark.parametrize("strategy", ["triton", "unfused", "cuda_tiles", "wgmma"])
@pytest.mark.parametrize("gemm", ["forward", "backward_weight"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantized_operand_strategy(benchmark, shape, gemm, strategy):
    """The GEMMs that quantize x in their operand load, one strategy each: the first Triton tile, a quantize
    pass around cuBLAS, the CUDA C GEMM with the level table in shared memory (where it supports the shape), or
    (forward, sm_90) the same staging feeding Hopper's warpgroup MMA."""
    from ddq_kernels.level_table import level_table
    from ddq_kernels.linear_backward_weight import backward_weight_configs, linear_backward_weight
    from ddq_kernels.linear_backward_weight_cuda import supports as weight_supports
    from ddq_kernels.linear_forward import CUDA_TILES, UNFUSED, WGMMA, forward_configs, linear_forward
    from ddq_kernels.linear_forward_cuda import supports as forward_supports
    from ddq_kernels.linear_forward_wgmma import supports as wgmma_supports

    M, K, N = shape
    x, w_q, grad_y, lo, hi = gemm_operands(M, K, N)
    logits = torch.tensor([3.0] * 4 + [-3.0] * 4, device="cuda")
    table = level_table(lo, hi, torch.zeros(1, 256, device="cuda"), logits, 2)
    supported = forward_supports(x, w_q) if gemm == "forward" else weight_supports(grad_y, x)
    if strategy == "cuda_tiles" and not supported:
        pytest.skip("outside the CUDA C kernel's scope")
    if strategy == "wgmma" and not (gemm == "forward" and wgmma_supports(x, w_q)):
        pytest.skip("outside the wgmma kernel's scope (the forward on an sm_90 device)")
    if gemm == "forward":
        config = {"triton": forward_configs(M, N, K)[0], "unfused": UNFUSED, "cuda_tiles": CUDA_TILES,
                  "wgmma": WGMMA}[strategy]
        step = lambda: linear_forward(x, w_q, None, lo, hi, table, logits, 2, config)
    else:
        config = {"triton": backward_weight_configs(M, N, K)[0], "unfused": UNFUSED, "cuda_tiles": CUDA_TILES}[strategy]
        step = lambda: linear_backward_weight(grad_y, x, lo, hi, table, logits, 2, config=config)
    step()
    record(benchmark, step, kernel=f"{gemm}_{strategy}", case="×".join(map(str, shape)))
