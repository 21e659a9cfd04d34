"""Random quantizer parameters and inputs shared by the kernel tests (tests/test_kernels_*.py).

Kernels run on CUDA when present, else in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel module is imported). Inputs are fresh random draws; parameters cover
every range mode through (lo, hi) and every bitwidth through the gate logits.
"""

from __future__ import annotations

import numpy as np
import torch

from ddq import quantizer_math as qm
from spec_oracle import boundary_band

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def logits_for_bits(bits: int, min_bits: int) -> torch.Tensor:
    """Gate logits whose bitwidth is `bits` (≥ min_bits), with closed gates above it randomly signed."""
    k = torch.arange(qm.FINEST_BITS)
    logits = torch.where(k < bits, torch.rand(8) + 0.1, -torch.rand(8) - 0.1)
    if bits < qm.FINEST_BITS:
        # Gates above the first closed one may be open: the nesting must still stop at `bits`.
        logits[bits + 1:] = torch.randn(qm.FINEST_BITS - bits - 1)
    return logits


def range_for_mode(mode: str, groups: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) as the quantizer's `range()` would give them in `mode` (spec §2)."""
    top = torch.rand(groups) * 2 + 0.5
    if mode == "symmetric":
        return -top, top
    if mode == "unsigned":
        a_s, b_s = qm.unsigned_range_coefficients(torch.tensor(bits))
        return -a_s * top, b_s * top
    bottom = torch.randn(groups)
    return bottom, bottom + top


def quantizer_params(mode: str, groups: int, bits: int, min_bits: int, device: str = DEVICE):
    lo, hi = range_for_mode(mode, groups, bits)
    residuals = torch.randn(groups, qm.FINE_CELLS) * 0.3
    logits = logits_for_bits(bits, min_bits)
    return tuple(t.to(device) for t in (lo, hi, residuals, logits))


def sample_input(shape, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype, groups: int) -> torch.Tensor:
    """x whose u = (x − lo)/Δ spans [−40, 295] (clipping on both sides); tests add non-finite values themselves."""
    n = int(np.prod(shape)) // groups
    span = torch.rand(groups, n, dtype=torch.float64) * 335 - 40
    delta = (hi.double().cpu() - lo.double().cpu()) / qm.FINE_MAX
    x = (lo.double().cpu()[:, None] + delta[:, None] * span).reshape(shape)
    return x.to(dtype).to(lo.device)


def ambiguous(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Elements whose float64 u lies within the oracle's band of a rounding or clipping boundary."""
    groups = lo.shape[0]
    x64 = x.detach().double().cpu().reshape(groups, -1).numpy()
    lo64, hi64 = lo.double().cpu().numpy()[:, None], hi.double().cpu().numpy()[:, None]
    u = (x64 - lo64) / ((hi64 - lo64) / qm.FINE_MAX)
    return torch.from_numpy(boundary_band(u)).reshape(x.shape)


def clear_of_boundaries(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x with its ambiguous elements moved far above the range (clipped beyond doubt, in any dtype).

    Gradient comparisons need this: an element on a boundary may take the neighbouring cell in one
    arithmetic order, which moves every gradient that sums over it by a whole level step.
    """
    groups = lo.shape[0]
    far = (hi + (hi - lo)).to(x.dtype).reshape(groups, 1)
    cleared = torch.where(ambiguous(x, lo, hi).to(x.device).reshape(groups, -1), far, x.reshape(groups, -1))
    cleared = cleared.reshape(x.shape)
    assert not ambiguous(cleared, lo, hi).any()
    return cleared


def on_cpu(args):
    """A call's arguments with every tensor moved to the CPU (for the reference bodies)."""
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def levels_differ(got: torch.Tensor, want: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Elements whose quantized values differ by more than rounding.

    Rounding here is one unit in the last place of a 16-bit dtype, or 16 float32 ulp (the level table
    sums residual blocks in another order, spec §2 allows it), both at the scale of the range
    max(|lo|, |hi|): a level is lo + Δ·T, so a level near 0 carries the rounding of lo and Δ·T. A wrong
    fine cell moves a value by a whole level step, far more than that.
    """
    got, want = got.cpu(), want.cpu()
    rtol = 16 * torch.finfo(torch.float32).eps if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
    scale = float(torch.maximum(lo.abs().max(), hi.abs().max()))
    same = torch.isclose(got.float(), want.float(), rtol=rtol, atol=rtol * scale) | (got.isnan() & want.isnan())
    return ~same


def layer_output_and_grads(layer: torch.nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, dict]:
    """forward(x) on a fresh leaf copy of x, then the gradient of a fixed weighted sum of the output:
    (output, {"x": ∂x, parameter name: its gradient}) for comparing two ways of computing one layer."""
    x = x.detach().requires_grad_()
    layer.zero_grad()
    y = forward(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y)).sum().backward()
    grads = {"x": x.grad.clone()}
    grads.update({name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None})
    return y.detach(), grads
