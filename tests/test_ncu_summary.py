"""benchmarks/ncu_summary.py: metrics and shared-memory wavefronts from Nsight Compute's CSV pages."""

import csv
from pathlib import Path

from benchmark_scripts import load_benchmark_script


def write_csv(path: Path, rows: list[list[str]]) -> str:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return str(path)


def test_metrics_come_from_the_first_kernel_row(tmp_path, capsys):
    raw = write_csv(tmp_path / "raw.csv", [
        ["ID", "Kernel Name", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "launch__registers_per_thread"],
        ["", "", "%", "register/thread"],
        ["0", "fused", "18.4", "80"],
        ["1", "other", "99.0", "32"]])
    load_benchmark_script("ncu_summary").print_metrics(raw)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "== fused"
    assert lines[1].split()[-2:] == ["18.4", "%"] and lines[1].startswith("  DRAM throughput")
    assert lines[2].split()[-2:] == ["80", "register/thread"]


def test_shared_wavefronts_group_by_opcode_and_rate(tmp_path, capsys):
    """Predicated and plain sites of one opcode at one rate add up; other opcodes and rates stay apart; global
    loads are left out."""
    header = ["Address", "Source", "Instructions Executed", "L1 Wavefronts Shared", "L1 Wavefronts Shared Excessive"]
    sass = write_csv(tmp_path / "sass.csv", [
        ["Kernel Name", "fused"], header,
        ["0x0", "ATOMS.ADD RZ, [R1], R2 ;", "1,000,000", "3,500,000", "2,500,000"],
        ["0x10", "@P0 ATOMS.ADD RZ, [R3], R2 ;", "1,000,000", "3,500,000", "2,500,000"],
        ["0x20", "LDS.128 R4, [R5] ;", "1,000,000", "8,000,000", "4,000,000"],
        ["0x30", "LDS.128 R8, [R5+0x10] ;", "1,000,000", "4,000,000", "0"],
        ["0x40", "LDG.E R9, [R10.64] ;", "1,000,000", "0", "0"]])
    load_benchmark_script("ncu_summary").print_shared_wavefronts(sass)
    lines = capsys.readouterr().out.splitlines()
    assert "total 19.0M" in lines[0]
    rows = [line.split() for line in lines[1:]]
    assert [(row[0], row[1], row[2]) for row in rows] == [("LDS.128", "8.00", "1"), ("ATOMS.ADD", "3.50", "2"),
                                                          ("LDS.128", "4.00", "1")]
    assert rows[1][4:] == ["2.00M", "instr", "7.00M", "wf", "5.00M", "excess"]
