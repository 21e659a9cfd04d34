"""Print the issue-3 ratio tables from a pytest-benchmark JSON of benchmarks/bench_*.py.

Usage: python benchmarks/print_ratios.py benchmarks/results/<file>.json
Ratios are CUDA-event medians over cuBLAS bf16 (x @ w.t()) of the same run; a variant captured in a CUDA
graph (name ending in _graph) over cuBLAS captured the same way, where the run has it; bandwidths over the copy.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def baseline(variant: str, times: dict) -> str:
    """The cuBLAS variant a variant's ratio is taken over: captured in a graph alike, where there is one."""
    return "cublas_graph" if variant.endswith("_graph") and "cublas_graph" in times else "cublas"


def main(path: str) -> None:
    with open(path) as handle:
        report = json.load(handle)
    linear = defaultdict(dict)
    bandwidth = {}
    steps = defaultdict(dict)
    kernel_times = {}
    info = None
    for bench in report["benchmarks"]:
        extra = bench["extra_info"]
        info = info or {k: extra.get(k) for k in ("card", "torch", "triton", "cuda")}
        if "model" in extra:
            steps[extra["model"]][extra["variant"]] = (extra["img_per_s"], extra["peak_gib"])
        elif "variant" in extra:
            linear[(tuple(extra["shape"]), extra["phase"])][extra["variant"]] = extra["cuda_median_ms"]
        elif "op" in extra:
            bandwidth[(extra["op"], extra["granularity"])] = extra["gb_per_s"]
        elif "kernel" in extra:
            kernel_times[(extra["kernel"], extra["case"])] = extra["cuda_median_ms"]
    print(f"{info}  date {report.get('datetime', '?')}")
    variants = sorted({v for times in linear.values() for v in times}, key=lambda v: (v not in ("cublas", "cublas_graph"), v))
    if linear:
        print(f"{'M×K×N':>16} {'phase':>16} " + " ".join(f"{v:>13}" for v in variants))
    for (shape, phase), times in sorted(linear.items()):
        cells = []
        for v in variants:
            if v not in times:
                cells.append(f"{'-':>13}")
            elif v in ("cublas", "cublas_graph"):
                cells.append(f"{times[v]:>10.3f} ms")
            else:
                cells.append(f"{times[v] / times[baseline(v, times)]:>12.2f}×")
        print(f"{'×'.join(map(str, shape)):>16} {phase:>16} " + " ".join(cells))
    if bandwidth:
        copy = bandwidth.get(("copy", "per_tensor"))
        for (op, granularity), gbps in sorted(bandwidth.items()):
            share = f"{gbps / copy:.0%} of copy" if copy else ""
            print(f"{op:>18} {granularity:>12} {gbps:8.0f} GB/s {share}")

    for (kernel, case), milliseconds in sorted(kernel_times.items()):
        print(f"{kernel:>32} {case:>16} {milliseconds * 1e3:8.1f} µs")

    for model, variants in sorted(steps.items()):
        fp_rate, fp_peak = variants.get("fp", (None, None))
        for variant, (rate, peak) in sorted(variants.items(), key=lambda item: (item[0] != "fp", item[0])):
            ratios = f"{rate / fp_rate:5.2f}× FP img/s, {peak / fp_peak:5.2f}× FP memory" if fp_rate else ""
            print(f"{model:>14} {variant:>14} {rate:8.0f} img/s {peak:6.2f} GiB  {ratios}")


if __name__ == "__main__":
    main(sys.argv[1])
