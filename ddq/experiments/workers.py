"""Run independent training tasks on several GPUs at once: one process per GPU slot, each slot taking the next
task whose prerequisite has finished (issue 4: the CIFAR-10 protocol on a multi-GPU machine).

A task runs in a fresh interpreter (`python -m ddq.experiments.workers MODULE:FUNCTION ARGS_JSON`) started
with CUDA_VISIBLE_DEVICES naming only its GPU: set before the interpreter starts, because importing ddq
already asks CUDA for its devices. So every task is exactly what a one-GPU call would compute. Exit code 0
means finished, `STOPPED_EXIT` that the time budget ended first (the task saved its state and resumes on the
next call); anything else is a failure.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

STOPPED_EXIT = 3
POLL_S = 0.5


@dataclass(frozen=True)
class Task:
    name: str
    after: Optional[str] = None  # name of the task that must finish first (None: ready at once)


@dataclass
class Outcome:
    finished: list[str]
    stopped: list[str]
    failed: list[str]
    not_started: list[str]


def slot_devices(slots: int) -> list[Optional[str]]:
    """The CUDA_VISIBLE_DEVICES value of each slot: one of this process's visible GPUs each, or None (CPU)."""
    import torch

    if not torch.cuda.is_available():
        return [None] * slots
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [item.strip() for item in visible.split(",") if item.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
    if slots > len(ids):
        raise ValueError(f"{slots} workers need {slots} GPUs; this machine shows {len(ids)} ({', '.join(ids) or 'none'})")
    return ids[:slots]


def start(target: str, args: list[Any], device: Optional[str]) -> subprocess.Popen:
    """`target` ("module:function") called with the JSON-able `args` in a new interpreter that sees `device` only."""
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding `ddq`, also for an uninstalled checkout
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-m", "ddq.experiments.workers", target, json.dumps(args)], env=env)


def run_tasks(tasks: list[Task], target: str, args_for: Callable[[Task, float], list[Any]],
              devices: list[Optional[str]], remaining_s: Callable[[], float], min_start_s: float) -> Outcome:
    """Call `target` ("module:function") with `args_for(task, remaining_s())` for every task, at most one per
    device at a time, in list order among the ready ones. No task starts with less than `min_start_s` left, or
    after a failure."""
    pending, running = list(tasks), {}
    free = list(devices)
    outcome = Outcome([], [], [], [])
    while pending or running:
        for process, (task, device) in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[process]
            free.append(device)
            {0: outcome.finished, STOPPED_EXIT: outcome.stopped}.get(code, outcome.failed).append(task.name)
        blocked = {t.name for t in pending} | {t.name for t, _ in running.values()} | set(outcome.stopped) | set(outcome.failed)
        ready = [t for t in pending if t.after not in blocked]
        while ready and free and not outcome.failed and remaining_s() > min_start_s:
            task = ready.pop(0)
            device = free.pop(0)
            process = start(target, args_for(task, remaining_s()), device)
            running[process] = (task, device)
            pending.remove(task)
        if not running:
            break
        time.sleep(POLL_S)
    outcome.not_started = [t.name for t in pending]
    return outcome


def main(argv: list[str]) -> None:
    module, function = argv[0].split(":")
    getattr(importlib.import_module(module), function)(*json.loads(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
