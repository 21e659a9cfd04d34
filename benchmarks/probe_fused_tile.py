"""FUSED's two column tiles side by side on one card (docs/kernels.md, run 14's follow-up): the wide 64 × 64 tile and
the narrow 128 × 32 one on shapes with K ≤ 32, N > 32. Prints whether ∂x agrees bit for bit (the same v in the
same order), the relative differences of ∂W_q and the histogram (other chunks and summation orders), and, on the
large shape, each tile's GPU time (`launch.graph_times`, L2 flushed before each call).

Usage on a CUDA machine: python benchmarks/probe_fused_tile.py
"""

import torch
from ddq_kernels.linear_backward_input_cuda import NARROW_TILE, WIDE_TILE, linear_backward_shared_parts
from ddq_kernels.level_table import level_table
from ddq_kernels.launch import graph_times
torch.manual_seed(0)
for M, K, N in [(100352, 32, 192), (1031, 32, 192), (259, 16, 64)]:
    x = (torch.rand(M, K, device="cuda") * 3).to(torch.bfloat16)
    w = torch.randn(N, K, device="cuda").to(torch.bfloat16) * 0.1
    gy = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    lo, hi = torch.zeros(1, device="cuda"), torch.full((1,), 2.5, device="cuda")
    logits = torch.tensor([3.0] * 4 + [-3.0] * 4, device="cuda")
    table = level_table(lo, hi, torch.zeros(1, 256, device="cuda"), logits, 1)
    outs = {t: linear_backward_shared_parts(gy, w, x, lo, hi, table, logits, 1, tile=t) for t in (WIDE_TILE, NARROW_TILE)}
    (dxw, hw, vuw, clw, pw), (dxn, hn, vun, cln, pn) = outs[WIDE_TILE], outs[NARROW_TILE]
    dw_w, dw_n = pw.sum(0), pn.sum(0)
    print(M, K, N, "dx equal", torch.equal(dxw, dxn), "dW rel", float((dw_w - dw_n).norm() / dw_w.norm()),
          "hist rel", float((hw - hn).norm() / hw.norm()), "sums", float(vuw), float(vun), float(clw), float(cln), flush=True)
    if M > 10000:
        ms = graph_times([WIDE_TILE, NARROW_TILE], lambda t: linear_backward_shared_parts(gy, w, x, lo, hi, table, logits, 1, tile=t))
        print("graph ms wide, narrow", ms, flush=True)
