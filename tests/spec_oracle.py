"""A deliberately naive float64 implementation of DDQ_SPEC.md Sections 2 and 3: the tests' oracle.

Independent of `ddq.quantizer_math` on purpose (it imports nothing from `ddq`): every formula is written
out again from the spec, element by element, in float64 NumPy. The gate gradients use the spec's
explicit 256×256 matrix ZU(g) = ⊗_k (g_k·I₂ + (1 − g_k)·½·1₂1₂ᵀ) built with numpy.kron — far too slow
for a kernel, fine for an oracle.

Arrays are per group: x, v of shape (G, n); lo, hi of shape (G,); residuals (G, 256); theta (8,).
The oracle computes u in float64 while the spec (and the code) round it in float32, so an element whose
u lies within BOUNDARY_BAND of a rounding or clipping boundary may legitimately land in the
neighbouring fine cell; `boundary_band` finds those, `sample_x` draws inputs that avoid them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K = 8
CELLS = 2**K
N = CELLS - 1
THETA0 = 0.25
# float32 u = (x − lo)/Δ carries ≲ 4 roundings of relative 2^-24 on |u| ≤ ~300, plus rounding u + 0.5:
# below 1e-4 in all (6.1e-5 was the largest seen over 4M random elements); 3e-4 leaves no doubt.
BOUNDARY_BAND = 3e-4


# Gates and bitwidth (spec §2)


def hard_gates(theta, min_bits: int) -> list[int]:
    """h_k = 1[θ_k > 0], forced to 1 for k ≤ min_bits (k = 1..8; list index k − 1)."""
    return [1 if (k <= min_bits or float(theta[k - 1]) > 0) else 0 for k in range(1, K + 1)]


def nested_gates(theta, min_bits: int) -> list[int]:
    """g_k = h_1·h_2·…·h_k."""
    hard = hard_gates(theta, min_bits)
    return [int(np.prod(hard[: k + 1])) for k in range(K)]


def bitwidth(theta, min_bits: int) -> int:
    return sum(nested_gates(theta, min_bits))


def graded_logits(init_bits: int) -> np.ndarray:
    """θ_k = θ0·(init_bits + 1 − k)² for k ≤ init_bits, −θ0·(k − init_bits) above (docs/method.md: the
    spec's linear grading, squared so that SGD still closes the finest gate first)."""
    return np.array(
        [THETA0 * (init_bits + 1 - k) ** 2 if k <= init_bits else -THETA0 * (k - init_bits) for k in range(1, K + 1)]
    )


def block_size(bits: int) -> int:
    return 2 ** (K - bits)


# Range (spec §2 modes)


def unsigned_coefficients(bits: int) -> tuple[float, float]:
    """(a_s, b_s) with lo = −a_s·h, hi = b_s·h."""
    s = block_size(bits)
    return (s - 1) / (2 * (256 - s)), (255 - (s - 1) / 2) / (256 - s)


def mode_range(mode: str, top, bottom, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of a quantizer in `mode` from its range parameters (α, h or hi; lo for affine)."""
    top = np.asarray(top, dtype=np.float64)
    if mode == "symmetric":
        return -top, top
    if mode == "unsigned":
        a_s, b_s = unsigned_coefficients(bits)
        return -a_s * top, b_s * top
    if mode == "affine":
        return np.asarray(bottom, dtype=np.float64), top
    raise ValueError(mode)


# Forward (spec §2 steps 1–4)


@dataclass
class Forward:
    u: np.ndarray  # (G, n) fine position
    i: np.ndarray  # (G, n) fine index
    inside: np.ndarray  # (G, n) 1[0 ≤ u ≤ N]
    c: np.ndarray  # (G, n) code
    t: np.ndarray  # (G, n) block-mean position T
    xq: np.ndarray  # (G, n) quantized value
    bits: int


def delta(lo, hi) -> np.ndarray:
    return (np.asarray(hi, np.float64) - np.asarray(lo, np.float64)) / N


def fine_position(x, lo, hi) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x - np.asarray(lo, np.float64)[:, None]) / delta(lo, hi)[:, None]


def block_mean_position(residuals_row: np.ndarray, code: int, bits: int) -> float:
    """T = c·s + (s − 1)/2 + s·mean(r[c·s : (c+1)·s])."""
    s = block_size(bits)
    return code * s + (s - 1) / 2 + s * float(np.mean(residuals_row[code * s : (code + 1) * s]))


def quantize_index(i: np.ndarray, lo, hi, residuals, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 2–4 from given fine indices: (c, T, x_q)."""
    residuals = np.asarray(residuals, np.float64)
    c = i >> (K - bits)
    t = np.empty(i.shape, np.float64)
    for g in range(i.shape[0]):
        for code in np.unique(c[g]):
            t[g][c[g] == code] = block_mean_position(residuals[g], int(code), bits)
    xq = np.asarray(lo, np.float64)[:, None] + delta(lo, hi)[:, None] * t
    return c, t, xq


def quantize(x, lo, hi, residuals, theta, min_bits: int) -> Forward:
    bits = bitwidth(theta, min_bits)
    u = fine_position(x, lo, hi)
    i = np.clip(np.floor(u + 0.5), 0, N).astype(np.int64)
    inside = ((u >= 0) & (u <= N)).astype(np.float64)
    c, t, xq = quantize_index(i, lo, hi, residuals, bits)
    return Forward(u=u, i=i, inside=inside, c=c, t=t, xq=xq, bits=bits)


def boundary_band(u: np.ndarray, band: float = BOUNDARY_BAND) -> np.ndarray:
    """Elements whose fine index or in-range flag depends on the last bits of u (never a non-finite u)."""
    with np.errstate(invalid="ignore"):
        to_rounding_edge = np.abs((u + 0.5) - np.round(u + 0.5))
        near = (to_rounding_edge < band) | (np.abs(u) < band) | (np.abs(u - N) < band)
    return near & np.isfinite(u)


def quantize_candidates(x, lo, hi, residuals, theta, min_bits: int, band: float = BOUNDARY_BAND):
    """The two admissible outputs (x_q for the fine index just below and just above the band)."""
    bits = bitwidth(theta, min_bits)
    u = fine_position(x, lo, hi)
    low = np.clip(np.floor(u + 0.5 - band), 0, N).astype(np.int64)
    high = np.clip(np.floor(u + 0.5 + band), 0, N).astype(np.int64)
    return quantize_index(low, lo, hi, residuals, bits)[2], quantize_index(high, lo, hi, residuals, bits)[2], low != high


# The Kronecker form (spec §1–2)


def zu_matrix(gates) -> np.ndarray:
    """ZU(g) = ⊗_{k=1..8} (g_k·I₂ + (1 − g_k)·½·1₂1₂ᵀ), factor 1 the most significant bit. 256×256."""
    matrix = np.ones((1, 1))
    for g in gates:
        factor = g * np.eye(2) + (1 - g) * 0.5 * np.ones((2, 2))
        matrix = np.kron(matrix, factor)
    return matrix


def fine_levels(lo, hi, residuals, bits: int) -> np.ndarray:
    """q_{g,i} = lo_g + Δ_g·(i + s·r_{g,i}), (G, 256)."""
    s = block_size(bits)
    cells = np.arange(CELLS, dtype=np.float64)
    return np.asarray(lo, np.float64)[:, None] + delta(lo, hi)[:, None] * (cells + s * np.asarray(residuals, np.float64))


def kronecker_levels(q: np.ndarray, gates) -> np.ndarray:
    """Row g, column i: q_gᵀ·ZU(g)·onehot(i)."""
    return q @ zu_matrix(gates)


# Gradients (spec §3)


@dataclass
class Gradients:
    dx: np.ndarray
    dlo: np.ndarray
    dhi: np.ndarray
    dresiduals: np.ndarray
    dgates: np.ndarray  # ∂L/∂g_k, (8,)
    dtheta: np.ndarray
    # Σ|term| of each sum: float32 results are compared to the oracle relative to these.
    dlo_scale: np.ndarray
    dhi_scale: np.ndarray
    dresiduals_scale: np.ndarray
    dgates_scale: np.ndarray
    dtheta_scale: np.ndarray


def range_grad_scale(numel_per_group: int, bits: int) -> float:
    return 1.0 / np.sqrt(max(numel_per_group, 1) * max(2**bits - 1, 1))


def gradients(v, x, lo, hi, residuals, theta, min_bits: int, grad_scale: bool) -> Gradients:
    v = np.asarray(v, np.float64)
    fwd = quantize(x, lo, hi, residuals, theta, min_bits)
    groups, n = fwd.u.shape
    bits, s, d = fwd.bits, block_size(fwd.bits), delta(lo, hi)

    dx = v * fwd.inside

    u_in = np.where(fwd.inside == 1, fwd.u, 0.0)
    dhi = np.sum(v * (fwd.t - u_in), axis=1) / N
    dlo = np.sum(v * ((fwd.u - fwd.t) * fwd.inside + (N - fwd.t) * (1 - fwd.inside)), axis=1) / N
    dhi_scale = np.sum(np.abs(v) * (np.abs(fwd.t) + np.abs(u_in)), axis=1) / N
    dlo_scale = np.sum(np.abs(v) * (np.abs(u_in) + np.abs(fwd.t) + N), axis=1) / N
    scale = range_grad_scale(n, bits) if grad_scale else 1.0

    dresiduals = np.zeros((groups, CELLS))
    dresiduals_scale = np.zeros((groups, CELLS))
    for g in range(groups):
        for e in range(n):
            block = slice(fwd.c[g, e] * s, (fwd.c[g, e] + 1) * s)
            dresiduals[g, block] += v[g, e] * d[g]
            dresiduals_scale[g, block] += abs(v[g, e] * d[g])

    q = fine_levels(lo, hi, residuals, bits)
    gates = nested_gates(theta, min_bits)
    dgates, dgates_scale = np.zeros(K), np.zeros(K)
    for k in range(K):
        with_k = kronecker_levels(q, [1 if j == k else g for j, g in enumerate(gates)])
        without_k = kronecker_levels(q, [0 if j == k else g for j, g in enumerate(gates)])
        for g in range(groups):
            dgates[k] += np.sum(v[g] * (with_k[g, fwd.i[g]] - without_k[g, fwd.i[g]]))
            dgates_scale[k] += np.sum(np.abs(v[g]) * (np.abs(with_k[g, fwd.i[g]]) + np.abs(without_k[g, fwd.i[g]])))

    hard = hard_gates(theta, min_bits)
    dtheta, dtheta_scale = np.zeros(K), np.zeros(K)
    for j in range(K):
        if j + 1 <= min_bits:
            continue
        for k in range(j, K):
            others = np.prod([hard[l] for l in range(k + 1) if l != j])
            dtheta[j] += dgates[k] * others
            dtheta_scale[j] += dgates_scale[k] * others

    return Gradients(
        dx=dx, dlo=dlo * scale, dhi=dhi * scale, dresiduals=dresiduals, dgates=dgates, dtheta=dtheta,
        dlo_scale=dlo_scale * scale, dhi_scale=dhi_scale * scale, dresiduals_scale=dresiduals_scale,
        dgates_scale=dgates_scale, dtheta_scale=dtheta_scale,
    )


# Inputs for comparisons


def sample_x(rng: np.random.Generator, lo, hi, n: int, round_to=lambda a: a.astype(np.float32),
             u_span: tuple[float, float] = (-40.0, N + 40.0), band: float = BOUNDARY_BAND) -> np.ndarray:
    """(G, n) inputs whose u spans `u_span` (clipping on both sides by default), none in the boundary band.

    `round_to` maps float64 values to the values of the tensor dtype actually fed to the quantizer.
    """
    lo64, d = np.asarray(lo, np.float64)[:, None], delta(lo, hi)[:, None]
    x = round_to(lo64 + d * rng.uniform(*u_span, size=(len(d), n))).astype(np.float64)
    for _ in range(100):
        redraw = boundary_band(fine_position(x, lo, hi), band)
        if not redraw.any():
            return x
        fresh = round_to(lo64 + d * rng.uniform(*u_span, size=(len(d), n))).astype(np.float64)
        x = np.where(redraw, fresh, x)
    raise RuntimeError("sample_x: could not leave the boundary band (is the dtype too coarse for the grid?)")
