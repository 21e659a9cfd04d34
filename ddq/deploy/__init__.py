"""Integer deployment of DDQ models (DDQ_SPEC.md Section 5).

`export`/`load` write and read a trained model as a safetensors file; `int_gemm` is one integer
layer with four bit-identical backends ("numpy" golden, "c" = arm_ref, "triton", "cupy");
`IntegerModel.run` executes a whole exported model with integer layers; `integer_accuracy`
reports its accuracy beside the float QAT model's; `use_lut_levels` keeps a model's levels on the
integer tables during QAT so that the two agree (docs/deploy.md).
"""

from ddq.deploy.export import ExportedLayer, ExportFileError, IntegerModel, export, integer_accuracy, load, use_lut_levels
from ddq.deploy.int_gemm import BACKENDS, MAX_K, int_gemm
from ddq.deploy.packing import container_bits, pack, packed_row_bytes, unpack

__all__ = [
    "BACKENDS",
    "MAX_K",
    "ExportFileError",
    "ExportedLayer",
    "IntegerModel",
    "container_bits",
    "export",
    "int_gemm",
    "integer_accuracy",
    "load",
    "pack",
    "packed_row_bytes",
    "unpack",
    "use_lut_levels",
]
