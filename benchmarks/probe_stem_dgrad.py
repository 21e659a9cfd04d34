"""Time ways of computing the input gradient of ResNet18's stem convolution (7×7, stride 2, 3 → 64 channels).

FP training never computes it; DDQ needs it for the input quantizer's range and level gradients, and on
run 5's profile cuDNN spent 3.2 ms of a 22 ms step there. Usage on a CUDA machine:
`python benchmarks/probe_stem_dgrad.py [batch]`; prints milliseconds per variant (CUDA events, median).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from cuda_timing import cuda_median_ms, device_info

STRIDE, PADDING = (2, 2), (3, 3)


def input_grad(grad_out: torch.Tensor, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(grad_out, like, weight, None, STRIDE, PADDING, (1, 1), False,
                                               (0, 0), 1, (True, False, False))[0]


def padded_channels(channels: int, batch: int, grad_out: torch.Tensor, weight: torch.Tensor, layout) -> float:
    padded = torch.zeros(64, channels, 7, 7, device="cuda", dtype=weight.dtype)
    padded[:, :3] = weight
    padded = padded.contiguous(memory_format=layout)
    like = torch.empty(batch, channels, 224, 224, device="cuda", dtype=weight.dtype).contiguous(memory_format=layout)
    return cuda_median_ms(lambda: input_grad(grad_out, padded, like)[:, :3])


def main(batch: int) -> None:
    torch.backends.cudnn.benchmark = True
    print(device_info(), "batch", batch)
    weight = torch.randn(64, 3, 7, 7, device="cuda", dtype=torch.bfloat16)
    image = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    for name, layout in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
        grad_out = torch.randn(batch, 64, 112, 112, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=layout)
        w = weight.contiguous(memory_format=layout)
        x = image.contiguous(memory_format=layout)
        print(f"{name:>14} forward C=3 {cuda_median_ms(lambda: F.conv2d(x, w, None, STRIDE, PADDING)):.3f} ms")
        print(f"{name:>14} dgrad C=3 {cuda_median_ms(lambda: input_grad(grad_out, w, x)):.3f} ms")
        wgrad = lambda: torch.ops.aten.convolution_backward(grad_out, x, w, None, STRIDE, PADDING, (1, 1), False,
                                                            (0, 0), 1, (False, True, False))
        print(f"{name:>14} wgrad C=3 {cuda_median_ms(wgrad):.3f} ms")
        for channels in (4, 8, 16):
            milliseconds = padded_channels(channels, batch, grad_out, weight, layout)
            print(f"{name:>14} dgrad C={channels} (zero-padded weight) {milliseconds:.3f} ms")
        transposed = lambda: F.conv_transpose2d(grad_out, w, None, STRIDE, PADDING, output_padding=1)
        print(f"{name:>14} conv_transpose2d {cuda_median_ms(transposed):.3f} ms")
        grad32, w32, x32 = grad_out.float(), w.float(), x.float()
        print(f"{name:>14} dgrad C=3 float32 {cuda_median_ms(lambda: input_grad(grad32, w32, x32)):.3f} ms")
    grad_out = torch.randn(batch, 64, 112, 112, device="cuda", dtype=torch.bfloat16)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    x = image.contiguous(memory_format=torch.channels_last)
    padded_input = F.pad(x, (0, 0, 0, 0, 0, 1))
    print("F.pad keeps channels_last:", padded_input.is_contiguous(memory_format=torch.channels_last),
          f"pad {cuda_median_ms(lambda: F.pad(x, (0, 0, 0, 0, 0, 1))):.3f} ms")
    padded_weight = F.pad(weight, (0, 0, 0, 0, 0, 1)).contiguous(memory_format=torch.channels_last)
    padded_input = padded_input.contiguous(memory_format=torch.channels_last)
    print(f"channels_last forward C=4 {cuda_median_ms(lambda: F.conv2d(padded_input, padded_weight, None, STRIDE, PADDING)):.3f} ms")
    wgrad = lambda: torch.ops.aten.convolution_backward(grad_out, padded_input, padded_weight, None, STRIDE, PADDING,
                                                        (1, 1), False, (0, 0), 1, (False, True, False))
    print(f"channels_last wgrad C=4 {cuda_median_ms(wgrad):.3f} ms")
    rows = grad_out.permute(0, 2, 3, 1).reshape(-1, 64)
    columns = weight.reshape(64, 147)

    def gemm_fold():
        cols = (rows @ columns).reshape(batch, 112 * 112, 147).transpose(1, 2)
        return F.fold(cols, (224, 224), 7, padding=3, stride=2)

    print(f"{'gemm+fold':>14} dgrad C=3 {cuda_median_ms(gemm_fold):.3f} ms")
    reference = input_grad(grad_out, weight.contiguous(memory_format=torch.channels_last),
                            image.contiguous(memory_format=torch.channels_last)).float()
    print("gemm+fold max abs diff", (gemm_fold().float() - reference).abs().max().item(), "scale", reference.abs().max().item())


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
