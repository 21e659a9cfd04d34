"""`ddq_quantize` and the ops `ddq::quantize` / `ddq::quantize_backward` against DDQ_SPEC.md §2–3.

The oracle (`spec_oracle`) is an independent float64 implementation of the spec. Forward values are
compared on fresh random inputs that clip on both sides, for every bitwidth, every range mode, per
tensor and per channel, in float32, bfloat16 and float16; gradients against the spec's formulas and,
where the quantizer is differentiable in the ordinary sense, against finite differences of the forward.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import spec_oracle as oracle
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddq import quantizer_math as qm
from ddq.functional import ddq_quantize

MODES = ("symmetric", "unsigned", "affine")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Parameter gradients are float32 sums of up to a few thousand terms (a scatter-add histogram, then
# sums over 256 cells, each term carrying a few float32 roundings of levels and positions). Their error
# stays below ~100·2^-24 of Σ|term|; we allow 2e-5 (≈ 170 ulp) of the oracle's Σ|term|.
GRAD_RTOL = 2e-5
# CI (CI=true) replays the same examples every run; elsewhere each run explores new ones.
PROPERTY_SETTINGS = dict(deadline=None, database=None, derandomize=bool(os.environ.get("CI")))


def test_oracle_is_independent_of_the_code_under_test():
    source = open(oracle.__file__, encoding="utf-8").read()
    assert "import ddq" not in source and "from ddq" not in source


def to_dtype_values(dtype: torch.dtype):
    """float64 → the values a tensor of `dtype` holds (rounded as torch rounds)."""
    return lambda a: torch.from_numpy(np.asarray(a, np.float64)).to(dtype).double().numpy()


def make_range(rng: np.random.Generator, mode: str, groups: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) as float32-exact float64 arrays, built as `mode` builds them."""
    top = rng.uniform(0.5, 3.0, groups)
    bottom = rng.uniform(-2.0, 0.5, groups)
    lo, hi = oracle.mode_range(mode, bottom + top if mode == "affine" else top, bottom, bits)
    return lo.astype(np.float32).astype(np.float64), hi.astype(np.float32).astype(np.float64)


def make_gate_logits(rng: np.random.Generator, bits: int, min_bits: int) -> np.ndarray:
    """Logits with bitwidth `bits`: gate bits+1 closed, finer gates of either sign (nesting closes them),
    forced gates (k ≤ min_bits) of either sign (forcing opens them)."""
    theta = rng.uniform(0.05, 1.0, oracle.K)
    theta[bits:] *= -1
    theta[bits + 1 :] *= rng.choice([-1.0, 1.0], oracle.K - bits - 1) if bits + 1 < oracle.K else 1.0
    theta[:min_bits] *= rng.choice([-1.0, 1.0], min_bits)
    theta = theta.astype(np.float32).astype(np.float64)
    assert oracle.bitwidth(theta, min_bits) == bits
    return theta


def make_residuals(rng: np.random.Generator, groups: int, std: float) -> np.ndarray:
    return rng.normal(0.0, std, (groups, oracle.CELLS)).astype(np.float32).astype(np.float64)


def tensor(a, dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=dtype).requires_grad_(requires_grad)


def run(x, shape, dtype, lo, hi, residuals, theta, axis, min_bits, grad_scale=True, v=None):
    """The op on numpy inputs; returns (x_q (G, n) float64, grads dict or None)."""
    groups = lo.shape[0]
    xt = tensor(x, dtype).reshape(shape).requires_grad_(v is not None)
    params = [tensor(p, requires_grad=v is not None) for p in (lo, hi, residuals, theta)]
    out = ddq_quantize(xt, *params, axis=axis, min_bits=min_bits, grad_scale=grad_scale)
    assert out.dtype == dtype and out.shape == shape
    values = out.detach().double().reshape(groups, -1).numpy()
    if v is None:
        return values, None
    out.backward(tensor(v, dtype).reshape(shape))
    names = ("dx", "dlo", "dhi", "dresiduals", "dtheta")
    grads = [xt.grad.reshape(groups, -1)] + [p.grad for p in params]
    return values, {name: g.double().numpy() for name, g in zip(names, grads)}


def assert_forward_matches(values, x, lo, hi, residuals, theta, min_bits, dtype):
    """Every element equals the oracle's level; an element within the band of a bin boundary may take
    either neighbouring level (float32 vs float64 u). Levels carry float32 rounding (≲ 1e-6 of the range)
    and then one rounding to `dtype` (≤ 1 ulp)."""
    low, high, ambiguous = oracle.quantize_candidates(x, lo, hi, residuals, theta, min_bits)
    scale = (np.abs(lo) + np.abs(hi))[:, None] * 1e-6
    eps = torch.finfo(dtype).eps
    close_low = np.abs(values - low) <= eps * np.abs(low) + scale
    close_high = np.abs(values - high) <= eps * np.abs(high) + scale
    assert np.isfinite(values).all()
    bad = ~(close_low | close_high)
    assert not bad.any(), f"{bad.sum()} elements differ from the spec, e.g. got {values[bad][:4]}, want {low[bad][:4]}"
    # A float32 input value lies in the band with probability ~2·BOUNDARY_BAND. Half-precision values are
    # not independent of the grid: unsigned-mode cell edges sit at multiples of Δ from 0, and when one
    # multiple nearly hits a bf16 value, its small multiples often do too (seen: 4 of 197 values).
    distinct_near, distinct = len(np.unique(x[ambiguous])), len(np.unique(x))
    limit = max(3, 0.01 * distinct) if dtype == torch.float32 else max(6, 0.05 * distinct)
    assert distinct_near <= limit, f"{distinct_near} of {distinct} input values near a boundary"


def assert_grads_match(grads, expected: oracle.Gradients, dtype):
    np.testing.assert_array_equal(grads["dx"], to_dtype_values(dtype)(expected.dx))
    for name in ("dlo", "dhi", "dresiduals", "dtheta"):
        want, scale = getattr(expected, name), getattr(expected, name + "_scale")
        err = np.abs(grads[name] - want)
        assert (err <= GRAD_RTOL * scale + 1e-12).all(), f"{name}: got {grads[name]}, want {want}"


def case(seed: int, mode: str, bits: int, min_bits: int, axis, shape, dtype, residual_std=0.3, avoid_band=False):
    rng = np.random.default_rng(seed)
    groups = 1 if axis is None else shape[0]
    n = int(np.prod(shape)) // groups
    lo, hi = make_range(rng, mode, groups, bits)
    residuals = make_residuals(rng, groups, residual_std)
    theta = make_gate_logits(rng, bits, min_bits)
    if avoid_band:
        x = oracle.sample_x(rng, lo, hi, n, round_to=to_dtype_values(dtype))
    else:
        x = to_dtype_values(dtype)(lo[:, None] + (hi - lo)[:, None] * rng.uniform(-0.15, 1.15, (groups, n)))
    v = to_dtype_values(dtype)(rng.normal(size=(groups, n)))
    return x, lo, hi, residuals, theta, v


def modes_for(bits: int):
    return MODES if bits >= 1 else ("symmetric", "affine")


FORWARD_CASES = [(bits, mode) for bits in range(oracle.K + 1) for mode in modes_for(bits)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis, shape", [(None, (3, 5, 7)), (0, (4, 3, 11))], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits, mode", FORWARD_CASES)
def test_forward_matches_spec(bits, mode, axis, shape, dtype):
    min_bits = min(bits, 2)
    x, lo, hi, residuals, theta, _ = case(100 * bits + len(mode), mode, bits, min_bits, axis, shape, dtype)
    values, _ = run(x, shape, dtype, lo, hi, residuals, theta, axis, min_bits)
    assert_forward_matches(values, x, lo, hi, residuals, theta, min_bits, dtype)
    u = oracle.fine_position(x, lo, hi)
    assert (u < -0.5).any() and (u > oracle.N + 0.5).any(), "inputs must clip on both sides"


@pytest.mark.parametrize("axis, shape", [(None, (5, 21)), (0, (3, 37))], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits, mode", FORWARD_CASES)
def test_gradients_match_spec(bits, mode, axis, shape):
    min_bits = min(bits, 1)
    grad_scale = bits % 2 == 0
    x, lo, hi, residuals, theta, v = case(7 + bits, mode, bits, min_bits, axis, shape, torch.float32, avoid_band=True)
    _, grads = run(x, shape, torch.float32, lo, hi, residuals, theta, axis, min_bits, grad_scale, v)
    assert_grads_match(grads, oracle.gradients(v, x, lo, hi, residuals, theta, min_bits, grad_scale), torch.float32)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("bits", (2, 5, 8))
def test_gradients_match_spec_half_precision(bits, dtype):
    x, lo, hi, residuals, theta, v = case(bits, "affine", bits, 2, 0, (3, 29), dtype, avoid_band=True)
    _, grads = run(x, (3, 29), dtype, lo, hi, residuals, theta, 0, 2, True, v)
    assert_grads_match(grads, oracle.gradients(v, x, lo, hi, residuals, theta, 2, True), dtype)


def test_gradient_elements_straddle_the_in_range_edges():
    """Elements with −0.5 ≤ u < 0 take cell 0 but count as clipped (in = 0), and u just above 255 too."""
    lo, hi = np.array([-1.0]), np.array([1.0])
    d = 2.0 / oracle.N
    x = np.array([[-1.0 - 0.3 * d, -1.0 + 0.3 * d, 1.0 - 0.3 * d, 1.0 + 0.3 * d, 0.1]]).astype(np.float32).astype(np.float64)
    residuals, theta, v = np.zeros((1, 256)), oracle.graded_logits(8), np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    expected = oracle.gradients(v, x, lo, hi, residuals, theta, 2, False)
    np.testing.assert_array_equal(expected.dx, [[0.0, 2.0, 3.0, 0.0, 5.0]])
    values, grads = run(x, (1, 5), torch.float32, lo, hi, residuals, theta, None, 2, False, v)
    assert_grads_match(grads, expected, torch.float32)
    np.testing.assert_allclose(values[0, [0, 3]], [-1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("bits", (8, 4, 1))
def test_ties_round_half_up(bits):
    """u exactly halfway between two fine cells takes the upper one (spec §2 step 1: floor(u + 0.5), not
    round-half-even). Δ = 1 here, so u = x − lo is exact in float32 and every input is a tie."""
    lo, hi = np.array([-100.0]), np.array([155.0])
    x = (np.arange(-1, 256) - 99.5)[None]
    index = np.clip(np.arange(-1, 256) + 1, 0, oracle.N)[None]
    residuals, theta = np.zeros((1, oracle.CELLS)), oracle.graded_logits(bits)
    want = oracle.quantize_index(index, lo, hi, residuals, bits)[2]
    np.testing.assert_array_equal(oracle.quantize(x, lo, hi, residuals, theta, 0).i, index)
    values, _ = run(x, (257,), torch.float32, lo, hi, residuals, theta, None, 0)
    np.testing.assert_array_equal(values, want)


@pytest.mark.parametrize("bits", range(oracle.K + 1))
def test_kronecker_form_equals_block_mean_form(bits):
    """qᵀ·ZU(g)·onehot(i) with the nested gates of bitwidth b equals lo + Δ·T (spec §2), in the oracle
    (explicit 256×256 Kronecker matrix) and in the code (mean over merged bit axes)."""
    rng = np.random.default_rng(bits)
    lo, hi = make_range(rng, "affine", 3, bits)
    residuals = make_residuals(rng, 3, 0.4)
    q = oracle.fine_levels(lo, hi, residuals, bits)
    gates = [1] * bits + [0] * (oracle.K - bits)
    kron = oracle.kronecker_levels(q, gates)
    cells = np.tile(np.arange(oracle.CELLS), (3, 1))
    block_mean = oracle.quantize_index(cells, lo, hi, residuals, bits)[2]
    np.testing.assert_allclose(kron, block_mean, rtol=1e-12, atol=1e-12)

    lo_t, hi_t, res_t = tensor(lo), tensor(hi), tensor(residuals)
    code_kron = qm.merged_levels(qm.fine_levels(lo_t, hi_t, res_t, bits), [g == 1 for g in gates])
    code_block_mean = qm.fine_table(qm.block_levels(lo_t, hi_t, res_t, bits), bits)
    range_tol = 1e-6 * (np.abs(lo) + np.abs(hi)).max()
    np.testing.assert_allclose(code_kron.double().numpy(), code_block_mean.double().numpy(), rtol=0, atol=range_tol)
    np.testing.assert_allclose(code_block_mean.double().numpy(), block_mean, rtol=0, atol=range_tol)


def test_kronecker_form_for_arbitrary_gate_patterns():
    """The code's merged_levels equals the explicit Kronecker product for non-nested patterns too
    (the gate gradient evaluates such patterns: factor k forced, the others nested)."""
    rng = np.random.default_rng(1)
    lo, hi = make_range(rng, "affine", 2, 3)
    q = oracle.fine_levels(lo, hi, make_residuals(rng, 2, 0.5), 3)
    for _ in range(12):
        gates = list(rng.integers(0, 2, oracle.K))
        got = qm.merged_levels(tensor(q), [g == 1 for g in gates]).double().numpy()
        np.testing.assert_allclose(got, oracle.kronecker_levels(q, gates), rtol=0, atol=1e-6 * np.abs(q).max())


def test_oracle_kronecker_form_is_multilinear_in_each_gate():
    """The spec's premise for the gate gradient: qᵀ·ZU(g)·onehot is linear in each g_k, so its
    derivative (here a central difference at a fractional g_k) is the difference between g_k = 1 and 0."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(1, oracle.CELLS))
    gates = [1, 1, 1, 0.3, 0, 0.7, 0, 0]
    for k in range(oracle.K):
        at = lambda value: oracle.kronecker_levels(q, [value if j == k else g for j, g in enumerate(gates)])
        derivative = (at(0.5 + 1e-3) - at(0.5 - 1e-3)) / 2e-3
        np.testing.assert_allclose(derivative, at(1) - at(0), atol=1e-9)


@pytest.mark.parametrize("axis, shape", [(None, (4, 33)), (0, (3, 41))], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", (1, 3, 6, 8))
def test_residual_gradient_is_exact_finite_difference(bits, axis, shape):
    """x_q is linear in r (the fine indices do not depend on it): ∂L/∂r equals the finite difference."""
    x, lo, hi, residuals, theta, v = case(bits, "affine", bits, 1, axis, shape, torch.float32)
    values, grads = run(x, shape, torch.float32, lo, hi, residuals, theta, axis, 1, True, v)
    rng = np.random.default_rng(bits)
    step = 0.5
    for g, j in zip(rng.integers(0, lo.shape[0], 6), rng.integers(0, oracle.CELLS, 6)):
        bumped = residuals.copy()
        bumped[g, j] += step
        moved, _ = run(x, shape, torch.float32, lo, hi, bumped, theta, axis, 1)
        finite_difference = np.sum(v * (moved - values)) / step
        tol = 1e-6 * np.sum(np.abs(v)) * np.abs(values).max() / step
        assert abs(grads["dresiduals"][g, j] - finite_difference) <= tol


@pytest.mark.parametrize("axis, shape", [(None, (3, 37)), (0, (2, 45))], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", range(1, oracle.K + 1))
def test_gate_gradient_equals_forward_difference_of_flipping_a_gate(bits, axis, shape):
    """With r = 0 and lo, hi fixed, flipping gate b (close the finest open one) or gate b + 1 (open the
    next) in the real forward changes x_q exactly as the Kronecker form with that factor toggled, so
    ∂L/∂θ_b = Σ v·(x_q(b) − x_q(b − 1)) and ∂L/∂θ_{b+1} = Σ v·(x_q(b + 1) − x_q(b)) (graded logits:
    h_{b+1} = 0, so no other term of the chain reaches these logits)."""
    min_bits = 0
    x, lo, hi, _, _, v = case(bits, "affine", bits, min_bits, axis, shape, torch.float32)
    residuals = np.zeros((lo.shape[0], oracle.CELLS))
    forward = lambda b: run(x, shape, torch.float32, lo, hi, residuals, oracle.graded_logits(b), axis, min_bits)[0]
    _, grads = run(x, shape, torch.float32, lo, hi, residuals, oracle.graded_logits(bits), axis, min_bits, True, v)
    now = forward(bits)
    tol = 1e-6 * np.sum(np.abs(v)) * np.abs(now).max()
    assert abs(grads["dtheta"][bits - 1] - np.sum(v * (now - forward(bits - 1)))) <= tol
    if bits < oracle.K:
        assert abs(grads["dtheta"][bits] - np.sum(v * (forward(bits + 1) - now))) <= tol


@pytest.mark.parametrize("axis, shape", [(None, (2, 23)), (0, (3, 17))], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", (0, 2, 5, 8))
def test_range_gradients_are_exact_when_every_element_clips(bits, axis, shape):
    """Clipped elements sit on the end levels, x_q = lo + Δ·T with fixed T: linear in lo and hi, so
    ∂L/∂lo and ∂L/∂hi are ordinary derivatives (central differences; the steps keep every element
    clipped). ∂L/∂x is 0 there, and moving x does not move x_q."""
    rng = np.random.default_rng(bits)
    _, lo, hi, residuals, theta, v = case(bits, "affine", bits, 0, axis, shape, torch.float32)
    groups, n = lo.shape[0], int(np.prod(shape)) // lo.shape[0]
    u = np.where(rng.random((groups, n)) < 0.5, rng.uniform(-300, -60, (groups, n)), rng.uniform(320, 600, (groups, n)))
    x = (lo[:, None] + (hi - lo)[:, None] / oracle.N * u).astype(np.float32).astype(np.float64)
    values, grads = run(x, shape, torch.float32, lo, hi, residuals, theta, axis, 0, False, v)
    np.testing.assert_array_equal(grads["dx"], 0.0)
    step = 0.05 * (hi - lo)
    for name in ("lo", "hi"):
        for g in range(groups):
            plus, minus = [lo.copy(), hi.copy()], [lo.copy(), hi.copy()]
            which = 0 if name == "lo" else 1
            plus[which][g] += step[g]
            minus[which][g] -= step[g]
            up = run(x, shape, torch.float32, *plus, residuals, theta, axis, 0)[0]
            down = run(x, shape, torch.float32, *minus, residuals, theta, axis, 0)[0]
            finite_difference = np.sum(v * (up - down)) / (2 * step[g])
            tol = 1e-6 * np.sum(np.abs(v)) * np.abs(values).max() / step[g]
            assert abs(grads["d" + name][g] - finite_difference) <= tol, name
    nudged, _ = run(x + 1e-3 * np.sign(x), shape, torch.float32, lo, hi, residuals, theta, axis, 0)
    np.testing.assert_array_equal(nudged, values)


@pytest.mark.parametrize("bits", range(oracle.K + 1))
def test_range_gradient_scale(bits):
    """grad_scale=True multiplies ∂lo, ∂hi by 1/√(numel_g·max(2^b − 1, 1)) and nothing else."""
    shape = (3, 19)
    x, lo, hi, residuals, theta, v = case(bits, "affine", bits, 0, 0, shape, torch.float32)
    _, scaled = run(x, shape, torch.float32, lo, hi, residuals, theta, 0, 0, True, v)
    _, plain = run(x, shape, torch.float32, lo, hi, residuals, theta, 0, 0, False, v)
    factor = 1 / np.sqrt(19 * max(2**bits - 1, 1))
    for name in ("dlo", "dhi"):
        np.testing.assert_allclose(scaled[name], plain[name] * factor, rtol=1e-6)
    for name in ("dx", "dresiduals", "dtheta"):
        np.testing.assert_array_equal(scaled[name], plain[name])


@pytest.mark.parametrize("min_bits", range(oracle.K + 1))
def test_min_bits_forces_gates(min_bits):
    """All logits negative: b = min_bits; forced gates have zero logit gradient, free gates do not."""
    theta = -np.linspace(0.1, 0.8, oracle.K)
    rng = np.random.default_rng(min_bits)
    lo, hi = np.array([-1.5]), np.array([2.0])
    x = oracle.sample_x(rng, lo, hi, 200)
    residuals, v = make_residuals(rng, 1, 0.3), rng.normal(size=(1, 200))
    assert qm.bitwidth_int(tensor(theta), min_bits) == min_bits
    values, grads = run(x, (200,), torch.float32, lo, hi, residuals, theta, None, min_bits, True, v)
    assert len(np.unique(values)) <= 2**min_bits
    np.testing.assert_array_equal(grads["dtheta"][:min_bits], 0.0)
    if min_bits < oracle.K:
        assert grads["dtheta"][min_bits] != 0.0
    assert_grads_match(grads, oracle.gradients(v, x, lo, hi, residuals, theta, min_bits, True), torch.float32)


def test_a_closed_gate_closes_every_finer_gate():
    """Nested gates: with gate 4 closed, gates 5..8 open change nothing (b = 3, same output)."""
    rng = np.random.default_rng(3)
    lo, hi = np.array([-1.0]), np.array([1.0])
    x = oracle.sample_x(rng, lo, hi, 300)
    residuals = make_residuals(rng, 1, 0.3)
    nested = np.array([1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    assert qm.bitwidth_int(tensor(nested), 2) == 3
    assert qm.nested_gates(tensor(nested), 2).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    got, _ = run(x, (300,), torch.float32, lo, hi, residuals, nested, None, 2)
    want, _ = run(x, (300,), torch.float32, lo, hi, residuals, oracle.graded_logits(3), None, 2)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) <= 8


@pytest.mark.parametrize("theta_seed", range(6))
def test_bitwidth_and_gates_match_spec(theta_seed):
    rng = np.random.default_rng(theta_seed)
    for _ in range(20):
        theta, min_bits = rng.normal(size=oracle.K), int(rng.integers(0, oracle.K + 1))
        t = tensor(theta)
        assert qm.hard_gates(t, min_bits).tolist() == oracle.hard_gates(theta, min_bits)
        assert qm.nested_gates(t, min_bits).tolist() == oracle.nested_gates(theta, min_bits)
        assert qm.bitwidth_int(t, min_bits) == oracle.bitwidth(theta, min_bits)
        assert qm.bitwidth(t, min_bits).dim() == 0


@pytest.mark.parametrize("bits", range(1, oracle.K + 1))
def test_unsigned_coefficients_put_zero_on_a_level(bits):
    a_s, b_s = qm.unsigned_range_coefficients(torch.tensor(bits))
    want_a, want_b = oracle.unsigned_coefficients(bits)
    assert a_s.item() == pytest.approx(want_a, rel=1e-6, abs=1e-12)
    assert b_s.item() == pytest.approx(want_b, rel=1e-6)
    levels = oracle.quantize_index(np.arange(0, 256, 2 ** (8 - bits))[None], [-want_a], [want_b], np.zeros((1, 256)), bits)[2]
    np.testing.assert_allclose(levels[0], np.arange(2**bits) / (2**bits - 1), atol=1e-12)


@pytest.mark.parametrize(
    "shape, axis, dtype, bits, min_bits",
    [
        ((5, 7), None, torch.float32, 4, 2),
        ((3, 4, 5), 0, torch.bfloat16, 8, 2),
        ((6,), None, torch.float16, 0, 0),
        ((2, 9), 0, torch.float32, 1, 1),
        ((3, 4, 5, 2), None, torch.bfloat16, 4, 2),
        ((5, 3, 2, 3), 0, torch.float32, 3, 2),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
def test_opcheck(shape, axis, dtype, bits, min_bits, layout):
    """torch.library.opcheck of both ops: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    rng = np.random.default_rng(bits)
    x = torch.randn(shape, dtype=dtype) * 2
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":
        if x.dim() != 4:
            pytest.skip("channels_last needs a 4-d tensor")
        x = x.to(memory_format=torch.channels_last)
    groups = 1 if axis is None else shape[0]
    lo, hi = make_range(rng, "affine", groups, bits)
    args = [tensor(lo), tensor(hi), tensor(make_residuals(rng, groups, 0.3)), tensor(make_gate_logits(rng, bits, min_bits))]
    grad_args = [x.requires_grad_()] + [a.requires_grad_() for a in args]
    torch.library.opcheck(torch.ops.ddq.quantize, (*grad_args, min_bits, True))
    grad = torch.randn(shape, dtype=dtype)
    torch.library.opcheck(torch.ops.ddq.quantize_backward, (grad, x.detach(), *[a.detach() for a in args], min_bits, True))


@pytest.mark.parametrize("axis", [None, 0])
def test_dense_layouts_are_kept(axis):
    """A channels_last (or any dense) x gives x_q and ∂x with x's strides and the values of a contiguous x:
    the element-wise passes run in storage order (no NCHW copy in front of a channels_last convolution)."""
    rng = np.random.default_rng(3)
    x = (torch.randn(4, 6, 3, 5) * 2).to(memory_format=torch.channels_last)
    groups = 1 if axis is None else 4
    lo, hi = make_range(rng, "affine", groups, 4)
    params = [tensor(lo), tensor(hi), tensor(make_residuals(rng, groups, 0.3)), tensor(make_gate_logits(rng, 4, 2))]
    for layout in (x, x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)):
        x_q = ddq_quantize(layout, *params, axis=axis)
        assert x_q.stride() == layout.stride()
        assert torch.equal(x_q, ddq_quantize(layout.contiguous(), *params, axis=axis))
        grad = torch.randn(layout.shape).to(memory_format=torch.channels_last)
        got = torch.ops.ddq.quantize_backward(grad, layout, *params, 2, True)
        want = torch.ops.ddq.quantize_backward(grad.contiguous(), layout.contiguous(), *params, 2, True)
        assert got[0].stride() == layout.stride()
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, **PROPERTY_SETTINGS)
@given(
    seed=st.integers(0, 2**32 - 1),
    bits=st.integers(0, 8),
    data=st.data(),
    axis=st.sampled_from([None, 0]),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
)
def test_property_matches_oracle(seed, bits, data, axis, shape, dtype):
    """Random bitwidth, min_bits, mode, granularity, shape and dtype: forward and gradients equal the oracle."""
    mode = data.draw(st.sampled_from(modes_for(bits)), label="mode")
    min_bits = data.draw(st.integers(0 if mode != "unsigned" else 1, bits), label="min_bits")
    grad_scale = data.draw(st.booleans(), label="grad_scale")
    x, lo, hi, residuals, theta, v = case(seed, mode, bits, min_bits, axis, shape, dtype)
    values, _ = run(x, shape, dtype, lo, hi, residuals, theta, axis, min_bits)
    assert_forward_matches(values, x, lo, hi, residuals, theta, min_bits, dtype)
    x, lo, hi, residuals, theta, v = case(seed, mode, bits, min_bits, axis, shape, dtype, avoid_band=True)
    _, grads = run(x, shape, dtype, lo, hi, residuals, theta, axis, min_bits, grad_scale, v)
    assert_grads_match(grads, oracle.gradients(v, x, lo, hi, residuals, theta, min_bits, grad_scale), dtype)


@settings(max_examples=30, **PROPERTY_SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(0, 8), n=st.integers(1, 300))
def test_property_uniform_levels_are_monotone_idempotent_and_few(seed, bits, n):
    """With r = 0 (uniform mid-rise grid): x ↦ x_q is non-decreasing, takes at most 2^b values, each
    within [lo − Δ/2, hi + Δ/2], and quantizing a level gives the same level back."""
    rng = np.random.default_rng(seed)
    lo, hi = make_range(rng, "affine", 1, bits)
    x = np.sort(lo[0] + (hi - lo)[0] * rng.uniform(-0.3, 1.3, n)).astype(np.float32)
    theta, residuals = oracle.graded_logits(bits), np.zeros((1, oracle.CELLS))
    values, _ = run(x[None], (n,), torch.float32, lo, hi, residuals, theta, None, 0)
    assert (np.diff(values[0]) >= 0).all()
    assert len(np.unique(values)) <= 2**bits
    half_step = (hi - lo)[0] / oracle.N / 2
    assert values.min() >= lo[0] - half_step * (1 + 1e-5) and values.max() <= hi[0] + half_step * (1 + 1e-5)
    again, _ = run(values.astype(np.float32), (n,), torch.float32, lo, hi, residuals, theta, None, 0)
    np.testing.assert_array_equal(again, values)
