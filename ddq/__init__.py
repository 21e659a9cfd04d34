"""ddq: Differentiable Dynamic Quantization (Zhang et al., ICML 2021) for quantization-aware training."""

from ddq import baselines, nn, optim
from ddq.convert import initialize_quantizers, quantize_model, quantized_layers
from ddq.functional import ddq_quantize
from ddq.quantizer import DDQQuantizer
from ddq.resource import LayerBits, ResourceLoss, model_bits_report, summarize_bits

__all__ = [
    "DDQQuantizer",
    "LayerBits",
    "ResourceLoss",
    "baselines",
    "ddq_quantize",
    "initialize_quantizers",
    "model_bits_report",
    "nn",
    "optim",
    "quantize_model",
    "quantized_layers",
    "summarize_bits",
]
