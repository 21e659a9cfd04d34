"""benchmarks/print_ratios.py: which cuBLAS time each linear variant's ratio is taken over."""

import json

from benchmark_scripts import load_benchmark_script


def linear_record(variant: str, milliseconds: float) -> dict:
    return {"extra_info": {"card": "card", "torch": "t", "triton": "tr", "cuda": "c", "shape": [64, 32, 16],
                           "phase": "forward_backward", "variant": variant, "cuda_median_ms": milliseconds}}


def test_graph_variants_are_taken_over_cublas_in_a_graph(tmp_path, capsys):
    """Eager variants over eager cuBLAS; a variant captured in a CUDA graph over cuBLAS captured alike."""
    times = {"cublas": 0.2, "cublas_graph": 0.05, "ddq_cudagraphs": 0.8, "ddq_graph": 0.15}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [linear_record(v, t) for v, t in times.items()]}))
    load_benchmark_script("print_ratios").main(str(path))
    header, row = capsys.readouterr().out.splitlines()[1:3]
    assert header.split()[2:] == ["cublas", "cublas_graph", "ddq_cudagraphs", "ddq_graph"]
    assert row.split()[2:] == ["0.200", "ms", "0.050", "ms", "4.00×", "3.00×"]


def test_without_cublas_in_a_graph_graph_variants_fall_back_to_eager_cublas():
    module = load_benchmark_script("print_ratios")
    assert module.baseline("ddq_graph", {"cublas": 1.0, "ddq_graph": 2.0}) == "cublas"
    assert module.baseline("ddq_graph", {"cublas": 1.0, "cublas_graph": 0.5}) == "cublas_graph"
    assert module.baseline("ddq_cudagraphs", {"cublas": 1.0, "cublas_graph": 0.5}) == "cublas"
