"""Where a kernel's time goes, from Nsight Compute's CSV pages (docs/kernels.md, run 16).

Prints, for the first kernel of `ncu -i REP --page raw --csv` (profile one kernel a report, `ncu -k NAME`): the throughput, issue, stall and pipe metrics that
tell a DRAM-bound kernel from one bound by the SM; and, from `ncu -i REP --page source --csv --print-source sass`
of the same report, the shared-memory wavefronts by instruction kind (LDS, STS, ATOMS, LDSM and their widths),
with how many wavefronts each instruction took and how many were bank conflicts beyond the ideal.

Usage: python benchmarks/ncu_summary.py RAW_CSV [SASS_CSV]
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

METRICS = {
    "gpu__time_duration.sum": "duration (ncu locks the SM clock)",
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": "DRAM throughput %",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM throughput %",
    "l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed": "L1 LSU data-pipe wavefronts % of peak",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed": "  of which shared memory %",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue active %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved occupancy %",
    "launch__registers_per_thread": "registers a thread",
    "launch__shared_mem_per_block_dynamic": "dynamic shared memory a block",
    "smsp__inst_executed.sum": "warp instructions executed",
    "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio": "stall short scoreboard / issue",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": "stall wait / issue",
    "smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio": "stall not selected / issue",
    "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio": "stall MIO throttle / issue",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": "stall barrier / issue",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": "stall long scoreboard / issue",
    "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active": "ALU pipe %",
    "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active": "FMA pipe %",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active": "XU pipe %",
    "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active": "LSU pipe %",
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active": "tensor pipe %",
}
SHARED_OPCODES = ("LDS", "STS", "ATOMS", "LDSM")


def print_metrics(raw_csv: str) -> None:
    """The first kernel's row of the raw page (row 0 names the metrics, row 1 their units)."""
    rows = list(csv.reader(open(raw_csv)))
    column = {name: j for j, name in enumerate(rows[0])}
    kernel = rows[2][column["Kernel Name"]] if "Kernel Name" in column else "?"
    print(f"== {kernel}")
    for metric, label in METRICS.items():
        if metric in column:
            print(f"  {label:45s} {rows[2][column[metric]]} {rows[1][column[metric]]}")


def opcode(source: str) -> str | None:
    words = source.split()
    if not words:
        return None
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def print_shared_wavefronts(sass_csv: str) -> None:
    """Shared-memory wavefronts by (opcode, wavefronts an instruction), largest first."""
    rows = list(csv.reader(open(sass_csv)))
    header = next(i for i, row in enumerate(rows) if "L1 Wavefronts Shared" in row)
    column = {name: j for j, name in enumerate(rows[header])}

    def value(row: list[str], name: str) -> float:
        text = row[column[name]].replace(",", "") if column[name] < len(row) else ""
        return float(text) if text else 0.0

    totals: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for row in rows[header + 1:]:
        op = opcode(row[column["Source"]]) if len(row) > column["Source"] else None
        if op is None or not op.startswith(SHARED_OPCODES):
            continue
        executed = value(row, "Instructions Executed")
        wavefronts = value(row, "L1 Wavefronts Shared")
        total = totals[(op, round(wavefronts / max(executed, 1.0), 2))]
        total[0] += executed
        total[1] += wavefronts
        total[2] += value(row, "L1 Wavefronts Shared Excessive")
        total[3] += 1
    everything = sum(total[1] for total in totals.values())
    print(f"  shared-memory wavefronts by instruction (total {everything / 1e6:.1f}M): opcode, wavefronts an "
          "instruction, sites, instructions, wavefronts, excess over ideal")
    for (op, per), (executed, wavefronts, excess, sites) in sorted(totals.items(), key=lambda item: -item[1][1]):
        if wavefronts > 0.005 * everything:
            print(f"    {op:16s} {per:5.2f} {sites:3d} sites {executed / 1e6:7.2f}M instr {wavefronts / 1e6:7.2f}M wf "
                  f"{excess / 1e6:7.2f}M excess")


if __name__ == "__main__":
    print_metrics(sys.argv[1])
    if len(sys.argv) > 2:
        print_shared_wavefronts(sys.argv[2])
