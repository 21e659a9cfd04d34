"""The DDQ quantizer's math on small per-group tables (DDQ_SPEC.md Sections 2 and 3).

Everything here works on tensors of shape (G,), (G, 256) or (8,): the quantizer's parameters and the
per-group reductions of a tensor. The element-wise passes over a tensor live in `ddq.functional`
(reference) and `ddq_kernels` (Triton); both share these functions to turn parameters into level
tables and reductions into parameter gradients, so the two paths cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

FINEST_BITS = 8
FINE_CELLS = 2**FINEST_BITS
FINE_MAX = FINE_CELLS - 1


def hard_gates(gate_logits: Tensor, min_bits: int) -> Tensor:
    """Spec §2: h_k = 1[θ_k > 0], forced to 1 for k ≤ min_bits. Float32 (8,) on the logits' device."""
    forced = torch.arange(FINEST_BITS, device=gate_logits.device) < min_bits
    return ((gate_logits > 0) | forced).to(torch.float32)


def nested_gates(gate_logits: Tensor, min_bits: int) -> Tensor:
    """Spec §2: g_k = h_1·…·h_k, so the kept factors are always the most significant ones."""
    return torch.cumprod(hard_gates(gate_logits, min_bits), dim=0)


def bitwidth(gate_logits: Tensor, min_bits: int) -> Tensor:
    """Spec §2: b = Σ g_k, as a 0-d int64 tensor (no host sync)."""
    return nested_gates(gate_logits, min_bits).sum().to(torch.int64)


def bitwidth_int(gate_logits: Tensor, min_bits: int) -> int:
    """The bitwidth as a Python int (syncs on GPU)."""
    return int(bitwidth(gate_logits, min_bits).item())


def fine_index(x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Spec §2 step 1 for x viewed as (G, n): returns (u float32, i int64 in [0, 255]).

    Non-finite x gets i = 0 so that no gather goes out of bounds; callers turn its output into NaN.
    """
    lo32 = lo.to(torch.float32)[:, None]
    delta = (hi.to(torch.float32)[:, None] - lo32) / FINE_MAX
    u = (x.to(torch.float32) - lo32) / delta
    i = torch.floor(u + 0.5).clamp_(0, FINE_MAX).nan_to_num_(nan=0.0)
    return u, i.to(torch.int64)


def round_half_away(x: Tensor) -> Tensor:
    """Spec §5's rounding of level tables, half away from zero, exact in x's float dtype: floor(|x| + 0.5)
    would round the sum first (0.49999997 + 0.5 is 1.0 in float32), |x| − floor(|x|) cannot round."""
    magnitude = x.abs()
    whole = torch.floor(magnitude)
    return torch.sign(x) * (whole + (magnitude - whole >= 0.5).to(x.dtype))


def block_positions(residuals: Tensor, bits: int) -> Tensor:
    """Spec §2 step 3 as a (G, 2^b) table: T_c = c·s + (s − 1)/2 + s·mean(r[c·s:(c+1)·s])."""
    block = 2 ** (FINEST_BITS - bits)
    groups = residuals.shape[0]
    code = torch.arange(2**bits, device=residuals.device, dtype=torch.float32)
    mean_residual = residuals.to(torch.float32).reshape(groups, 2**bits, block).mean(dim=2)
    return code * block + (block - 1) / 2 + block * mean_residual


def block_levels(lo: Tensor, hi: Tensor, residuals: Tensor, bits: int) -> Tensor:
    """Spec §2 step 4 per code: the (G, 2^b) block-mean levels V = lo + Δ·T."""
    delta = (hi.to(torch.float32) - lo.to(torch.float32)) / FINE_MAX
    return lo.to(torch.float32)[:, None] + delta[:, None] * block_positions(residuals, bits)


def fine_table(per_code: Tensor, bits: int) -> Tensor:
    """Expand a (G, 2^b) per-code table to the (G, 256) per-fine-cell table (cell i → code i >> (8 − b))."""
    return per_code.repeat_interleave(2 ** (FINEST_BITS - bits), dim=1)


def fine_levels(lo: Tensor, hi: Tensor, residuals: Tensor, bits: int) -> Tensor:
    """Spec §2: the un-merged fine levels q_i = lo + Δ·(i + s·r_i) at the current block size s."""
    block = 2 ** (FINEST_BITS - bits)
    delta = (hi.to(torch.float32) - lo.to(torch.float32)) / FINE_MAX
    cell = torch.arange(FINE_CELLS, device=residuals.device, dtype=torch.float32)
    return lo.to(torch.float32)[:, None] + delta[:, None] * (cell + block * residuals.to(torch.float32))


def merged_levels(q: Tensor, kept: list[bool]) -> Tensor:
    """The Kronecker form qᵀ·ZU(g) for binary gates `kept` (factor 1 first), as a (G, 256) table.

    Factor k of ZU(g) is I₂ when kept[k] else ½·11ᵀ: the level of cell i is the mean of q_j over the
    cells j that agree with i on every kept bit. Computed as a mean over the merged bit axes.
    """
    groups = q.shape[0]
    cube = q.reshape(groups, *([2] * FINEST_BITS))
    merged_axes = [k + 1 for k, keep in enumerate(kept) if not keep]
    if merged_axes:
        cube = cube.mean(dim=merged_axes, keepdim=True).expand(groups, *([2] * FINEST_BITS))
    return cube.reshape(groups, FINE_CELLS)


def unsigned_range_coefficients(bits: Tensor) -> tuple[Tensor, Tensor]:
    """Spec §2 `unsigned` mode: (a_s, b_s) with lo = −a_s·h, hi = b_s·h, s = 2^(8−b); needs b ≥ 1."""
    block = torch.pow(2.0, (FINEST_BITS - bits).to(torch.float32))
    a_s = (block - 1) / (2 * (FINE_CELLS - block))
    b_s = (FINE_MAX - (block - 1) / 2) / (FINE_CELLS - block)
    return a_s, b_s


# How a custom op reads a quantizer's two range parameters (bottom, top); the index is the op's mode code.
# "bounds" takes them as lo and hi themselves; the others are `DDQQuantizer`'s modes.
RANGE_PARAMETERIZATIONS = ("bounds", "symmetric", "unsigned", "affine")
BOUNDS, SYMMETRIC, UNSIGNED, AFFINE = range(4)
MIN_RANGE = 1e-8
AFFINE_MIN_RELATIVE_WIDTH = 2.0**-16


def range_bounds(mode: int, bottom: Tensor, top: Tensor, bits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Spec §2: (lo, hi) of the fine grid from the range parameters in `RANGE_PARAMETERIZATIONS[mode]`.

    symmetric: ±max(|top|, MIN_RANGE). unsigned: (−a_s, b_s)·max(|top|, MIN_RANGE) with the coefficients of
    the current bitwidth `bits` (not differentiated). affine: lo = bottom and hi = lo + max(|top − lo|, w) with
    w = |lo|·2^−16 + MIN_RANGE (not differentiated): an absolute floor alone vanishes in lo + width once |lo| >
    ~0.1 in float32, leaving hi == lo. hi > lo in every mode, by construction.
    """
    if mode == BOUNDS:
        return bottom, top
    if mode == AFFINE:
        min_width = bottom.detach().abs() * AFFINE_MIN_RELATIVE_WIDTH + MIN_RANGE
        return bottom, bottom + torch.maximum((top - bottom).abs(), min_width)
    magnitude = top.abs().clamp_min(MIN_RANGE)
    if mode == SYMMETRIC:
        return -magnitude, magnitude
    if mode == UNSIGNED:
        a_s, b_s = unsigned_range_coefficients(bits.detach())
        return -a_s * magnitude, b_s * magnitude
    raise ValueError(f"range_bounds: mode must be one of 0..3 {RANGE_PARAMETERIZATIONS}, got {mode!r}")


def range_bounds_grads(mode: int, bottom: Tensor, top: Tensor, bits: Tensor | None, grad_lo: Tensor, grad_hi: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """(∂bottom, ∂top) from (∂lo, ∂hi) through `range_bounds`: the gradients autograd gives it (clamp_min
    passes where |top| ≥ MIN_RANGE, |·|' = sign, and torch.maximum splits a tie in halves)."""
    if mode == BOUNDS:
        return grad_lo, grad_hi
    if mode == AFFINE:
        difference = top - bottom
        min_width = bottom.abs() * AFFINE_MIN_RELATIVE_WIDTH + MIN_RANGE
        share = torch.where(difference.abs() > min_width, 1.0, torch.where(difference.abs() == min_width, 0.5, 0.0))
        grad_top = grad_hi * share * torch.sign(difference)
        return grad_lo + grad_hi - grad_top, grad_top
    if mode == SYMMETRIC:
        grad_magnitude = grad_hi - grad_lo
    else:
        a_s, b_s = unsigned_range_coefficients(bits)
        grad_magnitude = grad_lo * -a_s + grad_hi * b_s
    passes = top.abs() >= MIN_RANGE
    return torch.zeros_like(grad_lo), torch.where(passes, grad_magnitude, 0.0) * torch.sign(top)


def range_grad_scale(numel_per_group: int, bits: int) -> float:
    """Spec §3: LSQ's gradient scale 1/√(numel_g · max(2^b − 1, 1)) for range parameters.

    An empty group (numel_g = 0) has zero range gradients; it is scaled as if it had one element.
    """
    return (max(numel_per_group, 1) * max(2**bits - 1, 1)) ** -0.5


def gate_logit_grads(gate_grads: Tensor, gate_logits: Tensor, min_bits: int) -> Tensor:
    """Spec §3: ∂L/∂θ_j = Σ_{k ≥ j} ∂L/∂g_k · Π_{l ≤ k, l ≠ j} h_l for free gates, 0 for forced ones."""
    hard = hard_gates(gate_logits, min_bits).to(gate_grads.dtype)
    grads = torch.zeros_like(gate_grads)
    for j in range(min_bits, FINEST_BITS):
        others = hard.clone()
        others[j] = 1.0
        prefix_without_j = torch.cumprod(others, dim=0)
        grads[j] = (gate_grads[j:] * prefix_without_j[j:]).sum()
    return grads


def gate_grads_from_histogram(histogram: Tensor, q: Tensor, bits: int) -> Tensor:
    """Spec §3: ∂L/∂g_k = Σ_{g,i} H[g, i]·(x_q|g_k=1 − x_q|g_k=0)(i), each side in the Kronecker form.

    `histogram` is the (G, 256) sum of v per fine cell; `q` the fine levels at the current block size.
    """
    kept_now = [k < bits for k in range(FINEST_BITS)]
    grads = []
    for k in range(FINEST_BITS):
        with_k = merged_levels(q, [keep or j == k for j, keep in enumerate(kept_now)])
        without_k = merged_levels(q, [keep and j != k for j, keep in enumerate(kept_now)])
        grads.append((histogram.to(torch.float32) * (with_k - without_k)).sum())
    return torch.stack(grads)


def parameter_grads(
    histogram: Tensor,
    sum_vu_inside: Tensor,
    sum_v_clipped: Tensor,
    lo: Tensor,
    hi: Tensor,
    residuals: Tensor,
    gate_logits: Tensor,
    min_bits: int,
    grad_scale: bool,
    numel_per_group: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Spec §3 from the per-group reductions of one tensor to (∂lo, ∂hi, ∂residuals, ∂θ).

    histogram: (G, 256) Σ v per fine cell; sum_vu_inside: (G,) Σ v·u over in-range elements;
    sum_v_clipped: (G,) Σ v over clipped elements. With ΣvT = Σ_i H_i·T_i over all elements:
    ∂hi = (ΣvT − Σvu·in)/N and ∂lo = (Σvu·in − ΣvT + N·Σv·(1 − in))/N.
    """
    bits = bitwidth_int(gate_logits, min_bits)
    histogram = histogram.to(torch.float32)
    positions = fine_table(block_positions(residuals, bits), bits)
    sum_vt = (histogram * positions).sum(dim=1)
    grad_hi = (sum_vt - sum_vu_inside) / FINE_MAX
    grad_lo = (sum_vu_inside - sum_vt + FINE_MAX * sum_v_clipped) / FINE_MAX
    if grad_scale:
        scale = range_grad_scale(numel_per_group, bits)
        grad_lo, grad_hi = grad_lo * scale, grad_hi * scale

    delta = (hi.to(torch.float32) - lo.to(torch.float32)) / FINE_MAX
    per_code = histogram.reshape(histogram.shape[0], 2**bits, 2 ** (FINEST_BITS - bits)).sum(dim=2)
    grad_residuals = delta[:, None] * fine_table(per_code, bits)

    q = fine_levels(lo, hi, residuals, bits)
    grad_gates = gate_grads_from_histogram(histogram, q, bits)
    grad_logits = gate_logit_grads(grad_gates, gate_logits, min_bits)
    return grad_lo, grad_hi, grad_residuals, grad_logits
