"""Quantizer-parameter gradients from the per-group reductions, on the device (DDQ_SPEC.md Section 3).

The same function as `ddq.quantizer_math.parameter_grads` (the reference, which the tests compare it
with), in one launch per tensor and two per channel instead of ~220 small PyTorch ops: that reference, run once per quantizer per
backward, cost ~2 ms of host time per call, more than the GEMMs of a CNN layer (docs/kernels.md).

Kernel 1, one program per group; it reads the bitwidth b from the gate logits and branches to a body
compiled for that b (s = 2^(8−b)), so no host sync is needed:
- ΣvT = Σ_c H_c·T_c with H_c the histogram summed over code c's block and T_c its block-mean position;
  ∂hi = (ΣvT − Σv·u·in)/N, ∂lo = (Σv·u·in − ΣvT + N·Σv·(1 − in))/N, times LSQ's scale when asked;
- ∂r_{g,j} = Δ_g·H_{c(j)};
- ∂L/∂g_k = Σ_i H_i·(x_q|g_k=1 − x_q|g_k=0)(i) in the Kronecker form: for a kept factor (k < b) the
  level without it is the mean of the block and its partner block, so the term is
  Σ_pairs (H_c − H_c')·(B_c − B_c')/2 with B the block means of the fine levels q; for a merged
  factor (k ≥ b) the level with it is the mean of q over the half block that shares bit k, so the
  term is Σ_halves H_half·Q_half − Σ_c H_c·B_c. Each program stores its 8 terms in its row of a (G, 8)
  buffer. (They used to be added atomically into 8 floats: with thousands of per-channel groups those
  same-address atomics serialised in one L2 slice, ~35 µs per call on H100 at 4096 channels.)
Kernel 2, one program: ∂g_k = Σ over groups of the terms, in a fixed order (deterministic: chunks of up to 256
groups, then the chunks' sums), then ∂θ_j = Σ_{k ≥ j} ∂g_k·Π_{l ≤ k, l ≠ j} h_l for free gates, 0 for forced
ones. Per tensor (one group) kernel 1's single program does this itself: on the small CNN GEMMs each launch of a
step costs a few µs; and given zeroed done counters, `two_parameter_grads` has the second quantizer's programs
that finish last do it, the last of each chunk its chunk's sum and the last of those the rest
(`ddq::quantized_linear_backward`, whose bins buffer carries the counters).
The sums Σv·u·in and Σv·(1 − in) are read in place from wherever the reductions put them (strided views
of one (G, 2) buffer): no concatenation kernel. `two_parameter_grads` runs kernel 1 for two quantizers (a
DDQLinear's activation and weight) in one launch, the first's groups before the second's: on 100352×32×192
the per-tensor and per-channel launches took 4.2 and 3.8 µs of GPU time one after the other (H100, run 13).
"""

import torch
import triton
import triton.language as tl

from ddq import quantizer_math as qm
from ddq_kernels.fine_grid import bitwidth_from_logits
from ddq_kernels.range_bounds import group_bound_grads, load_range_parameters


@triton.jit
def pair_difference(values, HIGH: tl.constexpr, LOW: tl.constexpr):
    """values (HIGH·2·LOW,) → (HIGH, LOW): the element whose middle bit is 0 minus its partner."""
    cube = tl.reshape(values, (HIGH, 2, LOW))
    sign = (1 - 2 * tl.arange(0, 2)).to(tl.float32)
    return tl.sum(cube * sign[None, :, None], axis=1)


@triton.jit
def half_block_sums(values, CODES: tl.constexpr, ABOVE: tl.constexpr, BELOW: tl.constexpr):
    """values (256,) → (CODES, 2): sums over each half of every block, split on one bit inside the block."""
    cube = tl.reshape(values, (CODES, ABOVE, 2, BELOW))
    return tl.sum(tl.sum(cube, axis=3), axis=1)


@triton.jit
def group_grads(histogram, residuals, lo, hi, sum_vu, sum_clipped, bottom, top, grad_bottom_ptr, grad_top_ptr,
                grad_residuals_ptr, group, numel_per_group, bits, GRAD_SCALE: tl.constexpr, BITS: tl.constexpr,
                MODE: tl.constexpr):
    """Stores ∂bottom, ∂top (from ∂lo, ∂hi through the range parameterization MODE) and ∂residuals of one
    group; returns its 8 gate terms. `bits` is BITS as a run-time value; the group's tables and parameters come
    loaded (`quantizer_group_grads`)."""
    BLOCK: tl.constexpr = 1 << (8 - BITS)
    CODES: tl.constexpr = 1 << BITS
    cells = tl.arange(0, 256)
    delta = (hi - lo) / 255.0

    code = tl.arange(0, CODES).to(tl.float32)
    block_hist = tl.sum(tl.reshape(histogram, (CODES, BLOCK)), axis=1)
    position = code * BLOCK + (BLOCK - 1) / 2 + tl.sum(tl.reshape(residuals, (CODES, BLOCK)), axis=1)
    sum_vt = tl.sum(block_hist * position, axis=0)
    range_scale = 1.0
    if GRAD_SCALE:
        range_scale = 1.0 / tl.sqrt(tl.maximum(numel_per_group, 1).to(tl.float32) * max(CODES - 1, 1))
    grad_hi = (sum_vt - sum_vu) / 255.0 * range_scale
    grad_lo = (sum_vu - sum_vt + 255.0 * sum_clipped) / 255.0 * range_scale
    grad_bottom, grad_top = group_bound_grads(bottom, top, bits, grad_lo, grad_hi, MODE)
    tl.store(grad_bottom_ptr + group, grad_bottom)
    tl.store(grad_top_ptr + group, grad_top)
    per_cell = tl.reshape(tl.broadcast_to(block_hist[:, None], (CODES, BLOCK)), (256,))
    tl.store(grad_residuals_ptr + group * 256 + cells, delta * per_cell)

    fine_levels = lo + delta * (cells.to(tl.float32) + BLOCK * residuals)
    block_means = tl.sum(tl.reshape(fine_levels, (CODES, BLOCK)), axis=1) / BLOCK
    current = tl.sum(block_hist * block_means, axis=0)
    gate = tl.arange(0, 8)
    terms = tl.zeros((8,), dtype=tl.float32)
    for k in tl.static_range(8):
        if k < BITS:
            hist_diff = pair_difference(block_hist, 1 << k, 1 << (BITS - 1 - k))
            mean_diff = pair_difference(block_means, 1 << k, 1 << (BITS - 1 - k))
            term = tl.sum(tl.sum(hist_diff * mean_diff, axis=1), axis=0) / 2
        else:
            half_hist = half_block_sums(histogram, CODES, 1 << (k - BITS), BLOCK >> (k - BITS + 1))
            half_means = half_block_sums(fine_levels, CODES, 1 << (k - BITS), BLOCK >> (k - BITS + 1)) / (BLOCK // 2)
            term = tl.sum(tl.sum(half_hist * half_means, axis=1), axis=0) - current
        terms = tl.where(gate == k, term, terms)
    return terms


@triton.jit
def range_residual_gate_kernel(hist_ptr, sum_vu_ptr, sum_clipped_ptr, vu_stride, clipped_stride, lo_ptr, hi_ptr, residuals_ptr,
                               logits_ptr, bottom_ptr, top_ptr, grad_bottom_ptr, grad_top_ptr, grad_residuals_ptr,
                               gate_terms_ptr, grad_logits_ptr, numel_per_group, groups, done_ptr,
                               MIN_BITS: tl.constexpr, GRAD_SCALE: tl.constexpr, ONE_GROUP: tl.constexpr,
                               MODE: tl.constexpr, FINISH: tl.constexpr, CHUNK: tl.constexpr,
                               PARTIAL_BLOCK: tl.constexpr):
    quantizer_group_grads(hist_ptr, sum_vu_ptr, sum_clipped_ptr, vu_stride, clipped_stride, lo_ptr, hi_ptr, residuals_ptr,
                          logits_ptr, bottom_ptr, top_ptr, grad_bottom_ptr, grad_top_ptr, grad_residuals_ptr,
                          gate_terms_ptr, grad_logits_ptr, tl.program_id(0), numel_per_group, MIN_BITS, GRAD_SCALE,
                          ONE_GROUP, MODE)
    if FINISH:
        finish_gate_sum(gate_terms_ptr, tl.program_id(0), groups, done_ptr, logits_ptr, grad_logits_ptr, MIN_BITS,
                        CHUNK, PARTIAL_BLOCK)


@triton.jit
def two_range_residual_gate_kernel(
        hist_1, sum_vu_1, sum_clipped_1, vu_stride_1, clipped_stride_1, lo_1, hi_1, residuals_1, logits_1, bottom_1,
        top_1, grad_bottom_1, grad_top_1, grad_residuals_1, gate_terms_1, grad_logits_1, numel_per_group_1, groups_1,
        hist_2, sum_vu_2, sum_clipped_2, vu_stride_2, clipped_stride_2, lo_2, hi_2, residuals_2, logits_2, bottom_2,
        top_2, grad_bottom_2, grad_top_2, grad_residuals_2, gate_terms_2, grad_logits_2, numel_per_group_2, groups_2,
        done_ptr, MIN_BITS_1: tl.constexpr, GRAD_SCALE_1: tl.constexpr, ONE_GROUP_1: tl.constexpr, MODE_1: tl.constexpr,
        MIN_BITS_2: tl.constexpr, GRAD_SCALE_2: tl.constexpr, ONE_GROUP_2: tl.constexpr, MODE_2: tl.constexpr,
        FINISH_2: tl.constexpr, CHUNK_2: tl.constexpr, PARTIAL_BLOCK_2: tl.constexpr):
    program = tl.program_id(0)
    if program < groups_1:
        quantizer_group_grads(hist_1, sum_vu_1, sum_clipped_1, vu_stride_1, clipped_stride_1, lo_1, hi_1, residuals_1,
                              logits_1, bottom_1, top_1, grad_bottom_1, grad_top_1, grad_residuals_1, gate_terms_1,
                              grad_logits_1, program, numel_per_group_1, MIN_BITS_1, GRAD_SCALE_1, ONE_GROUP_1, MODE_1)
    else:
        quantizer_group_grads(hist_2, sum_vu_2, sum_clipped_2, vu_stride_2, clipped_stride_2, lo_2, hi_2, residuals_2,
                              logits_2, bottom_2, top_2, grad_bottom_2, grad_top_2, grad_residuals_2, gate_terms_2,
                              grad_logits_2, program - groups_1, numel_per_group_2, MIN_BITS_2, GRAD_SCALE_2,
                              ONE_GROUP_2, MODE_2)
        if FINISH_2:
            finish_gate_sum(gate_terms_2, program - groups_1, groups_2, done_ptr, logits_2, grad_logits_2, MIN_BITS_2,
                            CHUNK_2, PARTIAL_BLOCK_2)


@triton.jit
def quantizer_group_grads(hist_ptr, sum_vu_ptr, sum_clipped_ptr, vu_stride, clipped_stride, lo_ptr, hi_ptr, residuals_ptr,
                          logits_ptr, bottom_ptr, top_ptr, grad_bottom_ptr, grad_top_ptr, grad_residuals_ptr,
                          gate_terms_ptr, grad_logits_ptr, group, numel_per_group, MIN_BITS: tl.constexpr,
                          GRAD_SCALE: tl.constexpr, ONE_GROUP: tl.constexpr, MODE: tl.constexpr):
    """Kernel 1's work for one group of one quantizer."""
    bits = bitwidth_from_logits(logits_ptr, MIN_BITS)
    # Every load is issued before the bitwidth is known, so their latencies overlap the logits' instead of
    # following it: each program is one warp's chain of dependent steps (9 µs on 100352×192×32 at ncu's clock).
    cells = tl.arange(0, 256)
    histogram = tl.load(hist_ptr + group * 256 + cells)
    residuals = tl.load(residuals_ptr + group * 256 + cells)
    lo = tl.load(lo_ptr + group)
    hi = tl.load(hi_ptr + group)
    sum_vu = tl.load(sum_vu_ptr + group * vu_stride)
    sum_clipped = tl.load(sum_clipped_ptr + group * clipped_stride)
    bottom, top = load_range_parameters(bottom_ptr, top_ptr, group, MODE)
    terms = tl.zeros((8,), dtype=tl.float32)
    # The bitwidth is read here, on the device: one branch per candidate keeps every shape static
    # and the host never waits for the GPU.
    for candidate in tl.static_range(9):
        if bits == candidate:
            terms = group_grads(histogram, residuals, lo, hi, sum_vu, sum_clipped, bottom, top, grad_bottom_ptr,
                                grad_top_ptr, grad_residuals_ptr, group, numel_per_group, bits, GRAD_SCALE, candidate,
                                MODE)
    if ONE_GROUP:
        store_logit_grads(terms, logits_ptr, grad_logits_ptr, MIN_BITS)
    else:
        tl.store(gate_terms_ptr + group * 8 + tl.arange(0, 8), terms)


@triton.jit
def gate_logit_grads_kernel(gate_terms_ptr, groups, logits_ptr, grad_logits_ptr, MIN_BITS: tl.constexpr,
                            CHUNK: tl.constexpr, PARTIAL_BLOCK: tl.constexpr):
    """Kernel 2: ∂g as the sum of the groups' gate terms, chunk by chunk, then ∂θ."""
    if PARTIAL_BLOCK == 0:
        grad_gates = sum_rows(gate_terms_ptr, groups, CHUNK)
    else:
        chunks = tl.cdiv(groups, CHUNK)
        for chunk in range(0, chunks):
            store_chunk_sum(gate_terms_ptr, chunk, groups, CHUNK)
        tl.debug_barrier()
        grad_gates = sum_rows(gate_terms_ptr + groups * 8, chunks, PARTIAL_BLOCK)
    store_logit_grads(grad_gates, logits_ptr, grad_logits_ptr, MIN_BITS)


@triton.jit
def finish_gate_sum(gate_terms_ptr, group, groups, counters_ptr, logits_ptr, grad_logits_ptr, MIN_BITS: tl.constexpr,
                    CHUNK: tl.constexpr, PARTIAL_BLOCK: tl.constexpr):
    """Kernel 2's work, in kernel 1's programs that finish last: the last of each chunk of groups sums the chunk
    and the last chunk to finish sums the chunks' sums, in kernel 2's order whichever programs they are. Each
    program counts itself done after its stores (the barrier orders its lanes' stores before the release)."""
    chunk = group // CHUNK
    tl.debug_barrier()
    finished_before = tl.atomic_add(counters_ptr + chunk, 1, sem="acq_rel")
    if finished_before == tl.minimum(CHUNK, groups - chunk * CHUNK) - 1:
        if PARTIAL_BLOCK == 0:
            store_logit_grads(sum_rows(gate_terms_ptr, groups, CHUNK), logits_ptr, grad_logits_ptr, MIN_BITS)
        else:
            chunks = tl.cdiv(groups, CHUNK)
            store_chunk_sum(gate_terms_ptr, chunk, groups, CHUNK)
            tl.debug_barrier()
            chunks_before = tl.atomic_add(counters_ptr + chunks, 1, sem="acq_rel")
            if chunks_before == chunks - 1:
                grad_gates = sum_rows(gate_terms_ptr + groups * 8, chunks, PARTIAL_BLOCK)
                store_logit_grads(grad_gates, logits_ptr, grad_logits_ptr, MIN_BITS)


@triton.jit
def store_chunk_sum(gate_terms_ptr, chunk, groups, CHUNK: tl.constexpr):
    """The sum of one chunk's rows of gate terms, stored in the row after the groups' that belongs to the chunk."""
    first = chunk * CHUNK
    partial = sum_rows(gate_terms_ptr + first * 8, tl.minimum(CHUNK, groups - first), CHUNK)
    tl.store(gate_terms_ptr + (groups + chunk) * 8 + tl.arange(0, 8), partial)


@triton.jit
def sum_rows(rows_ptr, count, BLOCK_ROWS: tl.constexpr):
    """The sum of `count` rows of 8 floats, BLOCK_ROWS at a time, in a fixed order."""
    j = tl.arange(0, 8)
    rows = tl.arange(0, BLOCK_ROWS)
    total = tl.zeros((8,), dtype=tl.float32)
    for first in range(0, count, BLOCK_ROWS):
        row = first + rows
        total += tl.sum(tl.load(rows_ptr + row[:, None] * 8 + j[None, :], mask=(row < count)[:, None], other=0.0), axis=0)
    return total


@triton.jit
def store_logit_grads(grad_gates, logits_ptr, grad_logits_ptr, MIN_BITS: tl.constexpr):
    """∂θ_j = Σ_{k ≥ j} ∂g_k·Π_{l ≤ k, l ≠ j} h_l for free gates, 0 for forced ones, from ∂g (8,)."""
    j = tl.arange(0, 8)
    hard = (tl.load(logits_ptr + j) > 0) | (j < MIN_BITS)
    closed = 1 - hard.to(tl.int32)
    closed_through = tl.cumsum(closed, axis=0)  # closed gates among l ≤ k
    k = j
    # Π_{l ≤ k, l ≠ j} h_l = 1 iff no closed gate among l ≤ k other than j itself.
    others_closed = closed_through[None, :] - closed[:, None] * (j[:, None] <= k[None, :]).to(tl.int32)
    weight = ((k[None, :] >= j[:, None]) & (others_closed == 0)).to(tl.float32)
    grads = tl.sum(weight * grad_gates[None, :], axis=1)
    tl.store(grad_logits_ptr + j, tl.where(j >= MIN_BITS, grads, 0.0))


# Kernel 1's program is a chain of small reductions over 256 cells: with one warp they need no barriers. GPU time
# a launch for 1 / 2 / 4 / 8 warps (H100, run 13): per tensor 2.15 / 2.97 / 3.20 / 3.69 µs, 192 groups 2.53 / 3.05
# / 3.51 / 3.97 µs.
ONE_WARP = 1

QuantizerReductions = tuple  # (histogram, Σv·u·in, Σv·(1 − in), lo, hi, residuals, gate_logits, min_bits, grad_scale, N)
# (mode, bottom, top): the range parameters that gave (lo, hi), read as `range_bounds.group_bounds` reads them.
RangeParameters = tuple[int, torch.Tensor, torch.Tensor]


def parameter_grads(histogram, sum_vu_inside, sum_v_clipped, lo, hi, residuals, gate_logits, min_bits: int,
                    grad_scale: bool, numel_per_group: int, done_counters: torch.Tensor | None = None):
    """Spec §3: (∂lo, ∂hi, ∂residuals, ∂θ); same contract as `ddq.quantizer_math.parameter_grads`.

    The two sums may be strided views of one (G, 2) tensor, as the reductions return them (read in place).
    One launch per tensor; per channel a second one sums the gate terms over the groups, unless
    `done_counters` (at least `gate_sum_counters(G)` zeroed int32) let kernel 1's last programs do it.
    """
    operands = KernelOperands((histogram, sum_vu_inside, sum_v_clipped, lo, hi, residuals, gate_logits, min_bits,
                               grad_scale, numel_per_group))
    finish = operands.finishes_in_kernel_1(done_counters)
    range_residual_gate_kernel[(operands.groups,)](
        *operands.pointers, operands.groups, done_counters if finish else operands.grad_logits,
        **operands.constants(""), FINISH=finish, CHUNK=operands.chunk, PARTIAL_BLOCK=operands.partial_block,
        num_warps=ONE_WARP)
    return operands.finished(summed=finish)


def two_parameter_grads(first: QuantizerReductions, second: QuantizerReductions,
                        ranges: tuple[RangeParameters | None, RangeParameters | None] = (None, None),
                        done_counters: torch.Tensor | None = None) -> tuple[tuple, tuple]:
    """`parameter_grads` of two quantizers, each given as its ten arguments, in one launch of kernel 1 (a
    layer's activation and weight: on the small CNN GEMMs each launch costs a few µs of a step); kernel 2
    runs for each per-channel one. Where `ranges` gives a quantizer's range parameters, its first two
    gradients are theirs (∂bottom, ∂top, `quantizer_math.range_bounds_grads`) instead of ∂lo and ∂hi.
    `done_counters`, at least `gate_sum_counters(G)` zeroed int32 for the second quantizer's G groups, lets its
    programs that finish last do its kernel 2 in the same launch (one launch fewer: the layer's bins buffer
    carries them, `zeroed_bins_with_counters`)."""
    operands_1, operands_2 = KernelOperands(first, ranges[0]), KernelOperands(second, ranges[1])
    finish_2 = operands_2.finishes_in_kernel_1(done_counters)
    two_range_residual_gate_kernel[(operands_1.groups + operands_2.groups,)](
        *operands_1.pointers, operands_1.groups, *operands_2.pointers, operands_2.groups,
        done_counters if finish_2 else operands_2.grad_logits, **operands_1.constants("_1"),
        **operands_2.constants("_2"), FINISH_2=finish_2, CHUNK_2=operands_2.chunk,
        PARTIAL_BLOCK_2=operands_2.partial_block, num_warps=ONE_WARP)
    return operands_1.finished(), operands_2.finished(summed=finish_2)


# Kernel 2 sums the gate terms in chunks of up to this many groups, then the chunks' sums: one warp holds a
# chunk's rows in registers (64 floats a lane), and with thousands of groups the chunks are summed by as many
# programs of kernel 1 at once instead of one warp looping over all of them.
MAX_CHUNK = 256


def gate_sum_chunks(groups: int) -> tuple[int, int]:
    """(chunk, number of chunks) of kernel 2's sum over `groups` rows of gate terms."""
    chunk = min(MAX_CHUNK, triton.next_power_of_2(groups))
    return chunk, triton.cdiv(groups, chunk)


def gate_sum_counters(groups: int) -> int:
    """How many done counters `parameter_grads` and `two_parameter_grads` need for a quantizer of `groups` groups:
    one a chunk, and one for the chunks where there are several."""
    chunks = gate_sum_chunks(groups)[1]
    return chunks + (chunks > 1)


class KernelOperands:
    """One quantizer's inputs and outputs of kernel 1, and kernel 2 where it has several groups."""

    def __init__(self, reductions: QuantizerReductions, ranges: RangeParameters | None = None):
        histogram, sum_vu_inside, sum_v_clipped, lo, hi, residuals, gate_logits, min_bits, grad_scale, numel = reductions
        self.mode, bottom, top = (qm.BOUNDS, lo, hi) if ranges is None else ranges
        self.groups = lo.shape[0]
        self.min_bits, self.grad_scale = min_bits, grad_scale
        device = lo.device
        self.grad_bottom = torch.empty(self.groups, device=device, dtype=torch.float32)
        self.grad_top = torch.empty_like(self.grad_bottom)
        self.grad_residuals = torch.empty(self.groups, 256, device=device, dtype=torch.float32)
        self.grad_logits = torch.empty(8, device=device, dtype=torch.float32)
        self.chunk, chunks = gate_sum_chunks(self.groups)
        # Several chunks: kernel 2 sums each into the row after the groups' rows that belongs to it, then those.
        self.partial_block = 0 if chunks == 1 else min(MAX_CHUNK, triton.next_power_of_2(chunks))
        # Per tensor the one program finishes ∂θ itself and never writes gate terms.
        self.gate_terms = (self.grad_logits if self.groups == 1
                           else torch.empty(self.groups + (chunks > 1) * chunks, 8, device=device, dtype=torch.float32))
        sum_vu, sum_clipped = (s.to(torch.float32) for s in (sum_vu_inside, sum_v_clipped))
        self.gate_logits = gate_logits.contiguous()
        self.pointers = (histogram.to(torch.float32).contiguous(), sum_vu, sum_clipped, sum_vu.stride(0),
                         sum_clipped.stride(0), lo.contiguous(), hi.contiguous(), residuals.contiguous(),
                         self.gate_logits, bottom.contiguous(), top.contiguous(), self.grad_bottom, self.grad_top,
                         self.grad_residuals, self.gate_terms, self.grad_logits, numel)

    def constants(self, suffix: str) -> dict:
        return {f"MIN_BITS{suffix}": self.min_bits, f"GRAD_SCALE{suffix}": self.grad_scale,
                f"ONE_GROUP{suffix}": self.groups == 1, f"MODE{suffix}": self.mode}

    def finishes_in_kernel_1(self, done_counters: torch.Tensor | None) -> bool:
        """Whether kernel 1's last programs sum the gate terms, with `done_counters`: where they are given and
        there are several groups."""
        if done_counters is None or self.groups == 1:
            return False
        needed = gate_sum_counters(self.groups)
        device = self.grad_logits.device
        if done_counters.dtype != torch.int32 or done_counters.numel() < needed or done_counters.device != device:
            raise ValueError(f"parameter gradients: done_counters must hold {needed} int32 for {self.groups} groups "
                             f"on {device}, got {done_counters.numel()} {done_counters.dtype} on "
                             f"{done_counters.device}")
        return True

    def finished(self, summed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four gradients, after kernel 2 where the groups' gate terms are not `summed` yet."""
        if self.groups > 1 and not summed:
            # One warp, as kernel 1's programs: the sum's order depends on the warps, and with the same layout
            # kernel 2 gives what the last programs of kernel 1 give with done counters, bit for bit.
            gate_logit_grads_kernel[(1,)](self.gate_terms, self.groups, self.gate_logits, self.grad_logits,
                                          MIN_BITS=self.min_bits, CHUNK=self.chunk, PARTIAL_BLOCK=self.partial_block,
                                          num_warps=ONE_WARP)
        return self.grad_bottom, self.grad_top, self.grad_residuals, self.grad_logits
