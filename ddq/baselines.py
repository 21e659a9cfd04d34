"""Baseline quantizers for comparisons in the same code base: LSQ (Esser et al., ICLR 2020).

`LSQQuantizer` learns one step size per tensor (activations) or per output channel (weights) with
LSQ's gradient scale 1/√(numel·Q_p); rounding is straight-through. It exposes the same `.bits` and
`.levels()` as `DDQQuantizer`, so `quantize_model(..., method="lsq")`, the resource report and the
demo treat both alike.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ddq.functional import FLOAT_INPUT_DTYPES
from ddq.quantizer import is_int

SIGNEDNESS = ("signed", "unsigned", "auto")


def _round_straight_through(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _scale_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by `scale` (LSQ's gradient scaling)."""
    return x * scale + (x - x * scale).detach()


class LSQQuantizer(nn.Module):
    """LSQ fake quantizer: x_q = round(clamp(x/s, −Q_n, Q_p))·s with a learned step s > 0."""

    def __init__(self, bits: int = 4, signedness: str = "auto", channels: Optional[int] = None) -> None:
        super().__init__()
        if not is_int(bits) or not 1 <= bits <= 8:
            raise ValueError(f"LSQQuantizer: bits must be an int in [1, 8], got {bits!r}")
        if signedness not in SIGNEDNESS:
            raise ValueError(f"LSQQuantizer: signedness must be one of {SIGNEDNESS}, got {signedness!r}")
        if signedness in ("signed", "auto") and bits < 2:
            raise ValueError("LSQQuantizer: a signed grid needs bits >= 2")
        self.fixed_bits = bits
        self.signedness = signedness
        self.axis = None if channels is None else 0
        self.step = nn.Parameter(torch.ones(1 if channels is None else channels))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed_code", torch.tensor(SIGNEDNESS.index(signedness)))
        self._initialized = False
        self._register_load_state_dict_pre_hook(self._restore_python_state, with_module=False)

    def _restore_python_state(self, state_dict, prefix, *args) -> None:
        code = state_dict.get(prefix + "signed_code")
        if code is not None:
            self.signedness = SIGNEDNESS[int(code)]
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._initialized = bool(flag)

    @property
    def bits(self) -> int:
        return self.fixed_bits

    @property
    def bounds(self) -> tuple[int, int]:
        """(Q_n, Q_p): the integer grid is [−Q_n, Q_p]."""
        if self.signedness == "unsigned":
            return 0, 2**self.fixed_bits - 1
        return 2 ** (self.fixed_bits - 1), 2 ** (self.fixed_bits - 1) - 1

    def _shaped(self, t: Tensor, x: Tensor) -> Tensor:
        return t if self.axis is None else t.reshape(-1, *([1] * (x.dim() - 1)))

    def _check_shape(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dtype not in FLOAT_INPUT_DTYPES:
            raise TypeError(f"LSQQuantizer: x must be a float32, float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
        if self.axis == 0 and (x.dim() == 0 or x.shape[0] != self.step.shape[0]):
            raise ValueError(f"LSQQuantizer: a per-channel quantizer of {self.step.shape[0]} channels got x of shape {tuple(x.shape)}")

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """LSQ's initialisation s = 2·mean|x|/√Q_p (per channel for weights), from a non-empty, finite x."""
        self._check_shape(x)
        if x.numel() == 0:
            raise ValueError(f"LSQQuantizer: cannot initialise the step from an empty batch of shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("LSQQuantizer: cannot initialise the step from a batch with NaN or infinite values")
        if self.signedness == "auto":
            self.signedness = "unsigned" if bool((x >= 0).all()) else "signed"
            self.signed_code.fill_(SIGNEDNESS.index(self.signedness))
        magnitude = x.detach().abs().to(torch.float32)
        mean = magnitude.mean().reshape(1) if self.axis is None else magnitude.reshape(x.shape[0], -1).mean(dim=1)
        self.step.copy_((2 * mean / self.bounds[1] ** 0.5).clamp_min(1e-8))
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def levels(self) -> Tensor:
        """The (G, 2^b) quantization levels, like `DDQQuantizer.levels`."""
        q_n, q_p = self.bounds
        grid = torch.arange(-q_n, q_p + 1, device=self.step.device, dtype=torch.float32)
        return self.step.abs()[:, None] * grid

    def forward(self, x: Tensor) -> Tensor:
        if not self._initialized:
            self.initialize(x)
        self._check_shape(x)
        if x.numel() == 0:
            return x.clone()  # LSQ's gradient scale 1/√(numel·Q_p) is undefined without elements
        q_n, q_p = self.bounds
        per_step = x.numel() if self.axis is None else x[0].numel()
        step = _scale_gradient(self.step.abs().clamp_min(1e-8), (per_step * q_p) ** -0.5)
        step = self._shaped(step, x)
        return (_round_straight_through(torch.clamp(x / step, -q_n, q_p)) * step).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.fixed_bits}, {self.signedness}, {'per tensor' if self.axis is None else 'per channel'}"
