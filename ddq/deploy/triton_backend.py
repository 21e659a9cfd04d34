"""backend="triton": the Triton kernel of ddq_kernels.int_gemm (GPU, or the interpreter)."""

from __future__ import annotations

import os

import numpy as np
import torch

from ddq.deploy.int_gemm import GemmArgs
from ddq.deploy.packing import container_bits, pack


def triton_device() -> torch.device:
    """CUDA when present, else the CPU under the Triton interpreter; a clear error otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    raise RuntimeError("backend 'triton' needs a CUDA GPU, or the Triton interpreter on CPU: set TRITON_INTERPRET=1 "
                       "before triton is imported")


def packed_for_triton(codes_w: np.ndarray, bits_w: int) -> np.ndarray:
    """Spec §5 packing, with 4-bit-container rows padded by zero bytes to whole int32 words so that every 3-
    and 4-bit layer takes the kernel's nibble decode (ddq_kernels/nibble_ptx.py; K ≡ 0 or 7 mod 8 needs
    no padding). The extra codes lie past K, where every path multiplies them by a zero activation."""
    packed = pack(codes_w, bits_w)
    if container_bits(bits_w) != 4 or packed.shape[1] % 4 == 0:
        return packed
    return np.pad(packed, ((0, 0), (0, -packed.shape[1] % 4)))


def int_gemm_triton(args: GemmArgs) -> tuple[np.ndarray, np.ndarray]:
    """Spec §5 through the Triton kernel on validated arguments (weights packed here)."""
    device = triton_device()
    try:
        from ddq_kernels.int_gemm import int_gemm_packed
    except ImportError as error:
        raise RuntimeError(f"backend 'triton' needs triton and ddq_kernels ({error})") from None

    def to_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    acc, codes = int_gemm_packed(to_device(args.codes_x), to_device(args.lut_x),
                                 to_device(packed_for_triton(args.codes_w, args.bits_w)), to_device(args.lut_w),
                                 to_device(args.mult), to_device(args.offset), args.shift, to_device(args.i_min),
                                 args.bits_out, args.bits_w, args.shape[2])
    return acc.cpu().numpy(), codes.cpu().numpy()
