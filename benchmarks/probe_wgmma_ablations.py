"""What bounds the wgmma forward (`linear_forward_wgmma`, docs/kernels.md run 25): GPU time of its kernel with parts
of its source removed by text edits: W_q's copies (noW), x's DRAM reads (xL2: x read from a window that stays in
L2), the products (nomma), alone and together. The edited kernels compute nothing meaningful; only their times
are printed, beside cuBLAS's GEMM of the same shape.
Usage on an sm_90 CUDA machine: python benchmarks/probe_wgmma_ablations.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench_cudagraph

from ddq_kernels import linear_forward_wgmma
from ddq_kernels.level_table import level_table

SHAPES = [(25088, 1024, 256), (50176, 576, 96), (401408, 576, 64)]
EDITS = {
    "noW": [("if (chunk < chunks) stage_swizzled<N_PAD>(", "if (false) stage_swizzled<N_PAD>(")],
    "xL2": [("load_vectors(x_ahead, x, row0, chunk * BLOCK_K, M, K)",
             "load_vectors(x_ahead, x, row0 % 2048, chunk % 2 * BLOCK_K, M, K)")],
    "nomma": [("wgmma_k16(acc, a + 2 * step, b + 2 * step, chunk > 0 || step > 0);", ";")],
}
VARIANTS = {"full": [], "noW": EDITS["noW"], "xL2": EDITS["xL2"], "nomma": EDITS["nomma"],
            "noW+xL2": EDITS["noW"] + EDITS["xL2"], "noW+nomma": EDITS["noW"] + EDITS["nomma"],
            "xL2+nomma": EDITS["xL2"] + EDITS["nomma"], "all3": EDITS["noW"] + EDITS["xL2"] + EDITS["nomma"]}
ORIGINAL_SOURCE = linear_forward_wgmma.kernel_source


def use(edits: list[tuple[str, str]]) -> None:
    """Compile the kernel from its source with `edits` ((old, new) text pairs) applied."""
    def source(dtype: torch.dtype, n: int) -> str:
        text = ORIGINAL_SOURCE(dtype, n)
        for old, new in edits:
            assert old in text, f"the kernel source no longer holds {old!r}"
            text = text.replace(old, new)
        return text
    linear_forward_wgmma.kernel_source = source
    linear_forward_wgmma.compiled_kernel.cache_clear()


def time_variants(M: int, K: int, N: int) -> str:
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda").relu().to(torch.bfloat16)
    w_q = (torch.randn(N, K, device="cuda") * K**-0.5).to(torch.bfloat16)
    lo, hi = torch.zeros(1, device="cuda"), torch.full((1,), 3.0, device="cuda")
    logits = torch.tensor([3.0] * 4 + [-3.0] * 4, device="cuda")
    table = level_table(lo, hi, torch.zeros(1, 256, device="cuda"), logits, 2)
    row = [f"cublas {1000 * do_bench_cudagraph(lambda: x @ w_q.t(), rep=100):6.1f}"]
    for name, edits in VARIANTS.items():
        use(edits)
        run = lambda: linear_forward_wgmma.linear_forward_wgmma(x, w_q, None, lo, hi, table, logits, 2)
        row.append(f"{name} {1000 * do_bench_cudagraph(run, rep=100):6.1f}")
    use([])
    return f"{M}x{K}x{N}: " + "  ".join(row)


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    for shape in SHAPES:
        print(time_variants(*shape), flush=True)
