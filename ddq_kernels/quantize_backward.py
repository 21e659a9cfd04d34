"""Fused DDQ quantize backward (DDQ_SPEC.md Section 3): the element pass and its reductions.

One read of the upstream gradient v and of x, one write of ∂L/∂x = v·in, and per group the spec §3
sums: the histogram of v over the 256 fine cells (per program as a one-hot matrix product, then one
atomic add per bin per program; or through `torch.bincount`, see `quantize_reductions`), Σ v·u over
in-range elements and Σ v over clipped ones.
`ddq_kernels.parameter_grads` (reference: `ddq.quantizer_math.parameter_grads`) turns those into
parameter gradients.
Reference: `ddq.functional.reductions_reference`.
"""

import torch
import triton
import triton.language as tl

from ddq_kernels.fine_grid import cast_rounded, cell_histogram, fine_cell, fine_position, grid_scalars, inside_range
from ddq_kernels import shared_histogram
from ddq_kernels.launch import fastest_config, interpreting, size_class

Bins = tuple  # (histogram (G, 256), sums (G, 2)): float32, zero, rows contiguous

BACKWARD_BLOCK = 512


@triton.jit
def accumulate_reductions(hist_ptr, sums_ptr, group, histogram, sum_vu, sum_clipped):
    """One atomic add per bin per program into hist[group] (256) and sums[group] (Σv·u·in, Σv·(1 − in))."""
    bins = tl.arange(0, 16)
    tl.atomic_add(hist_ptr + group * 256 + bins[:, None] * 16 + bins[None, :], histogram)
    tl.atomic_add(sums_ptr + group * 2, sum_vu)
    tl.atomic_add(sums_ptr + group * 2 + 1, sum_clipped)


@triton.jit
def quantize_backward_kernel(grad_ptr, x_ptr, grad_x_ptr, lo_ptr, hi_ptr, hist_ptr, sums_ptr, group_numel,
                             BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, BATCHES: tl.constexpr,
                             INTERPRET: tl.constexpr):
    V_FITS_TF32: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    program = tl.program_id(0)
    group = tl.program_id(1)
    lo, inv_delta = grid_scalars(lo_ptr, hi_ptr, group)
    base = group.to(tl.int64) * group_numel
    histogram = tl.zeros((16, 16), dtype=tl.float32)
    sum_vu = 0.0
    sum_clipped = 0.0
    for step in range(BLOCKS_PER_PROGRAM):
        offsets = (program * BLOCKS_PER_PROGRAM + step) * BLOCK + tl.arange(0, BLOCK)
        in_group = offsets < group_numel
        x = tl.load(x_ptr + base + offsets, mask=in_group, other=0.0).to(tl.float32)
        # v as the reference sees it: the gradient of x_q, which has x's dtype.
        v = tl.load(grad_ptr + base + offsets, mask=in_group, other=0.0)
        v = cast_rounded(v.to(tl.float32), x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        u = fine_position(x, lo, inv_delta)
        inside = inside_range(u)
        tl.store(grad_x_ptr + base + offsets, tl.where(inside, v, 0.0).to(grad_x_ptr.dtype.element_ty), mask=in_group)
        histogram += cell_histogram(fine_cell(u), v, BATCHES, V_FITS_TF32)
        sum_vu += tl.sum(tl.where(inside, v * u, 0.0), axis=0)
        sum_clipped += tl.sum(tl.where(inside, 0.0, v), axis=0)
    accumulate_reductions(hist_ptr, sums_ptr, group, histogram, sum_vu, sum_clipped)


@triton.jit
def quantize_backward_cells_kernel(grad_ptr, x_ptr, grad_x_ptr, lo_ptr, hi_ptr, cells_ptr, weights_ptr, partial_ptr,
                                   group_numel, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """The element pass without the histogram: ∂x, each element's bin (group·256 + cell) and v in float32
    for `torch.bincount`, and this program's partial Σv·u·in and Σv·(1 − in) (no atomics)."""
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    lo, inv_delta = grid_scalars(lo_ptr, hi_ptr, group)
    base = group.to(tl.int64) * group_numel
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    in_group = offsets < group_numel
    x = tl.load(x_ptr + base + offsets, mask=in_group, other=0.0).to(tl.float32)
    v = tl.load(grad_ptr + base + offsets, mask=in_group, other=0.0)
    v = cast_rounded(v.to(tl.float32), x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    u = fine_position(x, lo, inv_delta)
    inside = inside_range(u)
    tl.store(grad_x_ptr + base + offsets, tl.where(inside, v, 0.0).to(grad_x_ptr.dtype.element_ty), mask=in_group)
    tl.store(cells_ptr + base + offsets, group * 256 + fine_cell(u), mask=in_group)
    tl.store(weights_ptr + base + offsets, v, mask=in_group)
    partial = partial_ptr + (group * tl.num_programs(0) + chunk) * 2
    tl.store(partial, tl.sum(tl.where(inside, v * u, 0.0), axis=0))
    tl.store(partial + 1, tl.sum(tl.where(inside, 0.0, v), axis=0))


ONE_HOT = {"histogram": "one_hot"}
BINCOUNT = {"histogram": "bincount"}
SHARED = {"histogram": "shared"}


def strategies() -> tuple[dict, ...]:
    """The histogram strategies this process can run: SHARED (CUDA C) needs NVRTC and a GPU, not the interpreter."""
    shared = (SHARED,) if shared_histogram.available() and not interpreting() else ()
    return shared + (ONE_HOT, BINCOUNT)


def tuned_candidates() -> tuple[dict, ...]:
    """What `fastest_config` chooses from: without BINCOUNT's host sync where SHARED runs (5–20× faster
    and keeps the backward capturable in a CUDA graph)."""
    return (SHARED, ONE_HOT) if SHARED in strategies() else (ONE_HOT, BINCOUNT)


def quantize_reductions(grad: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, block: int | None = None,
                        strategy: dict | None = None, bins: Bins | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec §3 element pass on the device: (∂x in x's dtype, histogram (G, 256), Σv·u·in (G,), Σv·(1 − in) (G,)).

    grad may have any float dtype (a float32 GEMM accumulator, say); it is rounded to x's dtype first,
    as the gradient of x_q would be. Two ways to the histogram, the faster chosen per shape class on the
    device (`fastest_config`): SHARED, one pass with the bins in shared memory (CUDA C, `shared_histogram`);
    ONE_HOT, fully fused in Triton (one pass, one-hot products on the tensor cores); and BINCOUNT, which
    writes each element's bin and v for `torch.bincount` (more bytes, a host sync). `bins` (see
    `output_bins`) receives the histogram and the sums instead of new zeroed tensors.
    """
    x = x.contiguous()
    grad = grad.contiguous()
    if strategy is None:
        def run(candidate):
            return quantize_reductions(grad, x, lo, hi, block, candidate)
        key = (size_class(x.numel()), lo.shape[0], x.dtype, grad.dtype)
        strategy = fastest_config("quantize_reductions", key, tuned_candidates(), run)
    if strategy["histogram"] == "shared":
        grad_x, histogram, sums = reduction_outputs(x, lo.shape[0], bins)
        shared_histogram.reductions_shared(grad, x, lo, hi, grad_x, histogram, sums)
        return grad_x, histogram, sums[:, 0], sums[:, 1]
    if strategy["histogram"] == "bincount":
        return reductions_with_bincount(grad, x, lo.contiguous(), hi.contiguous(), block or CELLS_BLOCK,
                                        strategy.get("chunk", BINCOUNT_CHUNK), bins)
    return reductions_one_hot(grad, x, lo.contiguous(), hi.contiguous(), block or BACKWARD_BLOCK, bins)


def reduction_outputs(x: torch.Tensor, groups: int, bins: Bins | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂x like x, zeroed histogram (G, 256), zeroed sums (G, 2)): what every strategy fills."""
    return (torch.empty_like(x), *output_bins(groups, x.device, bins))


def output_bins(groups: int, device: torch.device, bins: Bins | None = None) -> Bins:
    """The bins a reduction pass adds into: `bins` where the caller zeroed them already (a layer's backward
    zeroes its two quantizers' bins in one fill: rows of one `zeroed_bins` buffer), new `zeroed_bins`
    otherwise. The passes accumulate, so given bins must hold zeros."""
    if bins is None:
        return zeroed_bins(groups, device)
    histogram, sums = bins
    device = torch.device(device)
    for name, tensor, width in (("histogram", histogram, 256), ("sums", sums, 2)):
        on_device = tensor.device.type == device.type and device.index in (None, tensor.device.index)
        if tensor.shape != (groups, width) or tensor.dtype != torch.float32 or not on_device:
            raise ValueError(f"bins: {name} must be float32 ({groups}, {width}) on {device}, got "
                             f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
        if tensor.stride(1) != 1 or (groups > 1 and tensor.stride(0) != width):
            raise ValueError(f"bins: {name} rows must be contiguous, got strides {tensor.stride()}")
    return histogram, sums


def zeroed_bins(groups: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(histogram (G, 256), sums (G, 2)), float32 zeros, both contiguous views of one buffer: one fill
    kernel instead of two (on the small GEMMs every launch of a step costs a few µs of GPU time)."""
    return zeroed_bins_with_counters(groups, device, 0)[:2]


def zeroed_bins_with_counters(groups: int, device: torch.device,
                              counters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`zeroed_bins` and `counters` zeroed int32 (the parameter gradients' done counters,
    `parameter_grads.gate_sum_counters`), all views of one buffer zeroed by one fill."""
    buffer = torch.zeros(groups * 258 + counters, device=device, dtype=torch.float32)
    done = buffer[groups * 258:].view(torch.int32)
    return buffer[:groups * 256].view(groups, 256), buffer[groups * 256:groups * 258].view(groups, 2), done


CELLS_BLOCK = 2048
# Elements per bincount round: its scratch (bin index and float32 v, 8 bytes an element) stays ≤ 256 MiB.
BINCOUNT_CHUNK = 1 << 25


def reductions_with_bincount(grad, x, lo, hi, block, chunk=BINCOUNT_CHUNK, bins=None):
    """Per group: ∂x and the sums from the element kernel, the histogram from `torch.bincount`.

    A tensor larger than `chunk` elements per group is processed in slices of whole groups (or, per
    tensor, in contiguous slices), so the scratch stays bounded whatever the tensor size.
    """
    groups = lo.shape[0]
    group_numel = x.numel() // groups
    grad_x, histogram, sums = reduction_outputs(x, groups, bins)
    histogram = histogram.view(-1)
    if group_numel == 0:
        return grad_x, histogram.reshape(groups, 256), sums[:, 0], sums[:, 1]
    flat_x, flat_grad, flat_grad_x = x.reshape(-1), grad.reshape(-1), grad_x.reshape(-1)
    if groups == 1:
        slices = [(start, min(start + chunk, group_numel), 0, 1) for start in range(0, group_numel, chunk)]
    else:
        per_slice = max(1, chunk // group_numel)
        slices = [(g * group_numel, min(g + per_slice, groups) * group_numel, g, min(g + per_slice, groups) - g)
                  for g in range(0, groups, per_slice)]
    for start, end, first_group, slice_groups in slices:
        numel_per_group = (end - start) // slice_groups
        cells = torch.empty(end - start, device=x.device, dtype=torch.int32)
        weights = torch.empty(end - start, device=x.device, dtype=torch.float32)
        chunks = triton.cdiv(numel_per_group, block)
        partial = torch.empty(slice_groups, chunks, 2, device=x.device, dtype=torch.float32)
        quantize_backward_cells_kernel[(chunks, slice_groups)](
            flat_grad[start:end], flat_x[start:end], flat_grad_x[start:end], lo[first_group:], hi[first_group:],
            cells, weights, partial, numel_per_group, BLOCK=block, INTERPRET=interpreting(), num_warps=8)
        bins = slice(first_group * 256, (first_group + slice_groups) * 256)
        histogram[bins] += torch.bincount(cells, weights=weights, minlength=slice_groups * 256)
        sums[first_group:first_group + slice_groups] += partial.sum(dim=1)
    return grad_x, histogram.reshape(groups, 256), sums[:, 0], sums[:, 1]


def reductions_one_hot(grad, x, lo, hi, block, bins=None):
    groups = lo.shape[0]
    grad_x, histogram, sums = reduction_outputs(x, groups, bins)
    group_numel = x.numel() // groups
    if group_numel > 0:
        blocks = triton.cdiv(group_numel, block)
        # Several blocks per program keep the atomic adds per bin few on large tensors.
        per_program = max(1, min(32, blocks // 2048))
        grid = (triton.cdiv(blocks, per_program), groups)
        quantize_backward_kernel[grid](grad, x, grad_x, lo, hi, histogram, sums, group_numel,
                                       BLOCK=block, BLOCKS_PER_PROGRAM=per_program,
                                       BATCHES=min(8, block // 16), INTERPRET=interpreting(), num_warps=8)
    return grad_x, histogram, sums[:, 0], sums[:, 1]
