"""Fused Triton quantize kernels (ddq_kernels.quantize, quantize_backward, level_table) vs the reference.

DDQ_SPEC.md §2 forward and §3 element pass. Runs on CUDA (@pytest.mark.gpu cases add large odd sizes)
and on CPU through the Triton interpreter with tiny odd sizes. Forward: equal to `quantize_reference`
up to rounding of the level itself (`levels_differ`), except elements within rounding distance of a
cell boundary (the kernels compute u = (x − lo)·(1/Δ), the reference (x − lo)/Δ; both float32), which
are counted and must be rare. Backward, every histogram strategy this machine runs: gradients are compared with v = 0 on
those ambiguous elements, so the only differences left are float32 summation order: ∂x exactly,
histogram and sums within 1e-5 of Σ|v| (resp. Σ|v·u|) per group.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ddq import quantizer_math as qm
from ddq.functional import quantize_reference, reductions_reference
from kernel_cases import DEVICE, DTYPES, ambiguous, levels_differ, quantizer_params, sample_input

from ddq_kernels.level_table import level_table
from ddq_kernels.quantize import quantize
from ddq_kernels.quantize_backward import BINCOUNT, quantize_reductions, strategies

MODES = ("symmetric", "unsigned", "affine")
SUM_TOLERANCE = 1e-5


def case(mode: str, per_channel: bool, bits: int, shape: tuple[int, ...], dtype: torch.dtype):
    min_bits = min(bits, 1 if mode == "unsigned" else 0)
    groups = shape[0] if per_channel else 1
    lo, hi, residuals, logits = quantizer_params(mode, groups, bits, min_bits)
    x = sample_input(shape, lo, hi, dtype, groups)
    return x, lo, hi, residuals, logits, min_bits


def check_forward(x, lo, hi, residuals, logits, min_bits, block=None):
    kwargs = {} if block is None else {"block": block}
    got = quantize(x, lo, hi, residuals, logits, min_bits, **kwargs)
    want = quantize_reference(x, lo, hi, residuals, logits, min_bits)
    assert got.dtype == x.dtype and got.shape == x.shape
    differ = levels_differ(got, want, lo, hi)
    boundary = ambiguous(x, lo, hi)
    assert not (differ & ~boundary).any(), "a level differs away from any cell boundary"
    assert differ.sum() <= max(2, x.numel() // 1000), f"{int(differ.sum())} boundary elements differ"
    return int(differ.sum())


def check_backward(x, lo, hi, block=None, strategy=None, grad_dtype=None):
    """grad_dtype float32 for a 16-bit x is a GEMM accumulator: the kernels round it to x's dtype first."""
    groups = lo.shape[0]
    v = torch.randn(x.shape, device=x.device).to(grad_dtype or x.dtype)
    v = torch.where(ambiguous(x, lo, hi).to(x.device), torch.zeros_like(v), v)
    grad_x, histogram, sum_vu, sum_clipped = quantize_reductions(v, x, lo, hi, block, strategy)
    v = v.to(x.dtype)
    want_x, want_hist, want_vu, want_clipped = reductions_reference(v, x, lo, hi)
    assert grad_x.dtype == x.dtype and torch.equal(grad_x, want_x)
    v32 = v.float().reshape(groups, -1)
    u, _ = qm.fine_index(x.reshape(groups, -1), lo, hi)
    scale_v = v32.abs().sum(1, keepdim=True)
    scale_vu = torch.nan_to_num(v32 * u).abs().sum(1)
    assert ((histogram - want_hist).abs() <= SUM_TOLERANCE * scale_v + 1e-6).all()
    assert ((sum_vu - want_vu).abs() <= SUM_TOLERANCE * scale_vu + 1e-6).all()
    assert ((sum_clipped - want_clipped).abs() <= SUM_TOLERANCE * scale_v[:, 0] + 1e-6).all()


@pytest.mark.parametrize("bits", range(9))
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_quantize_matches_reference(mode, per_channel, bits):
    if mode == "unsigned" and bits == 0:
        pytest.skip("unsigned mode needs b >= 1 (spec §2)")
    dtype = DTYPES[bits % 3]
    x, lo, hi, residuals, logits, min_bits = case(mode, per_channel, bits, (3, 37, 5), dtype)
    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    check_forward(x, lo, hi, residuals, logits, min_bits, block=256)
    for strategy in strategies():
        check_backward(x, lo, hi, 128, strategy)


@pytest.mark.parametrize("per_channel", [False, True])
def test_bincount_in_slices_matches_reference(per_channel):
    """The bincount strategy over a tensor larger than its scratch: slices of groups / of the tensor."""
    x, lo, hi, *_ = case("affine", per_channel, 4, (5, 97), torch.float32)
    check_backward(x, lo, hi, 64, {**BINCOUNT, "chunk": 150})


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_level_table_matches_reference(bits):
    lo, hi, residuals, logits = quantizer_params("affine", 5, bits, 1)
    table = level_table(lo, hi, residuals, logits, 1)
    want = qm.block_levels(lo, hi, residuals, bits)
    torch.testing.assert_close(table[:, : 2**bits], want, rtol=1e-6, atol=1e-6)
    assert not table[:, 2**bits:].any(), "codes past 2^b are zero, as in the reference"


def test_two_level_tables_in_one_launch_match_level_table():
    """`level_tables` (a layer's weight and activation tables in one launch) builds each quantizer's table as
    `level_table` does: per channel and per tensor, different bitwidths and min_bits."""
    from ddq_kernels.level_table import level_tables

    weight = (*quantizer_params("symmetric", 7, 3, 2), 2)
    act = (*quantizer_params("unsigned", 1, 5, 1), 1)
    for got, quantizer in zip(level_tables(weight, act), (weight, act)):
        assert torch.equal(got, level_table(*quantizer))


def test_empty_and_single_element_tensors():
    lo, hi, residuals, logits = quantizer_params("symmetric", 1, 4, 2)
    empty = torch.empty(0, 3, device=DEVICE)
    assert quantize(empty, lo, hi, residuals, logits, 2).shape == (0, 3)
    one = sample_input((1,), lo, hi, torch.float32, 1)
    check_forward(one, lo, hi, residuals, logits, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_quantize_large_odd_shapes_on_gpu(mode, per_channel, bits, dtype):
    x, lo, hi, residuals, logits, min_bits = case(mode, per_channel, bits, (67, 1031, 3), dtype)
    check_forward(x, lo, hi, residuals, logits, min_bits)
    for strategy in strategies():
        check_backward(x, lo, hi, None, strategy)


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("columns", [8 * 129, 8 * 129 + 5])
@pytest.mark.parametrize("per_channel", [False, True])
def test_backward_strategies_on_vector_and_unaligned_layouts(per_channel, columns, offset, grad_dtype):
    """Whole 16-byte vectors (rows a multiple of 8 elements, aligned storage) and the element-wise path
    (odd rows, or storage starting one element into an allocation), with bf16 or float32 gradients."""
    x, lo, hi, *_ = case("unsigned", per_channel, 4, (37, columns), torch.bfloat16)
    x = torch.cat([x.new_zeros(1), x.reshape(-1)])[offset:offset + x.numel()].reshape(x.shape)
    assert (x.data_ptr() % 16 == 0) == (offset == 0)
    for strategy in strategies():
        check_backward(x, lo, hi, None, strategy, grad_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(33, 517), (17, 9, 5, 7)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_op_on_gpu_matches_cpu(per_channel, shape):
    """The registered CUDA bodies of ddq::quantize(_backward), parameter gradients included; a 4-d x is
    channels_last, and x_q and ∂x keep its strides."""
    x, lo, hi, residuals, logits, min_bits = case("affine", per_channel, 5, shape, torch.float32)
    if x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    v = torch.randn_like(x)
    v = torch.where(ambiguous(x, lo, hi).to(x.device), torch.zeros_like(v), v)
    args = (x, lo, hi, residuals, logits, min_bits, True)
    x_q = torch.ops.ddq.quantize(*args)
    assert x_q.stride() == x.stride()
    assert not (levels_differ(x_q, quantize_reference(x, lo, hi, residuals, logits, min_bits), lo, hi)
                & ~ambiguous(x, lo, hi)).any()
    got = torch.ops.ddq.quantize_backward(v, *args)
    assert got[0].stride() == x.stride()
    want = torch.ops.ddq.quantize_backward(v.cpu(), *(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max().clamp_min(1)))


@pytest.mark.parametrize("groups", [1, 9])
def test_backward_body_sums_the_gate_terms_in_kernel_1(monkeypatch, groups):
    """The op's device backward (`registration.quantize_backward_cuda`; in the interpreter here) zeroes the gate
    terms' done counters with its bins, so kernel 1's last programs sum the terms: in chunks of 4 groups here
    (256 on the device), so that both levels run. Against the reference op on CPU."""
    import ddq_kernels.registration as cuda_bodies
    from ddq_kernels import parameter_grads as kernels

    class NoSecondLaunch:
        def __getitem__(self, grid):
            raise AssertionError("kernel 2 was launched: kernel 1's last programs should have summed the terms")

    monkeypatch.setattr(kernels, "MAX_CHUNK", 4)
    monkeypatch.setattr(kernels, "gate_logit_grads_kernel", NoSecondLaunch())
    x, lo, hi, residuals, logits, min_bits = case("symmetric", groups > 1, 3, (9, 23), torch.float32)
    v = torch.where(ambiguous(x, lo, hi).to(x.device), 0.0, torch.randn_like(x))
    args = (x, lo, hi, residuals, logits, min_bits, True)
    got = cuda_bodies.quantize_backward_cuda(v, *args)
    want = torch.ops.ddq.quantize_backward(v.cpu(), *(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max().clamp_min(1)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_shared_pass_integer_bins_stay_within_their_bound(dtype):
    """The SHARED pass adds each chunk's v (16 a lane, 512 a warp) to integer bins at a power of two that up to
    four chunks share, so each v is off by at most 2^-18 of the largest |v| among them: checked against float64
    sums on v whose magnitudes span seven decades. A chunk with ±inf or NaN in it takes the float path: the
    non-finite v reaches its own bin, the other bins stay within the bound."""
    from ddq_kernels.shared_histogram import available, reductions_shared

    if not available():
        pytest.skip("the CUDA C pass needs NVRTC")
    torch.manual_seed(0)
    lo, hi = torch.zeros(1, device="cuda"), torch.full((1,), 3.0, device="cuda")
    x = (torch.rand(96, 4104, device="cuda") * 3.0).to(dtype)
    decades = (-4.0, 3.0) if dtype == torch.float16 else (-6.0, 1.0)
    v = (torch.randn(x.shape, device="cuda") * 10 ** torch.empty(x.shape, device="cuda").uniform_(*decades)).to(dtype)
    step = 3.0 / 255
    x.view(-1)[:2] = torch.tensor([10 * step, 20 * step], dtype=dtype)  # cells 10 and 20
    v = torch.where(ambiguous(x, lo, hi).to(x.device), torch.zeros_like(v), v)
    cell = qm.fine_index(x.float().reshape(1, -1), lo, hi)[1].reshape(-1).long()
    for non_finite in (None, (float("inf"), float("nan"))):
        if non_finite:
            v.view(-1)[:2] = torch.tensor(non_finite, dtype=dtype)
        grad_x = torch.empty_like(x)
        histogram, sums = torch.zeros(1, 256, device="cuda"), torch.zeros(1, 2, device="cuda")
        reductions_shared(v, x, lo, hi, grad_x, histogram, sums)
        v64 = v.double().reshape(-1)
        finite = torch.isfinite(v64)
        want = torch.zeros(256, device="cuda", dtype=torch.float64).index_add_(0, cell[finite], v64[finite])
        count = torch.bincount(cell[finite], minlength=256).double()
        magnitude = torch.zeros_like(want).index_add_(0, cell[finite], v64[finite].abs())
        bound = count * 2.0**-18 * v64[finite].abs().max() + SUM_TOLERANCE * magnitude
        got = histogram[0].double()
        checked = torch.ones(256, dtype=torch.bool, device="cuda")
        if non_finite:
            assert got[10].item() == float("inf") and got[20].isnan()
            checked[[10, 20]] = False
        assert ((got - want).abs() <= bound)[checked].all()
        torch.testing.assert_close(grad_x, v, rtol=0, atol=0, equal_nan=True)  # every x is inside [lo, hi]


@pytest.mark.gpu
@pytest.mark.parametrize("columns", [8 * 129, 8 * 129 + 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_shared_pass_writes_x_q_on_gpu(bits, mode, per_channel, dtype, columns):
    """The SHARED pass that also writes x_q from its own fine cells (linear_backward's AROUND_CUBLAS): x_q as
    the reference quantizes x (NaN for the sample's non-finite x), up to cell-boundary elements, counted as in
    the forward tests; ∂x bit for bit and the reductions within float-atomic order of the pass without x_q.
    Rows of 8·129 elements take the 16-byte vector path per channel, 8·129 + 5 the element-wise one."""
    from ddq_kernels.quantize_backward import zeroed_bins
    from ddq_kernels.shared_histogram import available, reductions_shared

    if not available():
        pytest.skip("the CUDA C pass needs NVRTC")
    x, lo, hi, residuals, logits, min_bits = case(mode, per_channel, bits, (37, columns), dtype)
    groups = lo.shape[0]
    v = torch.randn(x.shape, device=x.device).to(dtype)
    table = level_table(lo, hi, residuals, logits, min_bits)
    x_q = torch.full_like(x, 7.0)
    passes = []
    for quantized in (None, (x_q, table, logits, min_bits)):
        grad_x, (histogram, sums) = torch.empty_like(x), zeroed_bins(groups, x.device)
        reductions_shared(v, x, lo, hi, grad_x, histogram, sums, quantized)
        passes.append((grad_x, histogram, sums))
    differ = levels_differ(x_q, quantize_reference(x, lo, hi, residuals, logits, min_bits), lo, hi)
    assert not (differ & ~ambiguous(x, lo, hi)).any(), "a level differs away from any cell boundary"
    assert differ.sum() <= max(2, x.numel() // 1000), f"{int(differ.sum())} boundary elements differ"
    (grad_x, histogram, sums), (grad_x_with, histogram_with, sums_with) = passes
    assert torch.equal(grad_x, grad_x_with)
    magnitude = v.float().abs().reshape(groups, -1).sum(dim=1, keepdim=True)
    assert ((histogram_with - histogram).abs() <= SUM_TOLERANCE * magnitude).all()
    assert ((sums_with - sums).abs() <= SUM_TOLERANCE * 255 * magnitude).all()


def test_more_groups_than_a_cuda_grid_holds_is_a_clear_error():
    """The element kernels put per-channel groups on the grid's y axis (at most 65535 on CUDA)."""
    import ddq_kernels.registration as cuda_bodies

    groups = cuda_bodies.MAX_GROUPS + 1
    lo, hi, residuals, logits = quantizer_params("symmetric", groups, 4, 2)
    x = torch.zeros(groups, 3, device=lo.device)
    with pytest.raises(ValueError, match="65536 quantizer groups"):
        cuda_bodies.quantize_cuda(x, lo, hi, residuals, logits, 2, True)
    with pytest.raises(ValueError, match="65536 quantizer groups"):
        cuda_bodies.quantize_backward_cuda(x, x, lo, hi, residuals, logits, 2, True)


def test_shared_strategy_falls_back_to_triton_when_nvrtc_fails(monkeypatch):
    """A CUDA machine whose PyTorch cannot compile the CUDA C kernel (no NVRTC) keeps the Triton strategies."""
    from ddq_kernels import shared_histogram
    from ddq_kernels.quantize_backward import SHARED, tuned_candidates

    def refuse(*args, **kwargs):
        raise RuntimeError("libnvrtc not found")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_compile_kernel", refuse, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    shared_histogram.available.cache_clear()
    shared_histogram.compiled_kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="libnvrtc not found"):
            assert not shared_histogram.available()
        assert SHARED not in strategies() and SHARED not in tuned_candidates()
    finally:
        shared_histogram.available.cache_clear()
        shared_histogram.compiled_kernel.cache_clear()
