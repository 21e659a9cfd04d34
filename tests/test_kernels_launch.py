"""`ddq_kernels.launch.fastest_config`: which candidate it keeps, and how it times them."""

import time

import pytest
import torch

from ddq_kernels import launch


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(launch, "_FASTEST", {})


def test_interpreter_keeps_the_first_candidate_without_running_any(fresh_cache, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def run(config):
        raise AssertionError("the interpreter must not time candidates")

    assert launch.fastest_config("k", 1, [{"a": 1}, {"a": 2}], run) == {"a": 1}


@pytest.mark.gpu
def test_choice_is_by_gpu_time_not_launch_cost(fresh_cache, monkeypatch):
    """A candidate whose launch costs 3 ms of host time but little GPU time beats one that keeps the GPU
    busy ~10× longer: under CUDA graphs (whole networks) only GPU time counts. Launch timing would pick
    the other."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = torch.randn(1024, 1024, device="cuda")

    def run(config):
        if config["host_heavy"]:
            time.sleep(0.003)
            return a @ a
        out = a
        for _ in range(10):
            out = out @ a
        return out

    candidates = [{"host_heavy": False}, {"host_heavy": True}]
    assert launch.fastest_config("gpu_time", 1, candidates, run) == {"host_heavy": True}
    times = launch.graph_times(candidates, run)
    assert times[1] * 4 < times[0]


@pytest.mark.gpu
def test_a_candidate_that_syncs_falls_back_to_launch_timing(fresh_cache, monkeypatch):
    """A host sync cannot be captured in a CUDA graph: every candidate is then timed by launches, found
    before any capture (a failed capture leaves the CUDA random generator unusable)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = torch.randn(512, 512, device="cuda")

    def run(config):
        out = a @ a
        if config["syncs"]:
            out.sum().item()
        for _ in range(config["matmuls"]):
            out = out @ a
        return out

    candidates = [{"syncs": True, "matmuls": 40}, {"syncs": False, "matmuls": 0}]
    assert launch.syncs_with_host(candidates[0], run) and not launch.syncs_with_host(candidates[1], run)
    graph_times = []
    monkeypatch.setattr(launch, "graph_times", lambda *args: graph_times.append(args))
    assert launch.fastest_config("sync", 1, candidates, run) == {"syncs": False, "matmuls": 0}
    assert graph_times == []
    assert torch.randn(8, device="cuda").isfinite().all()


def test_no_runnable_candidate_is_an_error(fresh_cache, monkeypatch):
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def run(config):
        raise triton.runtime.errors.OutOfResources(1 << 20, 1 << 16, "shared memory")

    with pytest.raises(RuntimeError, match="no candidate tile could run"):
        launch.fastest_config("too_big", 7, [{"a": 1}, {"a": 2}], run)
