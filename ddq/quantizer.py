"""`DDQQuantizer`: one quantizer's learnable parameters and its initialisation (DDQ_SPEC.md Section 2)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ddq import quantizer_math as qm
from ddq.functional import ddq_quantize

RANGE_MODES = ("symmetric", "unsigned", "affine")
MODES = RANGE_MODES + ("auto",)
GATE_INIT_STEP = 0.25
MIN_RANGE = 1e-8
PERCENTILE_SAMPLE = 1 << 22


def graded_gate_logits(init_bits: int, step: float = GATE_INIT_STEP) -> Tensor:
    """Spec §2: θ_k = θ0·(init_bits + 1 − k) for k ≤ init_bits, −θ0·(k − init_bits) above (k = 1..8)."""
    k = torch.arange(1, qm.FINEST_BITS + 1, dtype=torch.float32)
    return torch.where(k <= init_bits, step * (init_bits + 1 - k), -step * (k - init_bits))


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
    max|x| per channel for per-channel quantizers, the 99.9th (and 0.1th) percentile per tensor.
    learn_bits=False fixes the bitwidth at init_bits; learn_levels=False keeps the levels uniform.
    """

    def __init__(
        self,
        mode: str = "symmetric",
        channels: Optional[int] = None,
        init_bits: int = 8,
        min_bits: int = 2,
        learn_bits: bool = True,
        learn_levels: bool = True,
        grad_scale: bool = True,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"DDQQuantizer: mode must be one of {MODES}, got {mode!r}")
        if not 0 <= min_bits <= qm.FINEST_BITS:
            raise ValueError(f"DDQQuantizer: min_bits must be in [0, 8], got {min_bits}")
        if not min_bits <= init_bits <= qm.FINEST_BITS:
            raise ValueError(f"DDQQuantizer: init_bits must be in [min_bits={min_bits}, 8], got {init_bits}")
        if mode in ("unsigned", "auto") and min_bits < 1:
            raise ValueError("DDQQuantizer: unsigned mode needs min_bits >= 1 (a zero-anchored grid needs two levels)")
        if channels is not None and channels < 1:
            raise ValueError(f"DDQQuantizer: channels must be None or positive, got {channels}")
        self.mode = mode
        self.axis = None if channels is None else 0
        self.min_bits = min_bits
        self.grad_scale = grad_scale
        self.learn_bits = learn_bits
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
        return qm.bitwidth_int(self.gate_logits, self.min_bits)

    def bits_tensor(self) -> Tensor:
        """The current bitwidth as a 0-d tensor (no host sync)."""
        return qm.bitwidth(self.gate_logits, self.min_bits)

    def range(self) -> tuple[Tensor, Tensor]:
        """(lo, hi) of the fine grid for the current bitwidth, shape (G,), hi > lo by construction."""
        top = self.range_top.abs().clamp_min(MIN_RANGE)
        if self.mode == "symmetric":
            return -top, top
        if self.mode == "unsigned":
            a_s, b_s = qm.unsigned_range_coefficients(self.bits_tensor().detach())
            return -a_s * top, b_s * top
        if self.mode == "affine":
            lo = self.range_bottom
            return lo, lo + (self.range_top - lo).abs().clamp_min(MIN_RANGE)
        raise RuntimeError("DDQQuantizer: mode 'auto' is resolved on the first batch; call it on data first")

    @torch.no_grad()
    def levels(self) -> Tensor:
        """Spec §5's V: the (G, 2^b) block-mean levels at the current bitwidth."""
        lo, hi = self.range()
        return qm.block_levels(lo, hi, self.residuals, self.bits)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Spec §2 steps 1–2: the integer code c = i >> (8 − b) of every element, uint8, x's shape."""
        lo, hi = self.range()
        flat = x.reshape(self.groups, -1)
        _, index = qm.fine_index(flat, lo, hi)
        return (index >> (qm.FINEST_BITS - self.bits)).to(torch.uint8).reshape(x.shape)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Spec §2 initialisation from the first tensor seen (weights: max|w| per channel)."""
        if self.mode == "auto":
            self._set_mode("unsigned" if bool((x.detach() >= 0).all()) else "symmetric")
            self.mode_code.fill_(MODES.index(self.mode))
        if self.axis == 0:
            top = x.detach().reshape(self.groups, -1).abs().amax(dim=1).to(torch.float32)
            self.range_top.copy_(top.clamp_min(MIN_RANGE))
        elif self.mode == "symmetric":
            self.range_top.fill_(self._robust_top(x.detach().abs()))
        elif self.mode == "unsigned":
            self.range_top.fill_(self._robust_top(x.detach()))
        else:
            bottom = percentile(x, 0.001)
            top = torch.maximum(percentile(x, 0.999), bottom + MIN_RANGE)
            self.range_bottom.fill_(bottom)
            self.range_top.fill_(top)
        self.initialized.fill_(True)
        self._initialized = True

    @staticmethod
    def _robust_top(x: Tensor) -> Tensor:
        """The 99.9th percentile; the max when that is 0 (a mostly-zero ReLU output), never below MIN_RANGE."""
        top = percentile(x, 0.999)
        return torch.where(top > 0, top, x.amax().to(torch.float32)).clamp_min(MIN_RANGE)

    def forward(self, x: Tensor) -> Tensor:
        if not self._initialized:
            self.initialize(x)
        lo, hi = self.range()
        return ddq_quantize(x, lo, hi, self.residuals, self.gate_logits, self.axis, self.min_bits, self.grad_scale)

    def extra_repr(self) -> str:
        granularity = "per tensor" if self.axis is None else f"per channel ({self.groups})"
        return f"mode={self.mode}, {granularity}, bits={self.bits}, min_bits={self.min_bits}, learn_bits={self.learn_bits}"
