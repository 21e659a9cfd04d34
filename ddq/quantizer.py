"""`DDQQuantizer`: one quantizer's learnable parameters and its initialisation (DDQ_SPEC.md Section 2)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ddq import quantizer_math as qm
from ddq.functional import FLOAT_INPUT_DTYPES, ddq_quantize, validate_arguments

RANGE_MODES = ("symmetric", "unsigned", "affine")
MODES = RANGE_MODES + ("auto",)
GATE_INIT_STEP = 0.25
MIN_RANGE = qm.MIN_RANGE
PERCENTILE_SAMPLE = 1 << 22
RANGE_INITS = ("spec", "mse")
RANGE_SEARCH_FRACTIONS = torch.linspace(0.2, 1.0, 33)
RANGE_SEARCH_SAMPLE = 1 << 18
SIGNED_LUT_TOP, UNSIGNED_LUT_TOP = 127, 255  # spec §5: int8 / uint8 level tables
NONNEGATIVE_LEVEL_TOLERANCE = 1e-6  # relative; as ddq.deploy.export reads an unsigned grid's zero level


def graded_gate_logits(init_bits: int, step: float = GATE_INIT_STEP) -> Tensor:
    """θ_k = θ0·(init_bits + 1 − k)² for k ≤ init_bits, −θ0·(k − init_bits) above (k = 1..8).

    Spec §2 grades linearly so that the finest bits go first. Under plain SGD (ddq.optim.gate_optimizer)
    an open gate j receives the straight-through gradient of all open gates k ≥ j, b + 1 − j of them, so
    linear logits would all reach 0 in the same step (the collapse to min_bits the spec warns of); squared
    distances keep the spec's order: gate b closes first, then b − 1, … (docs/method.md).
    """
    k = torch.arange(1, qm.FINEST_BITS + 1, dtype=torch.float32)
    return torch.where(k <= init_bits, step * (init_bits + 1 - k) ** 2, -step * (k - init_bits))


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def percentile(x: Tensor, fraction: float) -> Tensor:
    """The `fraction` quantile of x (a strided sample of at most 4M elements: exact enough for a range)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    if flat.numel() > PERCENTILE_SAMPLE:
        flat = flat[:: flat.numel() // PERCENTILE_SAMPLE + 1]
    rank = min(max(int(round(fraction * (flat.numel() - 1))) + 1, 1), flat.numel())
    return flat.kthvalue(rank).values


class DDQQuantizer(nn.Module):
    """A DDQ quantizer with learned range, levels and bitwidth (spec §2).

    mode: "symmetric" (learn α, range [−α, α]), "unsigned" (learn the top level h; 0 is always a
    level), "affine" (learn lo and hi), or "auto" (resolved on the first batch: "unsigned" when it has
    no negative value, else "symmetric"). channels=None quantizes per tensor; channels=C per slice
    along dim 0 (per output channel for weights). The range is initialised from the first tensor seen:
    max|x| per channel for per-channel quantizers (unsigned: max x; affine: min x and max x), the 99.9th
    (and 0.1th) percentile per tensor, then (range_init="mse", the default) shrunk to the fraction of
    that range with the least quantization error at init_bits (docs/method.md; "spec" keeps it).
    learn_bits=False fixes the bitwidth at init_bits; max_bits caps it (gates above held closed);
    learn_levels=False keeps the levels uniform. lut_levels=True puts every level on spec §5's integer
    level table (see `lut_level_correction`), so the exported integer model computes what this one does.
    The parameters stay float32 when the module is cast.
    """

    def __init__(
        self,
        mode: str = "symmetric",
        channels: Optional[int] = None,
        init_bits: int = 8,
        min_bits: int = 2,
        max_bits: int = qm.FINEST_BITS,
        learn_bits: bool = True,
        learn_levels: bool = True,
        grad_scale: bool = True,
        range_init: str = "mse",
        lut_levels: bool = False,
    ) -> None:
        super().__init__()
        if range_init not in RANGE_INITS:
            raise ValueError(f"DDQQuantizer: range_init must be one of {RANGE_INITS}, got {range_init!r}")
        if mode not in MODES:
            raise ValueError(f"DDQQuantizer: mode must be one of {MODES}, got {mode!r}")
        if not is_int(min_bits) or not 0 <= min_bits <= qm.FINEST_BITS:
            raise ValueError(f"DDQQuantizer: min_bits must be an int in [0, 8], got {min_bits!r}")
        if not is_int(max_bits) or not max(min_bits, 1) <= max_bits <= qm.FINEST_BITS:
            raise ValueError(f"DDQQuantizer: max_bits must be an int in [max(min_bits, 1)={max(min_bits, 1)}, 8], got {max_bits!r}")
        if not is_int(init_bits) or not min_bits <= init_bits <= max_bits:
            raise ValueError(f"DDQQuantizer: init_bits must be an int in [min_bits={min_bits}, max_bits={max_bits}], got {init_bits!r}")
        if mode in ("unsigned", "auto") and min_bits < 1:
            raise ValueError("DDQQuantizer: unsigned mode needs min_bits >= 1 (a zero-anchored grid needs two levels)")
        if channels is not None and (not is_int(channels) or channels < 1):
            raise ValueError(f"DDQQuantizer: channels must be None or a positive int, got {channels!r}")
        flags = dict(learn_bits=learn_bits, learn_levels=learn_levels, grad_scale=grad_scale, lut_levels=lut_levels)
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"DDQQuantizer: {name} must be a bool, got {flag!r}")
        self.mode = mode
        self.axis = None if channels is None else 0
        self.min_bits = min_bits
        self.max_bits = max_bits
        self.grad_scale = grad_scale
        self.learn_bits = learn_bits
        self.init_bits = init_bits
        self.range_init = range_init
        self.lut_levels = lut_levels
        groups = 1 if channels is None else channels
        self.range_top = nn.Parameter(torch.ones(groups))
        self.range_bottom = nn.Parameter(torch.zeros(groups), requires_grad=mode in ("affine",))
        residuals = torch.zeros(groups, qm.FINE_CELLS)
        self.residuals = nn.Parameter(residuals) if learn_levels else nn.Parameter(residuals, requires_grad=False)
        logits = graded_gate_logits(init_bits)
        self.gate_logits = nn.Parameter(logits) if learn_bits else nn.Parameter(logits, requires_grad=False)
        # The buffer carries the flag through state_dict; the Python bool is what forward reads, so a
        # compiled forward guards on it instead of branching on a tensor.
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False
        self.register_buffer("mode_code", torch.tensor(MODES.index(mode)))
        self._register_load_state_dict_pre_hook(self._restore_python_state, with_module=False)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to the parameters, dtype casts do not: they stay float32 (spec §2 computes
        in float32; the op rejects other dtypes), so `model.to(torch.bfloat16)` keeps working. A cast is
        skipped, not undone afterwards: a round trip through bf16 or fp16 would round the learned range and
        levels (and overflow a range above fp16's 65504 to inf)."""

        def moving_only(tensor: Tensor) -> Tensor:
            moved = fn(tensor)
            return tensor.to(device=moved.device) if moved.dtype != tensor.dtype else moved

        return super()._apply(moving_only, recurse)

    def _restore_python_state(self, state_dict, prefix, *args) -> None:
        code = state_dict.get(prefix + "mode_code")
        if code is not None:
            self._set_mode(MODES[int(code)])
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._initialized = bool(flag)

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        self.range_bottom.requires_grad_(mode == "affine")

    @property
    def groups(self) -> int:
        return self.range_top.shape[0]

    @property
    def bits(self) -> int:
        """The current bitwidth b (spec §2: the number of kept gates). Syncs on GPU."""
        return qm.bitwidth_int(self.effective_gate_logits(), self.min_bits)

    def bits_tensor(self) -> Tensor:
        """The current bitwidth as a 0-d tensor (no host sync)."""
        return qm.bitwidth(self.effective_gate_logits(), self.min_bits)

    def effective_gate_logits(self) -> Tensor:
        """The logits the op sees: gates above max_bits held closed (constant −1, no gradient), so b ≤ max_bits.

        max_bits = 7 keeps a symmetric weight grid exportable exactly: spec §5's int8 weight LUT holds the
        128 levels of a 7-bit grid (odd multiples of α/127) but not the 256 of an 8-bit one (docs/method.md).
        """
        if self.max_bits == qm.FINEST_BITS:
            return self.gate_logits
        above = torch.arange(1, qm.FINEST_BITS + 1, device=self.gate_logits.device) > self.max_bits
        return torch.where(above, torch.full_like(self.gate_logits, -1.0), self.gate_logits)

    def range(self) -> tuple[Tensor, Tensor]:
        """(lo, hi) of the fine grid for the current bitwidth, shape (G,), hi > lo by construction."""
        return qm.range_bounds(self.range_mode_code, self.range_bottom, self.range_top,
                               self.bits_tensor() if self.mode == "unsigned" else None)

    @property
    def range_mode_code(self) -> int:
        """The mode as the ops' range parameterization (`quantizer_math.RANGE_PARAMETERIZATIONS`)."""
        if self.mode == "auto":
            raise RuntimeError("DDQQuantizer: mode 'auto' is resolved on the first batch; call it on data first")
        return qm.RANGE_PARAMETERIZATIONS.index(self.mode)

    def effective_residuals(self) -> Tensor:
        """The residuals the op sees: zero-anchored in `unsigned` mode, and with `lut_levels` moved (per
        block, straight-through) so that every level lies on spec §5's integer level table."""
        residuals = self._zero_anchored_residuals()
        if self.lut_levels:
            residuals = residuals + self.lut_level_correction(residuals)
        return residuals

    def _zero_anchored_residuals(self) -> Tensor:
        """In `unsigned` mode code 0's block has mean 0, so 0 stays a level.

        Spec §2 makes 0 a level of the unsigned grid (the most common ReLU output, and the zero padding
        of the next convolution); learned residuals would move it. Removing block 0's mean (at the
        current block size, computed on the device) keeps it exactly there and leaves every other level free.
        """
        if self.mode != "unsigned":
            return self.residuals
        block = torch.pow(2.0, (qm.FINEST_BITS - self.bits_tensor().detach()).to(torch.float32))
        in_block0 = (torch.arange(qm.FINE_CELLS, device=self.residuals.device) < block).to(self.residuals.dtype)
        block0_mean = (self.residuals * in_block0).sum(dim=1, keepdim=True) / block
        return self.residuals - in_block0 * block0_mean

    @torch.no_grad()
    def lut_level_correction(self, residuals: Tensor) -> Tensor:
        """(G, 256) residual offsets, constant within each block, that move every level V onto s·round(V/s).

        Spec §5 exports levels as round(V/s): weights (per channel) int8 with s = max|V|/127; activations
        (per tensor) the same, or uint8 with s = max V/255 when all V ≥ 0. Learned levels are arbitrary floats, so the table's rounding error (≤ s/2 per level) is
        shared by every element with that code and adds up coherently over a dot product; at 2 bits it
        flips codes and argmaxes of the integer model (docs/deploy.md). With the levels on the table the
        two models differ only by float32 rounding. Computed on the device from the current bitwidth
        (no host sync); the rounding is straight-through, so the gradients of every parameter are unchanged.
        """
        groups = residuals.shape[0]
        lo, hi = (bound.detach().to(torch.float32)[:, None] for bound in self.range())
        block = torch.pow(2.0, (qm.FINEST_BITS - self.bits_tensor().detach()).to(torch.float32))
        cells = torch.arange(qm.FINE_CELLS, device=residuals.device, dtype=torch.float32)
        start = torch.floor(cells / block) * block
        sums = torch.cat([residuals.new_zeros(groups, 1), residuals.detach().to(torch.float32).cumsum(dim=1)], dim=1)
        block_sum = sums[:, (start + block).long()] - sums[:, start.long()]
        delta = (hi - lo) / qm.FINE_MAX
        levels = lo + delta * (start + (block - 1) / 2 + block_sum)  # spec §2 step 4, per fine cell
        top = levels.abs().amax(dim=1, keepdim=True)
        nonnegative = (levels >= -NONNEGATIVE_LEVEL_TOLERANCE * top).all(dim=1, keepdim=True) & (self.axis is None)
        scale = torch.where(nonnegative, levels.amax(dim=1, keepdim=True) / UNSIGNED_LUT_TOP, top / SIGNED_LUT_TOP)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        levels = torch.where(nonnegative, levels.clamp_min(0), levels)
        ratio = levels / scale
        on_table = qm.round_half_away(ratio) * scale
        return ((on_table - levels) / (delta * block)).to(residuals.dtype)

    @torch.no_grad()
    def levels(self) -> Tensor:
        """Spec §5's V: the (G, 2^b) block-mean levels at the current bitwidth."""
        lo, hi = self.range()
        return qm.block_levels(lo, hi, self.effective_residuals(), self.bits)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Spec §2 steps 1–2: the integer code c = i >> (8 − b) of every element, uint8, x's shape. x is checked
        as `forward` checks it; a NaN or ±inf has no code (`forward` gives NaN there), so it is an error."""
        lo, hi = self.range()
        validate_arguments(x, lo, hi, self.effective_residuals(), self.effective_gate_logits(), self.axis, self.min_bits)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("DDQQuantizer.codes: x has NaN or infinite values, which no integer code represents")
        flat = x.reshape(self.groups, -1)
        _, index = qm.fine_index(flat, lo, hi)
        return (index >> (qm.FINEST_BITS - self.bits)).to(torch.uint8).reshape(x.shape)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Spec §2 initialisation from the first tensor seen (weights: max|w| per channel).

        Per channel: symmetric α = max|x|, unsigned h = max x, affine [min x, max x] of each slice.
        Per tensor: the 99.9th percentile (of |x| when symmetric) and, for affine, the 0.1th for lo.
        """
        self._check_first_batch(x)
        if self.mode == "auto":
            self._set_mode("unsigned" if bool((x.detach() >= 0).all()) else "symmetric")
            self.mode_code.fill_(MODES.index(self.mode))
        if self.axis == 0:
            self._initialize_per_channel(x.detach().reshape(self.groups, -1).to(torch.float32))
        elif self.mode == "symmetric":
            self.range_top.fill_(self._robust_top(x.detach().abs()))
        elif self.mode == "unsigned":
            self.range_top.fill_(self._robust_top(x.detach()))
        else:
            bottom = percentile(x, 0.001)
            top = torch.maximum(percentile(x, 0.999), bottom + MIN_RANGE)
            self.range_bottom.fill_(bottom)
            self.range_top.fill_(top)
        if self.range_init == "mse":
            self._shrink_range_to_least_error(x)
        self.initialized.fill_(True)
        self._initialized = True

    def _shrink_range_to_least_error(self, x: Tensor) -> None:
        """Scale each group's spec-initialised range by the fraction f ∈ [0.2, 1] whose uniform grid at
        init_bits quantizes x with the least squared error (the spec's max/percentile range, f = 1, is
        a candidate). At 8 bits this keeps ~the spec's range; at 2 bits the max|w| range puts levels at
        ±α/4 and ±3α/4, far from where most weights sit, and the least-error range is ~0.6·max|w|."""
        rows = x.detach().reshape(self.groups, -1).to(torch.float32)
        if rows.shape[1] > RANGE_SEARCH_SAMPLE:
            rows = rows[:, :: rows.shape[1] // RANGE_SEARCH_SAMPLE + 1]
        spec_top, spec_bottom = self.range_top.detach().clone(), self.range_bottom.detach().clone()
        uniform = torch.zeros_like(self.residuals)
        errors = []
        for fraction in RANGE_SEARCH_FRACTIONS.tolist():
            self.range_top.copy_(spec_top * fraction)
            self.range_bottom.copy_(spec_bottom * fraction)
            lo, hi = self.range()
            quantized = ddq_quantize(rows if self.axis == 0 else rows.reshape(-1), lo, hi, uniform, self.effective_gate_logits(),
                                     self.axis, self.min_bits, self.grad_scale)
            errors.append((quantized.reshape(self.groups, -1) - rows).square().sum(dim=1))
        best = RANGE_SEARCH_FRACTIONS.to(rows.device)[torch.stack(errors).argmin(dim=0)]
        self.range_top.copy_(spec_top * best)  # range() keeps it above MIN_RANGE
        self.range_bottom.copy_(spec_bottom * best)

    def _check_first_batch(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dtype not in FLOAT_INPUT_DTYPES:
            raise TypeError(f"DDQQuantizer: x must be a float32, float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
        if x.numel() == 0:
            raise ValueError(f"DDQQuantizer: cannot initialise the range from an empty batch of shape {tuple(x.shape)}")
        if self.axis == 0 and (x.dim() == 0 or x.shape[0] != self.groups):
            raise ValueError(f"DDQQuantizer: a per-channel quantizer of {self.groups} channels got x of shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("DDQQuantizer: cannot initialise the range from a batch with NaN or infinite values")

    def _initialize_per_channel(self, rows: Tensor) -> None:
        if self.mode == "symmetric":
            self.range_top.copy_(rows.abs().amax(dim=1).clamp_min(MIN_RANGE))
        elif self.mode == "unsigned":
            self.range_top.copy_(rows.amax(dim=1).clamp_min(MIN_RANGE))
        else:
            self.range_bottom.copy_(rows.amin(dim=1))
            self.range_top.copy_(rows.amax(dim=1))

    @staticmethod
    def _robust_top(x: Tensor) -> Tensor:
        """The 99.9th percentile; the max when that is 0 (a mostly-zero ReLU output), never below MIN_RANGE."""
        top = percentile(x, 0.999)
        return torch.where(top > 0, top, x.amax().to(torch.float32)).clamp_min(MIN_RANGE)

    def op_arguments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Spec §2: (lo, hi, residuals, gate_logits) for the fused custom ops that quantize x (which check them
        against x themselves); the quantizer is initialised from x on first use, as its forward would be."""
        if not self._initialized:
            self.initialize(x)
        return (*self.range(), self.effective_residuals(), self.effective_gate_logits())

    def range_op_arguments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Spec §2: (range_bottom, range_top, residuals, gate_logits) for the custom ops that take the range
        parameters themselves with `range_mode_code` and compute (lo, hi) inside their first kernel (and check
        them against x); the quantizer is initialised from x on first use, as its forward would be."""
        if not self._initialized:
            self.initialize(x)
        return self.range_bottom, self.range_top, self.effective_residuals(), self.effective_gate_logits()

    def forward(self, x: Tensor) -> Tensor:
        if not self._initialized:
            self.initialize(x)
        lo, hi = self.range()
        return ddq_quantize(x, lo, hi, self.effective_residuals(), self.effective_gate_logits(), self.axis, self.min_bits, self.grad_scale)

    def extra_repr(self) -> str:
        granularity = "per tensor" if self.axis is None else f"per channel ({self.groups})"
        return (f"mode={self.mode}, {granularity}, bits={self.bits}, min_bits={self.min_bits}, max_bits={self.max_bits}, "
                f"learn_bits={self.learn_bits}" + (", lut_levels=True" if self.lut_levels else ""))
