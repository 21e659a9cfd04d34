"""One DDQLinear forward+backward step (bf16, W4A4) bracketed for Nsight Compute (docs/kernels.md, run 16).

The step runs a few times first, so that `fastest_config` has picked its candidates and everything is compiled;
then one step runs between cudaProfilerStart and cudaProfilerStop, so that `ncu --profile-from-start off`
profiles that step's kernels only (one kernel a report for `ncu_summary.py`: FUSED below, `ddq_linear_forward`
for the forward). Usage on a CUDA machine, from the repository root:

    ncu --profile-from-start off --set full -k ddq_backward_input_shared -o OUT/fused python3 benchmarks/ncu_step.py 401408 576 64
    ncu -i OUT/fused.ncu-rep --page raw --csv > OUT/raw.csv
    ncu -i OUT/fused.ncu-rep --page source --csv --print-source sass > OUT/sass.csv
    python3 benchmarks/ncu_summary.py OUT/raw.csv OUT/sass.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear import build_step  # noqa: E402


def main(M: int, K: int, N: int, variant: str = "ddq") -> None:
    step = build_step(variant, M, K, N, backward=True)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]), *sys.argv[4:5])
