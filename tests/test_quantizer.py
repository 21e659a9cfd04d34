"""`DDQQuantizer` against DDQ_SPEC.md §2–3: range modes, initialisation, bitwidth, gradients through
the range parametrisation (α, h, lo/hi), state_dict and the learn_bits / learn_levels switches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import spec_oracle as oracle
import torch

from ddq.nn import DDQLinear
from ddq.quantizer import DDQQuantizer, graded_gate_logits

GRAD_RTOL = 2e-5  # as in test_functional: float32 sums of a few thousand terms, relative to Σ|term|


def numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def initialised(mode: str, channels, init_bits: int, min_bits: int = 1, seed: int = 0, **kwargs) -> DDQQuantizer:
    """A quantizer initialised on a random first batch (per channel: rows of different scales)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (channels or 1, 40)
    first = torch.randn(shape, generator=generator) * torch.linspace(0.5, 2.0, shape[0])[:, None]
    if mode == "unsigned":
        first = first.abs()
    quantizer = DDQQuantizer(mode, channels=channels, init_bits=init_bits, min_bits=min_bits, **kwargs)
    quantizer(first if channels else first.reshape(-1))
    return quantizer


@pytest.mark.parametrize("init_bits", range(oracle.K + 1))
def test_graded_gate_logits_and_initial_bitwidth(init_bits):
    """θ_k = θ0·(init_bits + 1 − k) for k ≤ init_bits, −θ0·(k − init_bits) above; b = init_bits for
    every min_bits ≤ init_bits."""
    np.testing.assert_allclose(numpy(graded_gate_logits(init_bits)), oracle.graded_logits(init_bits), rtol=0, atol=0)
    for min_bits in range(init_bits + 1):
        quantizer = DDQQuantizer("symmetric", init_bits=init_bits, min_bits=min_bits)
        assert quantizer.bits == init_bits == int(quantizer.bits_tensor())
        assert f"bits={init_bits}" in repr(quantizer)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_per_channel_symmetric_initialises_alpha_to_max_abs(dtype):
    w = torch.randn(6, 3, 3, 3).to(dtype) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    quantizer = DDQQuantizer("symmetric", channels=6, init_bits=4, range_init="spec")
    quantizer(w)
    want = w.float().abs().amax(dim=(1, 2, 3))
    assert torch.equal(quantizer.range_top.detach(), want)
    lo, hi = quantizer.range()
    assert torch.equal(hi.detach(), want) and torch.equal(lo.detach(), -want)


@pytest.mark.parametrize("mode,channels", (("symmetric", 5), ("unsigned", None), ("symmetric", None), ("affine", 5)))
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_mse_range_init_picks_the_least_error_fraction_of_the_spec_range(mode, channels, bits):
    """range_init="mse": each group's range is f·(the spec's range) with f from RANGE_SEARCH_FRACTIONS
    minimising the squared quantization error at init_bits (checked against every candidate)."""
    from ddq.quantizer import RANGE_SEARCH_FRACTIONS

    torch.manual_seed(bits)
    x = torch.randn(5, 200) * torch.linspace(0.5, 2, 5)[:, None]
    if mode == "unsigned":
        x = x.relu()
    spec = DDQQuantizer(mode, channels=channels, init_bits=bits, learn_bits=False, range_init="spec")
    mse = DDQQuantizer(mode, channels=channels, init_bits=bits, learn_bits=False)
    spec(x)
    mse(x)
    groups = x.reshape(spec.groups, -1)

    def errors(quantizer):
        return (quantizer(x).detach().reshape(spec.groups, -1) - groups).square().sum(dim=1)

    best = errors(mse)
    for fraction in RANGE_SEARCH_FRACTIONS.tolist():
        candidate = DDQQuantizer(mode, channels=channels, init_bits=bits, learn_bits=False, range_init="spec")
        candidate(x)
        with torch.no_grad():
            candidate.range_top.mul_(fraction)
            candidate.range_bottom.mul_(fraction)
        assert (best <= errors(candidate) * (1 + 1e-5) + 1e-6).all()
    ratio = mse.range_top.detach().abs() / spec.range_top.detach().abs()
    assert ((ratio >= RANGE_SEARCH_FRACTIONS[0] - 1e-6) & (ratio <= 1 + 1e-6)).all()
    if bits == 2 and mode == "symmetric" and channels:
        assert (ratio < 0.9).all()  # at 2 bits the max|w| grid wastes its levels on the tails


def test_range_init_is_validated():
    with pytest.raises(ValueError, match="range_init"):
        DDQQuantizer(range_init="max")


def test_max_bits_holds_gates_above_it_closed():
    """max_bits caps the bitwidth: the gates above it are constant closed (no gradient), also when their
    logits say open, so a learned-bit quantizer never exceeds it."""
    quantizer = DDQQuantizer("symmetric", channels=3, init_bits=7, max_bits=7)
    with torch.no_grad():
        quantizer.gate_logits.fill_(1.0)
    assert quantizer.bits == 7
    x = torch.randn(3, 40)
    quantizer(x).square().sum().backward()
    assert quantizer.gate_logits.grad[7] == 0
    with pytest.raises(ValueError, match="init_bits"):
        DDQQuantizer(init_bits=8, max_bits=7)
    with pytest.raises(ValueError, match="max_bits"):
        DDQQuantizer(min_bits=4, init_bits=4, max_bits=3)


def test_per_channel_unsigned_and_affine_initialise_to_the_channel_extremes():
    """Spec reading (the spec only states the symmetric weight rule): per channel, unsigned h = max x and
    affine [lo, hi] = [min x, max x], so nothing of the first batch clips."""
    x = torch.randn(5, 17) + torch.arange(5)[:, None]
    affine = DDQQuantizer("affine", channels=5)
    affine(x)
    assert torch.equal(affine.range_bottom.detach(), x.amin(dim=1))
    assert torch.equal(affine.range_top.detach(), x.amax(dim=1))
    unsigned = DDQQuantizer("unsigned", channels=5)
    unsigned(x.abs())
    assert torch.equal(unsigned.range_top.detach(), x.abs().amax(dim=1))


def percentile_bounds(values: np.ndarray, q: float) -> tuple[float, float]:
    return np.percentile(values, q, method="lower"), np.percentile(values, q, method="higher")


@pytest.mark.parametrize("mode", ("symmetric", "unsigned", "affine"))
def test_per_tensor_initialises_from_percentiles(mode):
    """Activations: h (or hi, or α from |x|) = the 99.9th percentile of the first batch, lo (affine) the
    0.1th; any value between the order statistics around the percentile is the percentile."""
    x = torch.randn(4, 1250) * 2 + (3.0 if mode == "unsigned" else 0.5)
    if mode == "unsigned":
        x = x.clamp_min(0)
    quantizer = DDQQuantizer(mode, init_bits=8)
    quantizer(x)
    values = x.reshape(-1).double().numpy()
    top = quantizer.range_top.item()
    low, high = percentile_bounds(np.abs(values) if mode == "symmetric" else values, 99.9)
    assert low <= top <= high and top < values.max()
    if mode == "affine":
        low, high = percentile_bounds(values, 0.1)
        assert low <= quantizer.range_bottom.item() <= high


def test_mostly_zero_activations_take_the_max_as_top():
    """A ReLU output that is 0 above the 99.9th percentile would get h = 0: the max is used instead."""
    x = torch.zeros(10000)
    x[:5] = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    quantizer = DDQQuantizer("unsigned", init_bits=4)
    quantizer(x)
    assert quantizer.range_top.item() == 4.0


@pytest.mark.parametrize("negative, want", [(False, "unsigned"), (True, "symmetric")])
def test_auto_mode_resolves_on_the_first_batch(negative, want):
    x = torch.rand(50) - (0.5 if negative else 0.0)
    quantizer = DDQQuantizer("auto", init_bits=4)
    assert not quantizer.range_bottom.requires_grad
    quantizer(x)
    assert quantizer.mode == want
    assert not quantizer.range_bottom.requires_grad


@pytest.mark.parametrize("bits", range(1, oracle.K + 1))
def test_unsigned_levels_are_multiples_of_the_top_level(bits):
    """Unsigned mode: the levels are {c·h/(2^b − 1)}, 0 is a level (x = 0 quantizes to it) and h is the
    top one. Float32 puts them within 1e-6·h of the exact values (the spec allows last-ulp differences:
    the zero level is lo + Δ·(s − 1)/2 and may come out as ±1e-8·h, not as bit-exact 0)."""
    quantizer = initialised("unsigned", None, bits, min_bits=1, seed=bits)
    h = quantizer.range_top.item()
    exact = np.arange(2**bits) * h / (2**bits - 1)
    np.testing.assert_allclose(numpy(quantizer.levels())[0], exact, rtol=0, atol=1e-6 * h)
    lo, hi = quantizer.range()
    want_lo, want_hi = oracle.mode_range("unsigned", [h], None, bits)
    np.testing.assert_allclose([lo.item(), hi.item()], [want_lo[0], want_hi[0]], rtol=1e-6, atol=1e-12)
    points = torch.tensor([0.0, h, 2 * h, -h])
    assert quantizer.codes(points).tolist() == [0, 2**bits - 1, 2**bits - 1, 0]
    out = quantizer(points)
    assert abs(out[0].item()) <= 1e-6 * h and out[3].item() == out[0].item()
    assert out[1].item() == pytest.approx(h, rel=1e-6) and out[2].item() == out[1].item()


@pytest.mark.parametrize("channels", (None, 3), ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("mode", ("symmetric", "unsigned", "affine"))
@pytest.mark.parametrize("bits", (1, 2, 4, 7, 8))
def test_module_gradients_follow_the_range_parametrisation(bits, mode, channels):
    """Through the module: ∂α = ∂hi − ∂lo (symmetric), ∂h = b_s·∂hi − a_s·∂lo (unsigned), ∂lo and ∂hi
    directly (affine), with the LSQ scale; residual and logit gradients as the oracle says."""
    quantizer = initialised(mode, channels, bits, min_bits=1, seed=bits)
    groups = quantizer.groups
    rng = np.random.default_rng(bits)
    with torch.no_grad():
        quantizer.residuals.copy_(torch.from_numpy(rng.normal(0, 0.3, (groups, 256))))
    lo, hi = (numpy(t) for t in quantizer.range())
    top = numpy(quantizer.range_top)
    want_lo, want_hi = oracle.mode_range(mode, top, numpy(quantizer.range_bottom), bits)
    np.testing.assert_allclose(lo, want_lo, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-6)

    x = oracle.sample_x(rng, lo, hi, 45)
    v = rng.normal(size=x.shape)
    shape = (45,) if channels is None else (groups, 45)
    out = quantizer(torch.tensor(x, dtype=torch.float32).reshape(shape))
    out.backward(torch.tensor(v, dtype=torch.float32).reshape(shape))
    residuals, theta = numpy(quantizer.effective_residuals().detach()), numpy(quantizer.gate_logits)
    expected = oracle.gradients(v, x, lo, hi, residuals, theta, 1, grad_scale=True)
    dresiduals = expected.dresiduals
    if mode == "unsigned":
        # The unsigned module removes code 0's block mean from the residuals (0 stays a level), so the
        # gradient reaching the stored residuals is the oracle's with its block-0 mean removed too.
        block0 = slice(0, 2 ** (8 - bits))
        dresiduals = dresiduals.copy()
        dresiduals[:, block0] -= dresiduals[:, block0].mean(axis=1, keepdims=True)

    if mode == "symmetric":
        chain = {"range_top": (expected.dhi - expected.dlo, expected.dhi_scale + expected.dlo_scale)}
    elif mode == "unsigned":
        a_s, b_s = oracle.unsigned_coefficients(bits)
        chain = {"range_top": (b_s * expected.dhi - a_s * expected.dlo, b_s * expected.dhi_scale + a_s * expected.dlo_scale)}
    else:
        chain = {"range_top": (expected.dhi, expected.dhi_scale), "range_bottom": (expected.dlo, expected.dlo_scale)}
    chain["residuals"] = (dresiduals, expected.dresiduals_scale)
    chain["gate_logits"] = (expected.dtheta, expected.dtheta_scale)
    for name, (want, scale) in chain.items():
        got = numpy(getattr(quantizer, name).grad)
        assert (np.abs(got - want) <= GRAD_RTOL * scale + 1e-12).all(), f"{name}: got {got}, want {want}"
    if mode != "affine":
        assert quantizer.range_bottom.grad is None


@pytest.mark.parametrize("mode", ("symmetric", "unsigned", "affine"))
@pytest.mark.parametrize("bits", (1, 3, 8))
def test_levels_and_codes_match_spec(mode, bits):
    quantizer = initialised(mode, 4, bits, seed=bits)
    rng = np.random.default_rng(bits)
    with torch.no_grad():
        quantizer.residuals.copy_(torch.from_numpy(rng.normal(0, 0.3, (4, 256))))
    lo, hi = (numpy(t) for t in quantizer.range())
    residuals = numpy(quantizer.effective_residuals().detach())
    block_starts = np.tile(np.arange(0, 256, 2 ** (8 - bits)), (4, 1))
    want_levels = oracle.quantize_index(block_starts, lo, hi, residuals, bits)[2]
    np.testing.assert_allclose(numpy(quantizer.levels()), want_levels, rtol=0, atol=1e-6 * np.abs(hi - lo).max())
    x = oracle.sample_x(rng, lo, hi, 33)
    codes = quantizer.codes(torch.tensor(x, dtype=torch.float32))
    assert codes.dtype == torch.uint8
    np.testing.assert_array_equal(codes.numpy(), oracle.quantize(x, lo, hi, residuals, numpy(quantizer.gate_logits), 1).c)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_unsigned_zero_stays_a_level_with_learned_residuals(bits):
    """Spec §2: 0 is a level of the unsigned grid; the module keeps it one when residuals are learned."""
    quantizer = initialised("unsigned", None, bits, min_bits=1, seed=bits)
    with torch.no_grad():
        quantizer.residuals.copy_(torch.randn(1, 256))
    levels = numpy(quantizer.levels())
    assert abs(levels[0, 0]) <= 1e-6 * quantizer.range_top.item()
    assert quantizer(torch.zeros(5)).abs().max().item() <= 1e-6 * quantizer.range_top.item()
    effective = numpy(quantizer.effective_residuals().detach())
    np.testing.assert_array_equal(effective[:, 2 ** (8 - bits):], numpy(quantizer.residuals)[:, 2 ** (8 - bits):])


def test_affine_range_keeps_hi_above_lo_far_from_zero():
    """A collapsed affine range at |lo| ≫ 1 must still give hi > lo (an absolute 1e-8 floor vanishes
    in float32 there) so that the forward never hits the op's hi <= lo error."""
    x = torch.full((3, 8), 1000.0)
    quantizer = DDQQuantizer("affine", channels=3, init_bits=4)
    out = quantizer(x)
    lo, hi = quantizer.range()
    assert (hi > lo).all() and torch.isfinite(out).all()
    with torch.no_grad():
        quantizer.range_top.fill_(-5e6)
        quantizer.range_bottom.fill_(-5e6)
    lo, hi = quantizer.range()
    assert (hi > lo).all()
    quantizer(x)


@pytest.mark.parametrize("mode", ("auto", "symmetric", "affine"))
def test_state_dict_round_trip(mode):
    """Mode (with 'auto' resolved), the initialised flag and every parameter survive state_dict and
    torch.save/load; the loaded quantizer does not re-initialise on its next batch."""
    source = DDQQuantizer(mode, init_bits=5, min_bits=2)
    source(torch.rand(64) * 3)
    with torch.no_grad():
        source.residuals.normal_(0, 0.2)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = DDQQuantizer(mode, init_bits=8, min_bits=2)
    target.load_state_dict(torch.load(buffer))
    assert target.mode == source.mode == ("unsigned" if mode == "auto" else mode)
    assert target._initialized and bool(target.initialized)
    assert target.range_bottom.requires_grad == (target.mode == "affine")
    assert target.bits == 5
    x = torch.randn(100) * 10
    assert torch.equal(target(x), source(x))
    assert torch.equal(target.range_top, source.range_top)


def test_loading_an_uninitialised_state_makes_the_quantizer_initialise_again():
    fresh = DDQQuantizer("auto")
    used = DDQQuantizer("auto")
    used(torch.rand(10))
    used.load_state_dict(fresh.state_dict())
    assert not used._initialized and used.mode == "auto"
    used(-torch.rand(10))
    assert used.mode == "symmetric"


def test_a_quantizer_in_a_different_mode_takes_the_saved_mode():
    source = DDQQuantizer("affine")
    source(torch.randn(20))
    target = DDQQuantizer("symmetric")
    target.load_state_dict(source.state_dict())
    assert target.mode == "affine" and target.range_bottom.requires_grad


def test_learn_bits_false_freezes_the_bitwidth():
    quantizer = initialised("symmetric", 2, 3, min_bits=2, learn_bits=False)
    assert not quantizer.gate_logits.requires_grad
    assert all(p is not quantizer.gate_logits for p in quantizer.parameters() if p.requires_grad)
    quantizer(torch.randn(2, 10)).sum().backward()
    assert quantizer.gate_logits.grad is None and quantizer.residuals.grad is not None
    assert quantizer.bits == 3


def test_learn_levels_false_keeps_levels_uniform():
    quantizer = initialised("symmetric", None, 3, learn_levels=False)
    assert not quantizer.residuals.requires_grad
    quantizer(torch.randn(30)).sum().backward()
    assert quantizer.residuals.grad is None and quantizer.gate_logits.grad is not None
    assert torch.equal(quantizer.residuals, torch.zeros(1, 256))
    levels = quantizer.levels()[0].double()
    steps = levels.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, steps.mean().item()), rtol=1e-5, atol=0)


def test_initialisation_happens_once():
    quantizer = DDQQuantizer("symmetric", init_bits=4)
    quantizer(torch.ones(10))
    quantizer(torch.full((10,), 100.0))
    assert quantizer.range_top.item() == 1.0


def test_parameters_stay_float32_when_the_model_is_cast():
    """Spec §2 computes in float32: casting a model (or converting a bf16 layer) moves the quantizer's
    parameters but keeps them float32, and a bf16 input still comes out bf16."""
    quantizer = DDQQuantizer("symmetric", channels=3).to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in quantizer.parameters())
    out = quantizer(torch.randn(3, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    layer = DDQLinear.from_float(torch.nn.Linear(4, 3).to(torch.bfloat16))
    assert layer.weight.dtype == torch.bfloat16 and layer.weight_quantizer.range_top.dtype == torch.float32
    layer(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    assert layer.weight_quantizer.range_top.grad.dtype == torch.float32
    assert layer.half().input_quantizer.residuals.dtype == torch.float32


def test_a_cast_leaves_the_parameters_values_untouched():
    """A cast that rounded the parameters to bf16 or fp16 and back would move the learned range and levels, and
    overflow a range above fp16's 65504 to inf."""
    quantizer = DDQQuantizer("unsigned", init_bits=4)
    quantizer(torch.rand(1000) * 1e5)
    with torch.no_grad():
        quantizer.residuals.uniform_(-0.3, 0.3)
    quantizer(torch.rand(1000) * 1e5).sum().backward()
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in quantizer.named_parameters() if p.grad is not None}
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        quantizer.to(dtype)
        for name, p in quantizer.named_parameters():
            if name in before:
                assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
                assert torch.equal(p.detach(), before[name][0]) and torch.equal(p.grad, before[name][1]), (dtype, name)
    assert torch.isfinite(quantizer(torch.rand(4, dtype=torch.float16))).all()


def test_codes_check_x_as_forward_does():
    quantizer = DDQQuantizer("symmetric", channels=4, init_bits=3)
    quantizer(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"lo must have shape \(2,\)"):
        quantizer.codes(torch.randn(2, 16))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantizer.codes(torch.tensor([[1.0], [float("nan")], [0.0], [float("inf")]]))
    assert quantizer.codes(torch.zeros(4, 3)).dtype == torch.uint8
