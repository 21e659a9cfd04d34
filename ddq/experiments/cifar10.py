"""`python -m ddq.experiments.cifar10`: FP vs LSQ vs DDQ on CIFAR-10 with ResNet-20 and MobileNetV2 (issue 4).

Phases: `pretrain` trains each network in float from scratch (SGD, momentum 0.9, lr 0.1 cosine, wd 5e-4) and
writes WORK/fp_<model>.pt; `qat` fine-tunes that one checkpoint with every configured run under the same
schedule (FP fine-tuned as long is the ceiling); `all` does both; `estimate` times a few steps of each
kind of run and projects the protocol's GPU time. Data stays on the device as uint8 and is augmented per
batch (random crop with 4-pixel zero padding, horizontal flip); bf16 autocast and channels_last on CUDA.

Resumable: a run whose result JSON exists is skipped, an unfinished run continues from its last epoch end
(WORK/partial/), and `--time-budget-s` stops a call cleanly before a wall-clock limit. Every call rewrites
the report under --out (results.json, table.md, bits_<model>.png, curves_<model>.png). docs/cifar10.md
gives the protocol and the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import ddq
from ddq.demo import RunConfig, make_progress
from ddq.resource import budget_at, set_learned_bits
from ddq.experiments import report, workers as worker_pool
from ddq.experiments.shards import DataError, DeviceImages, load_shards
from ddq.models import MobileNetV2Cifar, ResNet20
from ddq.optim import (FREEZE_BITS_AT, GATE_LR, RANGE_LR_SCALE_HELP, RANGE_LR_SCALES, freeze_bits_once_within_budget, gate_optimizer,
                       parameter_groups)
from ddq.train import atomic_save, setting_differences, warmup_cosine

MODELS = ("resnet20", "mobilenetv2")
RUNS = {
    "fp": RunConfig("fp", None),
    "lsq_w4a4": RunConfig("lsq_w4a4", "lsq", 4),
    "ddq_w4a4": RunConfig("ddq_w4a4", "ddq", 4),
    "lsq_w2a2": RunConfig("lsq_w2a2", "lsq", 2),
    "ddq_w2a2": RunConfig("ddq_w2a2", "ddq", 2),
    "ddq_mixed4": RunConfig("ddq_mixed4", "ddq", 4, learn_bits="weights"),
    "ddq_mixed3": RunConfig("ddq_mixed3", "ddq", 3, learn_bits="weights"),
}
ONE_SEED_RUNS = ("fp", "lsq_w4a4", "ddq_w4a4")
PHASES = ("pretrain", "qat", "all", "estimate")
# Settings that define a result: a finished run or a partial state made under other values is not reused.
PROTOCOL_KEYS = ("train_shards", "pretrain_epochs", "epochs", "batch_size", "pretrain_lr", "lr", "momentum", "weight_decay",
                 "quant_lr", "gate_lr", "resource_strength", "dual_rate", "resnet_width", "mobilenet_width", "pretrain_seed",
                 "range_lr_scale")
# Keys added after results were saved: a saved protocol without one was made at this value.
PROTOCOL_KEYS_ADDED = {"range_lr_scale": "width"}
# Settings that define an FP checkpoint, with its network's width: QAT does not start from one made under others.
PRETRAIN_KEYS = ("train_shards", "pretrain_epochs", "batch_size", "pretrain_lr", "momentum", "weight_decay", "pretrain_seed")
WIDTH_KEYS = {"resnet20": "resnet_width", "mobilenetv2": "mobilenet_width"}


@dataclass
class Settings:
    data_dir: str
    phase: str = "all"
    out: str = "benchmarks/results/accuracy"
    work_dir: str = "ddq_runs/cifar10/work"
    models: tuple[str, ...] = MODELS
    runs: tuple[str, ...] = tuple(RUNS)
    seeds: int = 2
    one_seed_runs: tuple[str, ...] = ONE_SEED_RUNS
    train_shards: Optional[int] = None
    pretrain_epochs: int = 200
    epochs: int = 30
    batch_size: int = 256
    pretrain_lr: float = 0.1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    quant_lr: float = 1e-3
    gate_lr: float = GATE_LR
    range_lr_scale: str = "width"
    resource_strength: float = 1e-3
    dual_rate: float = 0.05
    resnet_width: int = 16
    mobilenet_width: float = 1.0
    pretrain_seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    time_budget_s: Optional[float] = None
    estimate_steps: int = 20
    eval_batch: int = 1000
    progress: bool = True
    workers: int = 1

    def protocol(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in PROTOCOL_KEYS}

    def pretraining(self, model: str) -> dict[str, Any]:
        return {key: getattr(self, key) for key in PRETRAIN_KEYS + (WIDTH_KEYS[model],)}


class OutOfTime(Exception):
    """The call's time budget ends before the next epoch could finish; everything finished is saved."""


class Deadline:
    """Wall-clock budget of one call, counted from the start of the process's work."""

    def __init__(self, budget_s: Optional[float]) -> None:
        self.start, self.budget_s = time.monotonic(), budget_s

    def remaining(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - (time.monotonic() - self.start)

    def check(self, needed_s: float = 0.0) -> None:
        if self.remaining() <= needed_s:
            raise OutOfTime


@dataclass(frozen=True)
class Job:
    model: str
    run: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.run}_seed{self.seed}"


# ----------------------------------------------------------------------------------------- setup

def build_model(name: str, settings: Settings) -> nn.Module:
    if name == "resnet20":
        return ResNet20(width=settings.resnet_width)
    if name == "mobilenetv2":
        return MobileNetV2Cifar(width_mult=settings.mobilenet_width)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


class Environment:
    """Device, autocast and layout choices of this process, and the facts recorded with every result."""

    def __init__(self, settings: Settings) -> None:
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device is visible")
        cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if cuda else "cpu")
        self.amp_dtype = torch.bfloat16 if settings.amp == "bf16" or (settings.amp == "auto" and cuda) else None
        self.channels_last = cuda
        if cuda:
            torch.backends.cudnn.benchmark = True

    def autocast(self):
        return nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, dtype=self.amp_dtype)

    def facts(self) -> dict[str, Any]:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        return {"card": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu",
                "device": str(self.device), "amp": str(self.amp_dtype), "channels_last": self.channels_last,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                "cuda": torch.version.cuda, "triton": triton_version, "numpy": np.__version__,
                "python": platform.python_version(), "platform": platform.platform()}


class Data:
    def __init__(self, settings: Settings, env: Environment) -> None:
        train_x, train_y, test_x, test_y = load_shards(settings.data_dir, settings.train_shards)
        if len(train_y) < settings.batch_size:
            raise DataError(f"{len(train_y)} training images are fewer than one batch of {settings.batch_size}")
        self.train = DeviceImages(train_x, train_y, env.device, pad=4)
        self.test = DeviceImages(test_x, test_y, env.device)
        self.channels_last = env.channels_last

    def init_batch(self, size: int) -> Tensor:
        """The first training images, uncropped: the quantizers' range-initialisation batch (spec §2)."""
        index = torch.arange(min(size, len(self.train)), device=self.train.labels.device)
        return self.train.batch(index, self.channels_last)[0]


# ----------------------------------------------------------------------------------------- training

class Training:
    """One model's optimisation: weights by SGD with momentum (the same for FP, LSQ and DDQ), quantizer ranges
    and levels by Adam at their own rates (ddq.optim's groups), both on one cosine schedule; learned gate
    logits by plain SGD at a constant rate (ddq.optim.gate_optimizer) until FREEZE_BITS_AT of the steps,
    then frozen at the first step within budget."""

    def __init__(self, model: nn.Module, data: Data, env: Environment, settings: Settings, epochs: int, lr: float,
                 seed: int, resource: Optional[ddq.ResourceLoss] = None) -> None:
        self.model, self.data, self.env, self.settings, self.epochs, self.resource = model, data, env, settings, epochs, resource
        groups = parameter_groups(model, lr, settings.weight_decay, quant_lr=settings.quant_lr,
                                  range_lr_scale=settings.range_lr_scale, include_gates=False)
        weights = [g for g in groups if g["role"] == "weights"]
        quantizer = [g for g in groups if g["role"] != "weights"]
        self.optimizers: list[torch.optim.Optimizer] = [torch.optim.SGD(weights, lr=lr, momentum=settings.momentum)]
        if quantizer:
            self.optimizers.append(torch.optim.Adam(quantizer, lr=settings.quant_lr))
        self.gates = gate_optimizer(model, settings.gate_lr)
        self.stepping = self.optimizers + ([self.gates] if self.gates is not None else [])
        self.steps_per_epoch = len(data.train) // settings.batch_size
        schedule = warmup_cosine(epochs * self.steps_per_epoch, 0)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in self.optimizers]
        self.generator = torch.Generator(device=env.device).manual_seed(seed)
        self.epoch = 0
        self.curve: list[dict[str, Any]] = []

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "gates": None if self.gates is None else self.gates.state_dict(),
                "schedulers": [s.state_dict() for s in self.schedulers], "generator": self.generator.get_state(),
                "epoch": self.epoch, "curve": self.curve,
                "resource_strength": None if self.resource is None else self.resource.strength}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        if self.gates is not None:
            self.gates.load_state_dict(state["gates"])
        self.generator.set_state(state["generator"])
        self.epoch, self.curve = state["epoch"], state["curve"]
        if self.resource is not None:
            self.resource.strength = state["resource_strength"]

    def train_epoch(self, deadline: Deadline, desc: str) -> dict[str, Any]:
        settings, data = self.settings, self.data
        started = time.perf_counter()
        self.model.train()
        order = torch.randperm(len(data.train), device=data.train.labels.device, generator=self.generator)
        loss_sum = torch.zeros((), device=order.device)
        correct = torch.zeros((), device=order.device, dtype=torch.int64)
        progress = make_progress(self.steps_per_epoch, desc, settings.progress)
        for step in range(self.steps_per_epoch):
            deadline.check()
            index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            images, labels = data.train.augmented_batch(index, self.generator, data.channels_last)
            with self.env.autocast():
                logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels)
            objective = loss + self.resource() if self.resource is not None else loss
            for optimizer in self.stepping:
                optimizer.zero_grad(set_to_none=True)
            objective.backward()
            for optimizer in self.stepping:
                optimizer.step()
            for scheduler in self.schedulers:
                scheduler.step()
            if self.resource is not None:
                self.resource.adapt_strength(settings.dual_rate)
            if self.gates is not None and self.epoch * self.steps_per_epoch + step + 1 >= FREEZE_BITS_AT * self.epochs * self.steps_per_epoch:
                freeze_bits_once_within_budget(self.gates, self.resource)
            loss_sum += loss.detach() * len(index)
            correct += (logits.detach().argmax(1) == labels).sum()
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        seen = self.steps_per_epoch * settings.batch_size
        train_seconds = time.perf_counter() - started
        test_top1, test_loss = evaluate(self.model, data, self.env, settings.eval_batch)
        row = {"epoch": self.epoch + 1, "train_loss": float(loss_sum) / seen, "train_top1": 100.0 * float(correct) / seen,
               "test_top1": test_top1, "test_loss": test_loss, "lr": self.optimizers[0].param_groups[0]["lr"],
               "train_seconds": train_seconds, "img_s": seen / max(train_seconds, 1e-9), "seconds": time.perf_counter() - started}
        if ddq.quantized_layers(self.model):
            row.update(ddq.summarize_bits(self.model))
        if self.resource is not None:
            row["resource_strength"] = self.resource.strength
        return row

    def run(self, deadline: Deadline, desc: str, save_partial) -> None:
        """Epochs up to `self.epochs`, the state saved after each; stops (OutOfTime) when the next epoch would not fit."""
        while self.epoch < self.epochs:
            if self.curve:
                deadline.check(needed_s=1.1 * self.curve[-1]["seconds"] + 5.0)
            row = self.train_epoch(deadline, f"{desc} epoch {self.epoch + 1}/{self.epochs}")
            self.epoch += 1
            self.curve.append(row)
            print(f"{desc} epoch {self.epoch}/{self.epochs}: train loss {row['train_loss']:.4f}, test top-1 {row['test_top1']:.2f}%, "
                  f"{row['img_s']:.0f} img/s" + (f", weight bits {row['avg_weight_bits']:.2f}" if "avg_weight_bits" in row else ""),
                  flush=True)
            if self.epoch < self.epochs:
                save_partial(self.state())


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, env: Environment, batch: int) -> tuple[float, float]:
    """(top-1 %, mean cross-entropy) over the whole test split."""
    model.eval()
    correct, loss = torch.zeros((), device=env.device), torch.zeros((), device=env.device)
    for start in range(0, len(data.test), batch):
        index = torch.arange(start, min(start + batch, len(data.test)), device=env.device)
        images, labels = data.test.batch(index, data.channels_last)
        with env.autocast():
            logits = model(images).float()
        correct += (logits.argmax(1) == labels).sum()
        loss += F.cross_entropy(logits, labels, reduction="sum")
    return 100.0 * float(correct) / len(data.test), float(loss) / len(data.test)


# ----------------------------------------------------------------------------------------- files

class Store:
    """Where results (--out, kept) and working state (--work-dir: FP checkpoints, partial runs) live."""

    def __init__(self, settings: Settings) -> None:
        self.out, self.work, self.protocol = Path(settings.out), Path(settings.work_dir), settings.protocol()
        for folder in (self.out / "runs", self.out / "pretrain", self.work / "partial"):
            folder.mkdir(parents=True, exist_ok=True)

    def result_path(self, job: Job) -> Path:
        return self.out / "runs" / job.model / f"{job.run}_seed{job.seed}.json"

    def pretrain_result_path(self, model: str) -> Path:
        return self.out / "pretrain" / f"{model}.json"

    def checkpoint_path(self, model: str) -> Path:
        return self.work / f"fp_{model}.pt"

    def pretrained(self, model: str) -> bool:
        """The network's FP pretraining finished under this protocol and its checkpoint is here."""
        return self.finished(self.pretrain_result_path(model)) and self.checkpoint_path(model).exists()

    def partial_path(self, name: str) -> Path:
        return self.work / "partial" / f"{name.replace('/', '_')}.pt"

    def finished(self, path: Path) -> bool:
        """True when `path` holds a result of this protocol; a result of another protocol is an error."""
        if not path.exists():
            return False
        differences = self.differences(json.loads(path.read_text()).get("protocol", {}))
        if differences:
            raise DataError(f"{path} was made with other settings ({'; '.join(differences)}); "
                            "use another --out (and --work-dir) or the same settings")
        return True

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """How a saved protocol differs from this call's ("key: saved X, now Y"); empty when they match."""
        return setting_differences(saved, self.protocol, PROTOCOL_KEYS_ADDED)

    def load_partial(self, name: str) -> Optional[dict[str, Any]]:
        path = self.partial_path(name)
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        differences = self.differences(state.get("protocol") or {})
        if differences:
            raise DataError(f"{path} was made with other settings ({'; '.join(differences)}); delete it or use the same settings")
        return state

    def save_fp_checkpoint(self, model: str, state: dict[str, Tensor], pretraining: dict[str, Any]) -> None:
        atomic_save({"model": state, "pretraining": pretraining}, self.checkpoint_path(model))

    def load_fp_checkpoint(self, model: str, pretraining: dict[str, Any]) -> dict[str, Tensor]:
        """The network's FP weights, refused (naming the settings that differ) unless pretrained under `pretraining`."""
        path = self.checkpoint_path(model)
        if not path.exists():
            raise DataError(f"{model} needs the FP checkpoint {path}: run --phase pretrain first (same --work-dir)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        recorded = self.recorded_pretraining(model, saved)
        if recorded is None:
            raise DataError(f"{path} does not record the settings it was pretrained under (written before they were "
                            f"recorded, and {self.pretrain_result_path(model)} is missing); pretrain again with another --work-dir")
        differences = setting_differences(recorded, pretraining, {})
        if differences:
            raise DataError(f"{path} was pretrained with other settings ({'; '.join(differences)}); use the same settings, "
                            "or another --work-dir (and --out) to pretrain under these")
        return saved["model"] if "pretraining" in saved else saved

    def recorded_pretraining(self, model: str, saved: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The settings a loaded fp_<model>.pt was pretrained under: recorded in it, or, for a checkpoint written
        before they were, in the protocol of the pretraining result written with it (pretrain/<model>.json)."""
        if "pretraining" in saved:
            return saved["pretraining"]
        result = self.pretrain_result_path(model)
        return json.loads(result.read_text()).get("protocol") if result.exists() else None

    def save_partial(self, name: str, state: dict[str, Any]) -> None:
        atomic_save({**state, "protocol": self.protocol}, self.partial_path(name))

    def drop_partial(self, name: str) -> None:
        self.partial_path(name).unlink(missing_ok=True)

    def write_json(self, path: Path, payload: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(payload, indent=1))
        temporary.replace(path)


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def weight_kib_float(model: nn.Module) -> float:
    """Size of the conv and linear weights at 32 bits (the layers a quantized model stores at low bits)."""
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return params * 32 / 8 / 1024


# ----------------------------------------------------------------------------------------- phases

def to_device(model: nn.Module, env: Environment) -> nn.Module:
    model = model.to(env.device)
    return model.to(memory_format=torch.channels_last) if env.channels_last else model


def pretrain(model_name: str, data: Data, env: Environment, settings: Settings, store: Store, deadline: Deadline) -> None:
    path = store.pretrain_result_path(model_name)
    if store.pretrained(model_name):
        print(f"{model_name} FP pretraining: done earlier ({path})", flush=True)
        return
    name = f"{model_name}/pretrain"
    torch.manual_seed(settings.pretrain_seed)
    model = to_device(build_model(model_name, settings), env)
    training = Training(model, data, env, settings, settings.pretrain_epochs, settings.pretrain_lr, settings.pretrain_seed)
    partial = store.load_partial(name)
    if partial is not None:
        training.load_state(partial)
        print(f"{name}: resuming after epoch {training.epoch}", flush=True)
    training.run(deadline, name, lambda state: store.save_partial(name, state))
    store.save_fp_checkpoint(model_name, cpu_state(model), settings.pretraining(model_name))
    last = training.curve[-1]
    store.write_json(path, {"model": model_name, "top1": last["test_top1"], "test_loss": last["test_loss"], "curve": training.curve,
                            "params": sum(p.numel() for p in model.parameters()), "protocol": store.protocol,
                            "environment": env.facts(), "seconds": sum(r["seconds"] for r in training.curve)})
    store.drop_partial(name)


def prepare_qat_model(job: Job, fp_state: dict[str, Tensor], data: Data, env: Environment,
                      settings: Settings) -> tuple[nn.Module, Optional[ddq.ResourceLoss], Optional[dict[str, float]]]:
    """The FP checkpoint, quantized for the run (first and last layer at 8 bits; BatchNorm stays float), with
    quantizer ranges initialised on the first training images, and the mixed runs' ResourceLoss."""
    config = RUNS[job.run]
    torch.manual_seed(job.seed)
    model = build_model(job.model, settings)
    model.load_state_dict(fp_state)
    if config.method is None:
        return to_device(model, env), None, None
    options: dict[str, Any] = {"learn_bits": config.learn_bits, "learn_levels": True} if config.method == "ddq" else {}
    model = ddq.quantize_model(model, config.bits, config.bits, method=config.method, first_last_bits=config.first_last_bits,
                               inplace=True, **options)
    model = to_device(model, env)
    with env.autocast():
        ddq.initialize_quantizers(model, data.init_batch(settings.batch_size))
    if not config.learn_bits:
        return model, None, None
    weight_budget, bitops_budget = budget_at(model, config.bits)
    set_learned_bits(model, 8)
    if config.learn_bits is not True:  # activations stay at their bits: the weight size is the whole budget
        bitops_budget = None
    resource = ddq.ResourceLoss(model, weight_bits=weight_budget, bitops=bitops_budget, strength=settings.resource_strength)
    return model, resource, {"avg_weight_bits": weight_budget, "avg_bitops_per_mac": bitops_budget}


def run_qat(job: Job, data: Data, env: Environment, settings: Settings, store: Store, deadline: Deadline) -> None:
    path = store.result_path(job)
    if store.finished(path):
        print(f"{job.name}: done earlier ({path})", flush=True)
        return
    fp_state = store.load_fp_checkpoint(job.model, settings.pretraining(job.model))
    model, resource, budget = prepare_qat_model(job, fp_state, data, env, settings)
    training = Training(model, data, env, settings, settings.epochs, settings.lr, job.seed, resource)
    partial = store.load_partial(job.name)
    if partial is None:
        top1_at_init, _ = evaluate(model, data, env, settings.eval_batch)
    else:
        training.load_state(partial)
        top1_at_init = partial["top1_at_init"]
        print(f"{job.name}: resuming after epoch {training.epoch}", flush=True)
    training.run(deadline, job.name, lambda state: store.save_partial(job.name, {**state, "top1_at_init": top1_at_init}))
    last, config = training.curve[-1], RUNS[job.run]
    result: dict[str, Any] = {"model": job.model, "run": job.run, "seed": job.seed, "method": config.method or "fp",
                              "bits": config.bits if config.method else 32, "learn_bits": config.learn_bits,
                              "first_last_bits": config.first_last_bits if config.method else None,
                              "top1": last["test_top1"], "test_loss": last["test_loss"], "top1_at_init": top1_at_init,
                              "final_train_loss": training.curve[-1]["train_loss"], "curve": training.curve,
                              "params": sum(p.numel() for n, p in model.named_parameters() if "quantizer" not in n),
                              "seconds": sum(r["seconds"] for r in training.curve), "budget": budget,
                              "protocol": store.protocol, "environment": env.facts()}
    if config.method is None:
        result.update(avg_weight_bits=32.0, avg_act_bits=32.0, weight_kib=weight_kib_float(model))
    else:
        result.update(ddq.summarize_bits(model))
        result["layers"] = [row._asdict() for row in ddq.model_bits_report(model)]
    store.write_json(path, result)
    store.drop_partial(job.name)


def jobs(settings: Settings) -> list[Job]:
    return [Job(model, run, seed) for model in settings.models for run in settings.runs
            for seed in range(1 if run in settings.one_seed_runs else settings.seeds)]


def estimate(data: Data, env: Environment, settings: Settings, store: Store) -> dict[str, Any]:
    """Time `estimate_steps` training steps (after 3 warm-up steps) and one evaluation per model and kind of
    run, from random FP weights, and project the whole configured protocol's time from them."""
    measured: dict[str, dict[str, float]] = {}
    steps_per_epoch = len(data.train) // settings.batch_size
    for model_name in settings.models:
        torch.manual_seed(0)
        fp_state = build_model(model_name, settings).state_dict()
        kinds = ("fp",) + tuple(run for run in settings.runs if run != "fp")
        measured[model_name] = {}
        for kind in kinds:
            model, resource, _ = prepare_qat_model(Job(model_name, kind, 0), fp_state, data, env, settings)
            training = Training(model, data, env, settings, 1, settings.lr, 0, resource)
            training.steps_per_epoch = 3
            training.train_epoch(Deadline(None), f"{model_name} {kind} warm-up")
            training.steps_per_epoch = min(settings.estimate_steps, steps_per_epoch)
            row = training.train_epoch(Deadline(None), f"{model_name} {kind} timing")
            measured[model_name][kind] = {"step_s": row["train_seconds"] / training.steps_per_epoch,
                                          "eval_s": row["seconds"] - row["train_seconds"], "img_s": row["img_s"]}
            print(f"{model_name} {kind}: {row['img_s']:.0f} img/s, evaluation {measured[model_name][kind]['eval_s']:.2f} s", flush=True)
    projection = {}
    for model_name, kinds in measured.items():
        epoch_s = {k: v["step_s"] * steps_per_epoch + v["eval_s"] for k, v in kinds.items()}
        qat_s = sum(epoch_s[job.run] * settings.epochs for job in jobs(settings) if job.model == model_name)
        projection[model_name] = {"pretrain_s": epoch_s["fp"] * settings.pretrain_epochs, "qat_s": qat_s,
                                  "epoch_s": epoch_s}
    total = sum(p["pretrain_s"] + p["qat_s"] for p in projection.values())
    payload = {"measured": measured, "projection": projection, "total_s": total, "steps_per_epoch": steps_per_epoch,
               "jobs": [j.name for j in jobs(settings)], "protocol": store.protocol, "environment": env.facts()}
    store.write_json(store.out / "estimate.json", payload)
    parts = [f"{name}: pretrain {p['pretrain_s'] / 60:.1f} + QAT {p['qat_s'] / 60:.1f} min" for name, p in projection.items()]
    print(f"projected protocol time: {total / 60:.1f} min on {env.facts()['card']} ({', '.join(parts)})", flush=True)
    return payload


# Relative cost of a run's epoch, for the order in which parallel workers take tasks (longest first).
RUN_COST = {"ddq_mixed3": 4, "ddq_mixed4": 4, "ddq_w4a4": 3, "ddq_w2a2": 3, "lsq_w2a2": 2, "lsq_w4a4": 2, "fp": 1}
MODEL_COST = {"mobilenetv2": 2, "resnet20": 1}
MIN_TASK_START_S = 60.0  # a worker task needs start-up, the evaluation at init and one epoch to make progress


def parallel_tasks(settings: Settings) -> list[worker_pool.Task]:
    """The phases' work as worker tasks: pretrainings first, then QAT runs, longest first; a QAT run waits for
    its network's pretraining when that is part of this call."""
    pretraining = [worker_pool.Task(f"{m}/pretrain") for m in sorted(settings.models, key=lambda m: -MODEL_COST[m])] \
        if settings.phase in ("pretrain", "all") else []
    names = {t.name for t in pretraining}
    qat = [worker_pool.Task(job.name, f"{job.model}/pretrain" if f"{job.model}/pretrain" in names else None)
           for job in sorted(jobs(settings), key=lambda j: (-MODEL_COST[j.model], -RUN_COST[j.run]))] \
        if settings.phase in ("qat", "all") else []
    return pretraining + qat


def task_job(task_name: str) -> tuple[str, Optional[Job]]:
    """(network, its QAT job) of a task name "model/run_seedN"; the job is None for "model/pretrain"."""
    model_name, run = task_name.split("/")
    if run == "pretrain":
        return model_name, None
    run_name, seed = run.rsplit("_seed", 1)
    return model_name, Job(model_name, run_name, int(seed))


def run_task(settings_fields: dict[str, Any], task_name: str, budget_s: Optional[float]) -> None:
    """One worker task in its own process: a network's FP pretraining or one QAT run, stopped by `budget_s`."""
    as_tuples = {key: tuple(value) for key, value in settings_fields.items() if isinstance(value, list)}
    settings = Settings(**{**settings_fields, **as_tuples, "time_budget_s": budget_s, "workers": 1})
    env = Environment(settings)
    data, store = Data(settings, env), Store(settings)
    model_name, job = task_job(task_name)
    try:
        if job is None:
            pretrain(model_name, data, env, settings, store, Deadline(budget_s))
        else:
            run_qat(job, data, env, settings, store, Deadline(budget_s))
    except OutOfTime:
        print(f"{task_name}: time budget reached; its state is saved", flush=True)
        sys.exit(worker_pool.STOPPED_EXIT)


def finished_task(task: worker_pool.Task, store: Store) -> bool:
    model_name, job = task_job(task.name)
    return store.pretrained(model_name) if job is None else store.finished(store.result_path(job))


def run_on_workers(settings: Settings, store: Store, deadline: Deadline) -> list[str]:
    """The phases on `settings.workers` processes, one GPU each (or all on the CPU); returns the unfinished tasks.
    Tasks finished earlier are skipped here, so no worker spends a start-up on them."""
    try:
        devices = worker_pool.slot_devices(settings.workers) if settings.device != "cpu" else [None] * settings.workers
    except ValueError as error:
        raise DataError(f"--workers {settings.workers}: {error}") from error
    tasks = []
    for task in parallel_tasks(settings):
        if finished_task(task, store):
            print(f"{task.name}: done earlier", flush=True)
        else:
            tasks.append(task)
    fields_ = dataclasses.asdict(settings)
    outcome = worker_pool.run_tasks(tasks, "ddq.experiments.cifar10:run_task",
                                    lambda task, left: [fields_, task.name, None if math.isinf(left) else left],
                                    devices, deadline.remaining, MIN_TASK_START_S)
    if outcome.failed:
        raise DataError(f"worker task(s) {', '.join(outcome.failed)} failed (their error is printed above); "
                        "finished work is saved, call again to continue")
    return outcome.stopped + outcome.not_started


def run_sequentially(settings: Settings, data: Data, env: Environment, store: Store, deadline: Deadline) -> list[str]:
    """The phases in this process, one task after another; returns the unfinished tasks."""
    pending = [job.name for job in jobs(settings)] if settings.phase in ("qat", "all") else []
    try:
        if settings.phase in ("pretrain", "all"):
            for model_name in settings.models:
                pretrain(model_name, data, env, settings, store, deadline)
        if settings.phase in ("qat", "all"):
            for job in jobs(settings):
                run_qat(job, data, env, settings, store, deadline)
                pending.remove(job.name)
    except OutOfTime:
        return pending or ["pretraining"]
    return []


def run_experiment(settings: Settings) -> dict[str, Any]:
    """Run the configured phases; returns the status (complete or stopped by the time budget) and the summary."""
    deadline = Deadline(settings.time_budget_s)
    env = Environment(settings)
    data = Data(settings, env)  # first: a bad --data-dir leaves no folders behind
    store = Store(settings)
    report.record_command(store.out, sys.argv, env.facts())
    if settings.phase == "estimate":
        return {"complete": True, "estimate": estimate(data, env, settings, store)}
    if settings.workers > 1:
        del data  # the workers load their own copies onto their own GPUs
        pending = run_on_workers(settings, store, deadline)
    else:
        pending = run_sequentially(settings, data, env, store, deadline)
    complete = not pending
    if not complete:
        print(f"time budget of {settings.time_budget_s:.0f} s reached; finished work is saved. Still to do: "
              f"{', '.join(pending)}. Call again with the same arguments to continue.", flush=True)
    summary = report.write_report(store.out)
    print(report.markdown_table(summary), flush=True)
    print("PROTOCOL COMPLETE" if complete else f"INCOMPLETE: {len(pending)} run(s) left", flush=True)
    return {"complete": complete, "pending": pending, "summary": summary}


# ----------------------------------------------------------------------------------------- command line

def parse_args(argv: Optional[list[str]] = None) -> Settings:
    defaults = Settings(data_dir="")
    parser = argparse.ArgumentParser(prog="python -m ddq.experiments.cifar10", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", required=True, help="folder of train_NN.npz / test_NN.npz shards")
    add("--phase", choices=PHASES, default=defaults.phase)
    add("--out", default=defaults.out, help="results: run JSONs, results.json, table.md, plots")
    add("--work-dir", default=defaults.work_dir, help="FP checkpoints and partial runs")
    add("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    add("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    add("--seeds", type=int, default=defaults.seeds, help="seeds per run (runs in --one-seed-runs get seed 0 only)")
    add("--one-seed-runs", default=",".join(ONE_SEED_RUNS), help="runs trained with seed 0 only ('' for none)")
    add("--train-shards", type=int, default=None, help="use only the first N training shards (5,000 images each): a quick subset")
    add("--pretrain-epochs", type=int, default=defaults.pretrain_epochs)
    add("--epochs", type=int, default=defaults.epochs, help="QAT (and FP fine-tuning) epochs of every run")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--pretrain-lr", type=float, default=defaults.pretrain_lr, help="SGD peak lr of FP pretraining")
    add("--lr", type=float, default=defaults.lr, help="SGD peak lr of the weights in fine-tuning")
    add("--momentum", type=float, default=defaults.momentum)
    add("--weight-decay", type=float, default=defaults.weight_decay, help="weights only (quantizer parameters: none)")
    add("--quant-lr", type=float, default=defaults.quant_lr, help="Adam lr of quantizer ranges and levels (DDQ ranges ×(2^b−1))")
    add("--range-lr-scale", choices=RANGE_LR_SCALES, default=defaults.range_lr_scale, help=RANGE_LR_SCALE_HELP)
    add("--gate-lr", type=float, default=defaults.gate_lr, help="SGD lr of DDQ gate logits (mixed runs)")
    add("--resource-strength", type=float, default=defaults.resource_strength, help="initial λ of the mixed runs")
    add("--dual-rate", type=float, default=defaults.dual_rate, help="dual-ascent rate of λ per step")
    add("--resnet-width", type=int, default=defaults.resnet_width, help="ResNet-20's first-stage channels")
    add("--mobilenet-width", type=float, default=defaults.mobilenet_width, help="MobileNetV2 width multiplier")
    add("--pretrain-seed", type=int, default=defaults.pretrain_seed, help="seed of FP pretraining (one checkpoint for all runs)")
    add("--eval-batch", type=int, default=defaults.eval_batch, help="test images per evaluation batch")
    add("--device", choices=("auto", "cuda", "cpu"), default=defaults.device)
    add("--amp", choices=("auto", "bf16", "off"), default=defaults.amp, help="auto: bf16 autocast on CUDA only")
    add("--time-budget-s", type=float, default=None, help="stop cleanly (state saved) before this many seconds")
    add("--estimate-steps", type=int, default=defaults.estimate_steps, help="--phase estimate: timed steps per kind of run")
    add("--no-progress", dest="progress", action="store_false")
    add("--workers", type=int, default=defaults.workers,
        help="run tasks (pretrainings, QAT runs) in this many processes at once, one GPU each (on CPU: all on the CPU)")
    args = vars(parser.parse_args(argv))
    split = lambda text: tuple(item for item in text.split(",") if item)  # noqa: E731
    args.update(models=split(args["models"]), runs=split(args["runs"]), one_seed_runs=split(args["one_seed_runs"]))
    settings = Settings(**{f.name: args[f.name] for f in fields(Settings)})
    problems = [message for bad, message in (
        (not settings.models or any(m not in MODELS for m in settings.models), f"--models must name some of {MODELS}, got {settings.models}"),
        (not settings.runs or any(r not in RUNS for r in settings.runs), f"--runs must name some of {tuple(RUNS)}, got {settings.runs}"),
        (any(r not in RUNS for r in settings.one_seed_runs), f"--one-seed-runs must name runs of {tuple(RUNS)}"),
        (settings.seeds < 1, "--seeds must be at least 1"),
        (settings.workers < 1, "--workers must be at least 1"),
        (settings.pretrain_epochs < 1 or settings.epochs < 1, "--pretrain-epochs and --epochs must be at least 1"),
        (settings.batch_size < 1 or settings.eval_batch < 1 or settings.estimate_steps < 1,
         "--batch-size, --eval-batch and --estimate-steps must be at least 1"),
        (min(settings.pretrain_lr, settings.lr, settings.quant_lr, settings.gate_lr) <= 0, "learning rates must be positive"),
        (settings.time_budget_s is not None and settings.time_budget_s <= 0, "--time-budget-s must be positive"),
        (settings.resnet_width < 1 or settings.mobilenet_width <= 0, "--resnet-width and --mobilenet-width must be positive"),
    ) if bad]
    if problems:
        parser.error("; ".join(problems))
    return settings


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    settings = parse_args(argv)
    try:
        return run_experiment(settings)
    except DataError as error:
        sys.exit(f"python -m ddq.experiments.cifar10: error: {error}")


if __name__ == "__main__":
    main()
