"""ddq: Differentiable Dynamic Quantization (Zhang et al., ICML 2021) for quantization-aware training."""

from ddq.functional import ddq_quantize

__all__ = ["ddq_quantize"]
