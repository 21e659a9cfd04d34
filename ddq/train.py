"""`python -m ddq.train` / `ddq-train`: ImageNet-style QAT with DDQ on one or many GPUs (torchrun + DDP).

    torchrun --nproc_per_node=8 -m ddq.train --model mobilenet_v2 --train-dir /data/imagenet/train \
        --val-dir /data/imagenet/val --pretrained mobilenet_v2_fp.pth --weight-bits 4 --act-bits 4 --out runs/mbv2_w4a4

Without torchrun (no WORLD_SIZE in the environment) it trains in one process. NCCL on CUDA, gloo on CPU.
Writes under --out: log.jsonl (one JSON object per line), bits_epochNNN.{png,txt} (per-layer bitwidths),
checkpoint.pt (written atomically; `--resume auto` continues exactly where it stopped: same step, learning
rate, RNG streams, sampler position, quantizer state and resource-loss strength).

Fault injection for resume tests: with DDQ_TRAIN_FAULT_STEP=N in the environment, the last rank SIGKILLs
itself right after the optimizer step that reaches step N (before any checkpoint of that step).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import ddq
from ddq.atomic_file import write_atomically
from ddq.resource import budget_at, set_learned_bits
from ddq.distributed import gather_objects, is_distributed, state_fingerprint, sync_buffers, sync_quantizers
from ddq.imagefolder import DataError, ImageFolder, ResumableDistributedSampler, normalize
from ddq.models import SmallCNN
from ddq.optim import (FREEZE_BITS_AT, GATE_LR, QUANTIZER_TYPES, RANGE_LR_SCALE_HELP, RANGE_LR_SCALES,
                       freeze_bits_once_within_budget, gate_optimizer, parameter_groups)

TORCHVISION_MODELS = ("mobilenet_v2", "resnet18", "resnet50")
MODELS = TORCHVISION_MODELS + ("small_cnn",)
# DataLoader workers start from a thread-free forkserver where the platform has one (not Windows): forked from
# this process, after gloo/NCCL and OpenMP started threads, a worker can inherit a lock held (a rare CI hang).
LOADER_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None
METHODS = ("fp", "ddq", "lsq")
CHECKPOINT_FORMAT = "ddq.train/2"
# Settings that define the model or the trajectory: a resumed run must match them to continue exactly.
RESUME_KEYS = ("model", "width", "image_size", "method", "weight_bits", "act_bits", "learn_bits", "target_bits",
               "bitops_budget", "learn_levels", "min_bits", "first_last_bits", "act_mode", "start_bits", "batch_size",
               "epochs", "optimizer", "lr", "weight_decay", "momentum", "quant_lr", "quant_weight_decay", "gate_lr",
               "range_lr_scale", "warmup_epochs", "label_smoothing", "dual_rate", "seed", "sync_bn", "world_size")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# Keys added after checkpoints were written: a checkpoint without one was made at this value.
RESUME_KEYS_ADDED = {"range_lr_scale": "width"}


class UsageError(ValueError):
    """A problem with the command line, the data or a checkpoint, reported without a traceback."""


@dataclass
class Config:
    train_dir: str
    val_dir: str
    model: str = "mobilenet_v2"
    width: int = 16
    image_size: int = 224
    val_resize: Optional[int] = None
    pretrained: Optional[str] = None
    method: str = "ddq"
    weight_bits: int = 4
    act_bits: int = 4
    learn_bits: bool = False
    target_bits: Optional[float] = None
    bitops_budget: bool = True
    resource_strength: float = 1e-3
    dual_rate: float = 0.05
    start_bits: int = 8
    learn_levels: bool = True
    min_bits: int = 2
    first_last_bits: Optional[int] = 8
    act_mode: str = "auto"
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 4e-5
    quant_lr: Optional[float] = None
    quant_weight_decay: float = 0.0
    gate_lr: float = GATE_LR
    range_lr_scale: str = "width"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    amp: str = "auto"
    channels_last: Optional[bool] = None
    compile: bool = False
    compile_mode: str = "default"
    sync_bn: bool = False
    workers: int = 8
    device: str = "auto"
    seed: int = 0
    out: str = "ddq_runs/train"
    resume: Optional[str] = None
    log_every: int = 50
    save_every_steps: int = 0
    stop_after_steps: Optional[int] = None
    progress: bool = True
    world_size: int = 1


# ----------------------------------------------------------------------------------------- arguments

def parse_args(argv: Optional[list[str]] = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m ddq.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", required=True, help="ImageFolder root: train/<class>/<image>")
    data.add_argument("--val-dir", required=True, help="ImageFolder root with the same class folders")
    data.add_argument("--image-size", type=int, default=224, help="training crop and evaluation crop")
    data.add_argument("--val-resize", type=int, default=None, help="shorter side before the centre crop (default size/0.875)")
    data.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, default="mobilenet_v2")
    model.add_argument("--width", type=int, default=16, help="small_cnn only: channels of its first stage")
    model.add_argument("--pretrained", default=None, help="local FP checkpoint file (a state_dict, or a dict with 'model' or 'state_dict')")
    model.add_argument("--sync-bn", action="store_true", help="convert BatchNorm to SyncBatchNorm")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--method", choices=METHODS, default="ddq", help="fp trains the float model")
    quant.add_argument("--weight-bits", type=int, default=4)
    quant.add_argument("--act-bits", type=int, default=4)
    quant.add_argument("--first-last-bits", default="8", help="bits of the first and last layer, or 'same' to treat them like the rest")
    quant.add_argument("--min-bits", type=int, default=2)
    quant.add_argument("--act-mode", choices=("auto", "symmetric", "unsigned", "affine"), default="auto")
    quant.add_argument("--no-learn-levels", dest="learn_levels", action="store_false")
    quant.add_argument("--learn-bits", action="store_true", help="mixed precision: learned bits under a ResourceLoss budget")
    quant.add_argument("--target-bits", type=float, default=None,
                       help="budget: the weight size (and BitOps) of the model with learned layers at this many bits (default --weight-bits)")
    quant.add_argument("--no-bitops-budget", dest="bitops_budget", action="store_false", help="budget the weight size only")
    quant.add_argument("--resource-strength", type=float, default=1e-3, help="initial λ (adapted by dual ascent)")
    quant.add_argument("--dual-rate", type=float, default=0.05, help="dual-ascent rate of λ per step")
    quant.add_argument("--start-bits", type=int, default=8, help="bits at which learned-bit quantizers start")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=30)
    opt.add_argument("--batch-size", type=int, default=64, help="per GPU")
    opt.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    opt.add_argument("--lr", type=float, default=0.01, help="weights' peak learning rate")
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    opt.add_argument("--weight-decay", type=float, default=4e-5, help="weights' weight decay")
    opt.add_argument("--quant-lr", type=float, default=None, help="quantizer ranges and levels (default --lr)")
    opt.add_argument("--quant-weight-decay", type=float, default=0.0, help="quantizer ranges and levels")
    opt.add_argument("--gate-lr", type=float, default=GATE_LR, help="bit gates, by plain SGD (ddq.optim.gate_optimizer)")
    opt.add_argument("--range-lr-scale", choices=RANGE_LR_SCALES, default="width", help=RANGE_LR_SCALE_HELP)
    opt.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up, then cosine to 0")
    opt.add_argument("--label-smoothing", type=float, default=0.1)
    run = parser.add_argument_group("run")
    run.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="auto: bf16 autocast on CUDA, off on CPU")
    run.add_argument("--channels-last", dest="channels_last", action="store_true", default=None, help="default on CUDA")
    run.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    run.add_argument("--compile", action="store_true", help="torch.compile the DDP model (after quantizer initialisation)")
    run.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                     help="torch.compile's mode with --compile; reduce-overhead replays CUDA graphs (on one H100 DDQ "
                          "MobileNetV2 W4A4 then trains at 1.10x FP eager img/s on an H100, docs/kernels.md; not measured with DDP)")
    run.add_argument("--device", default="auto", help="auto, cuda or cpu")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default="ddq_runs/train")
    run.add_argument("--resume", default=None, help="a checkpoint.pt, or 'auto' for OUT/checkpoint.pt when it exists")
    run.add_argument("--log-every", type=int, default=50, help="steps between log.jsonl lines")
    run.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0: at epoch ends only)")
    run.add_argument("--stop-after-steps", type=int, default=None, help="checkpoint and stop once the run reaches step N")
    run.add_argument("--no-progress", dest="progress", action="store_false")
    args = vars(parser.parse_args(argv))
    try:
        return validate(Config(**args, world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    except UsageError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def validate(config: Config) -> Config:
    flb = str(config.first_last_bits)
    if flb in ("same", "None", "none"):
        config.first_last_bits = None
    elif flb.isdigit():
        config.first_last_bits = int(flb)
    else:
        raise UsageError(f"--first-last-bits must be an integer in [2, 8] or 'same', got {flb!r}")
    checks = [
        (config.method == "fp" or 1 <= config.weight_bits <= 8, f"--weight-bits must be in [1, 8], got {config.weight_bits}"),
        (config.method == "fp" or 1 <= config.act_bits <= 8, f"--act-bits must be in [1, 8], got {config.act_bits}"),
        (config.method != "lsq" or config.weight_bits >= 2, "--method lsq needs --weight-bits >= 2 (a signed LSQ grid needs 2 bits)"),
        (config.method != "lsq" or config.act_bits >= 2 or config.act_mode == "unsigned",
         "--method lsq needs --act-bits >= 2 unless --act-mode unsigned (a signed LSQ grid needs 2 bits)"),
        (config.first_last_bits is None or 2 <= config.first_last_bits <= 8, f"--first-last-bits must be in [2, 8], got {config.first_last_bits}"),
        (1 <= config.min_bits <= min(config.weight_bits, config.act_bits) or config.method != "ddq",
         f"--min-bits must be in [1, min(--weight-bits, --act-bits)], got {config.min_bits}"),
        (config.min_bits <= config.start_bits <= 8, f"--start-bits must be in [--min-bits, 8], got {config.start_bits}"),
        (config.target_bits is None or config.min_bits <= config.target_bits <= 8, f"--target-bits must be in [--min-bits, 8], got {config.target_bits}"),
        (not config.learn_bits or config.method == "ddq", "--learn-bits needs --method ddq (LSQ and FP have fixed bits)"),
        (config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}"),
        (config.image_size >= 8, f"--image-size must be at least 8, got {config.image_size}"),
        (config.model != "small_cnn" or config.image_size % 8 == 0, "--image-size must be a multiple of 8 for small_cnn"),
        (config.width >= 1, f"--width must be positive, got {config.width}"),
        (config.lr > 0 and (config.quant_lr is None or config.quant_lr > 0) and config.gate_lr > 0,
         "learning rates must be positive"),
        (config.weight_decay >= 0 and config.quant_weight_decay >= 0, "weight decays must be non-negative"),
        (0 <= config.warmup_epochs < config.epochs, f"--warmup-epochs must be in [0, --epochs), got {config.warmup_epochs}"),
        (0 <= config.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {config.label_smoothing}"),
        (config.resource_strength >= 0 and config.dual_rate >= 0, "--resource-strength and --dual-rate must be non-negative"),
        (config.workers >= 0, "--workers must be non-negative"),
        (config.log_every >= 1, "--log-every must be at least 1"),
        (config.save_every_steps >= 0, "--save-every-steps must be non-negative"),
        (config.stop_after_steps is None or config.stop_after_steps >= 1, "--stop-after-steps must be at least 1"),
        (config.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {config.device!r}"),
        (config.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is visible"),
        (config.pretrained is None or Path(config.pretrained).exists(), f"--pretrained file {config.pretrained!r} does not exist"),
        (config.pretrained is None or Path(config.pretrained).is_file(), f"--pretrained {config.pretrained!r} is not a file"),
        (not Path(config.out).exists() or Path(config.out).is_dir(), f"--out {config.out!r} is a file, not a folder"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if config.model in TORCHVISION_MODELS:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise UsageError(f"--model {config.model} needs torchvision (pip install torchvision matching your torch); "
                             "--model small_cnn needs nothing more") from None
    return config


# ----------------------------------------------------------------------------------------- process setup

@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_process(config: Config) -> Context:
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not is_distributed():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Context(rank, world_size, local_rank, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG stream of this process as tensors, tuples and numbers: types that torch.load reads with
    weights_only=True, so a checkpoint also serves as --pretrained (NumPy's key array becomes a list)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------- model

def build_model(config: Config, num_classes: int) -> nn.Module:
    if config.model == "small_cnn":
        return SmallCNN(in_channels=3, num_classes=num_classes, width=config.width, image_size=config.image_size)
    import torchvision

    return getattr(torchvision.models, config.model)(weights=None, num_classes=num_classes)


def read_state_dict(path: str) -> dict[str, Tensor]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types; say which file failed and why
        raise UsageError(f"cannot read checkpoint {path!r}: {error}") from error
    if isinstance(payload, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise UsageError(f"{path!r} holds no state_dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in payload.items()}


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str, model_name: str) -> None:
    """load_state_dict with an error that says which keys or shapes do not fit, instead of a long dump."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise UsageError(f"{source} does not fit --model {model_name}: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(mismatched)} shape mismatches "
                         f"{mismatched[:3]} (a checkpoint of another model, width or number of classes?)")
    model.load_state_dict(state)


def quantize(model: nn.Module, config: Config) -> nn.Module:
    if config.method == "fp":
        return model
    options: dict[str, Any] = dict(method=config.method, first_last_bits=config.first_last_bits, act_mode=config.act_mode, inplace=True)
    if config.method == "ddq":
        options.update(learn_bits=config.learn_bits, learn_levels=config.learn_levels, min_bits=config.min_bits)
    return ddq.quantize_model(model, config.weight_bits, config.act_bits, **options)


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.lr, config.weight_decay, quant_lr=config.quant_lr,
                              range_lr_scale=config.range_lr_scale, include_gates=False)
    for group in groups:
        if group["role"] != "weights":
            group["weight_decay"] = config.quant_weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=config.lr)


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


# ----------------------------------------------------------------------------------------- output

class JsonLog:
    """Rank 0 appends one JSON object per line; other ranks write nothing."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, event: str, **fields: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"event": event, "time": time.time(), **fields}, default=str) + "\n")
                handle.flush()


def setting_differences(saved: dict[str, Any], now: dict[str, Any], added: dict[str, Any], saved_as: str = "saved") -> list[str]:
    """"key: <saved_as> X, now Y" for every setting in `now` that the saved ones differ in; a key missing from
    `saved` counts at its value in `added` (a setting introduced after `saved` was written)."""
    return [f"{key}: {saved_as} {saved.get(key, added.get(key))!r}, now {value!r}"
            for key, value in now.items() if saved.get(key, added.get(key)) != value]


def atomic_save(payload: Any, path: Path) -> None:
    """torch.save(payload) written atomically (`write_atomically`): a reader (or a resume after a crash) sees
    the old file or the new one, never a partial one."""
    write_atomically(path, lambda handle: torch.save(payload, handle))


def bits_table(model: nn.Module) -> str:
    lines = [f"{'layer':<40} {'params':>10} {'MACs':>12} {'w bits':>6} {'a bits':>6}"]
    for row in ddq.model_bits_report(model):
        lines.append(f"{row.name:<40} {row.params:>10} {row.macs if row.macs is not None else '-':>12} {row.weight_bits:>6} {row.act_bits:>6}")
    summary = ddq.summarize_bits(model)
    lines.append(f"average weight bits {summary['avg_weight_bits']:.3f}, activation bits (per MAC) {summary['avg_act_bits']:.3f}, "
                 f"weights {summary['weight_kib']:.1f} KiB")
    return "\n".join(lines)


def plot_bits(model: nn.Module, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = ddq.model_bits_report(model)
    positions = np.arange(len(rows))
    fig, axis = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 3.8))
    axis.bar(positions - 0.2, [r.weight_bits for r in rows], 0.4, label="weights")
    axis.bar(positions + 0.2, [r.act_bits for r in rows], 0.4, label="activations")
    axis.set_xticks(positions, [r.name for r in rows], rotation=90, fontsize=6)
    axis.set_ylim(0, 8.5)
    axis.set_ylabel("bits")
    axis.set_title(title)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


# ----------------------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, config: Config, context: Context) -> None:
        self.config, self.ctx = config, context
        self.out = Path(config.out)
        self.log = JsonLog(self.out / "log.jsonl", context.is_main)
        cuda = context.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if config.amp == "bf16" or (config.amp == "auto" and cuda) else None
        self.channels_last = cuda if config.channels_last is None else config.channels_last
        self.train_set = ImageFolder(config.train_dir, config.image_size, train=True, resize=config.val_resize, what="--train-dir")
        if len(self.train_set.classes) < 2:
            raise UsageError(f"--train-dir {config.train_dir!r} has one class folder ({self.train_set.classes[0]!r}): "
                             "classification needs at least 2 classes")
        self.val_set = ImageFolder(config.val_dir, config.image_size, train=False, resize=config.val_resize,
                                   classes=self.train_set.classes, what="--val-dir")
        self.sampler = ResumableDistributedSampler(self.train_set, context.world_size, context.rank, seed=config.seed)
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        if self.steps_per_epoch == 0:
            raise UsageError(f"--train-dir has {len(self.train_set)} images: fewer than one batch of {config.batch_size} "
                             f"per rank on {context.world_size} rank(s)")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.log.write("start", config=asdict(config), steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                       world_size=context.world_size, device=str(context.device), torch=torch.__version__,
                       train_images=len(self.train_set), val_images=len(self.val_set), classes=len(self.train_set.classes))
        self.step = 0
        self.best_top1 = 0.0
        self.evaluation_pending = False
        self.resume_path = self.find_resume()
        self.resource: Optional[ddq.ResourceLoss] = None
        fault = os.environ.get("DDQ_TRAIN_FAULT_STEP")
        self.fault_step = int(fault) if fault and context.rank == context.world_size - 1 else None
        seed_everything(config.seed + context.rank)
        self.model = self.prepare_model()
        self.optimizer = make_optimizer(self.model, config)
        # Learned bits: plain SGD at a constant rate, frozen from FREEZE_BITS_AT of the steps once within budget.
        self.gate_optimizer = gate_optimizer(self.model, config.gate_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, round(config.warmup_epochs * self.steps_per_epoch)))
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
        self.train_model = self.wrap(self.model)

    # -- setup

    def find_resume(self) -> Optional[Path]:
        if self.config.resume is None:
            return None
        path = self.out / "checkpoint.pt" if self.config.resume == "auto" else Path(self.config.resume)
        if path.is_file():
            return path
        if self.config.resume == "auto":
            return None
        raise UsageError(f"--resume {self.config.resume!r}: no such checkpoint file")

    def to_device(self, images: Tensor) -> Tensor:
        images = normalize(images.to(self.ctx.device, non_blocking=True))
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def init_indices(self) -> list[int]:
        """The images of this rank's first training batch: the sampler's epoch-0 order, a permutation seeded by
        --seed (the same on every rank, sliced disjointly), so they mix classes, unlike the folder's order."""
        self.sampler.set_position(0)
        return [index for index, _ in itertools.islice(iter(self.sampler), self.config.batch_size)]

    def init_batch(self) -> Tensor:
        """The centre views of `init_indices`: the quantizers' range initialisation batch."""
        return torch.stack([self.train_set.load(index)[0] for index in self.init_indices()])

    def prepare_model(self) -> nn.Module:
        config = self.config
        model = build_model(config, len(self.train_set.classes))
        if config.pretrained is not None and self.resume_path is None:
            load_weights(model, read_state_dict(config.pretrained), f"--pretrained {config.pretrained!r}", config.model)
        model = quantize(model, config).to(self.ctx.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if config.method != "fp":
            self.initialize_quantizers(model)
            if config.learn_bits:
                # Spec §4 counts fixed-bit layers too: the budget is the whole model's weight size (and BitOps)
                # with the learned layers at --target-bits.
                weight_budget, bitops_budget = budget_at(model, config.target_bits or config.weight_bits)
                set_learned_bits(model, config.start_bits)
                self.resource = ddq.ResourceLoss(model, weight_bits=weight_budget,
                                                 bitops=bitops_budget if config.bitops_budget else None,
                                                 strength=config.resource_strength)
                self.log.write("budget", avg_weight_bits=weight_budget, avg_bitops_per_mac=bitops_budget if config.bitops_budget else None)
        if config.sync_bn and self.ctx.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def initialize_quantizers(self, model: nn.Module) -> None:
        """Ranges from this rank's first batch, then rank 0's state everywhere (ddq.distributed)."""
        with self.autocast():
            ddq.initialize_quantizers(model, self.to_device(self.init_batch()))
        quantizers = nn.ModuleList(m for m in model.modules() if isinstance(m, QUANTIZER_TYPES))
        before = state_fingerprint(quantizers)
        count = sync_quantizers(model)
        after = gather_objects({"before_sync": before, "after_sync": state_fingerprint(quantizers)})
        self.log.write("quantizer_init", quantizers=len(quantizers), synchronised=count, ranks=after)

    def wrap(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.ctx.world_size > 1:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.config.compile:
            wrapped = torch.compile(wrapped, mode=None if self.config.compile_mode == "default" else self.config.compile_mode)
        return wrapped

    # -- checkpoints

    def checkpoint_payload(self) -> Optional[dict[str, Any]]:
        states = gather_objects(rng_state(self.ctx.device))
        if not self.ctx.is_main:
            return None
        return {
            "format": CHECKPOINT_FORMAT, "config": {**asdict(self.config), "train_images": len(self.train_set)},
            "classes": self.train_set.classes,
            "step": self.step, "epoch": self.step // self.steps_per_epoch, "best_top1": self.best_top1,
            "evaluation_pending": self.evaluation_pending,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "gates": None if self.gate_optimizer is None else self.gate_optimizer.state_dict(),
            "resource": None if self.resource is None else {"strength": self.resource.strength,
                                                            "weight_bits": self.resource.weight_bits, "bitops": self.resource.bitops},
            "rng": states,
        }

    def save_checkpoint(self) -> None:
        sync_buffers(self.model)
        payload = self.checkpoint_payload()
        if payload is not None:
            started = time.time()
            atomic_save(payload, self.out / "checkpoint.pt")
            self.log.write("checkpoint", step=self.step, path=str(self.out / "checkpoint.pt"), seconds=time.time() - started)
        if is_distributed():
            dist.barrier()

    def resume_settings(self) -> dict[str, Any]:
        """What a checkpoint must have been written under to continue exactly: RESUME_KEYS and the number of
        training images (it sets the sampler's order and the steps per epoch, so the whole schedule)."""
        return {**{key: getattr(self.config, key) for key in RESUME_KEYS}, "train_images": len(self.train_set)}

    def load_checkpoint(self, path: Path) -> None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise UsageError(f"cannot read checkpoint {str(path)!r}: {error}") from error
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"{str(path)!r} is not a ddq.train checkpoint (use --pretrained for FP weights)")
        saved, now = payload["config"], self.resume_settings()
        if "train_images" not in saved:  # written before the count was recorded: it cannot be checked
            del now["train_images"]
        differences = setting_differences(saved, now, RESUME_KEYS_ADDED, "checkpoint")
        if differences:
            raise UsageError(f"cannot resume from {str(path)!r}: it was written by another configuration "
                             f"({'; '.join(differences)}); an exact continuation needs the same settings")
        if payload["classes"] != self.train_set.classes:
            raise UsageError(f"cannot resume from {str(path)!r}: its classes differ from --train-dir's")
        load_weights(self.model, payload["model"], f"checkpoint {str(path)!r}", self.config.model)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.gate_optimizer is not None:
            self.gate_optimizer.load_state_dict(payload["gates"])
        if self.resource is not None:
            self.resource.strength = payload["resource"]["strength"]
        self.step, self.best_top1 = payload["step"], payload["best_top1"]
        self.evaluation_pending = payload.get("evaluation_pending", False)
        set_rng_state(payload["rng"][self.ctx.rank], self.ctx.device)
        self.log.write("resumed", path=str(path), step=self.step)

    # -- loops

    def loader(self, dataset, sampler, shuffle_seed: int) -> DataLoader:
        workers = self.config.workers
        return DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler, num_workers=workers,
                          pin_memory=self.ctx.device.type == "cuda", drop_last=sampler is self.sampler,
                          persistent_workers=False, prefetch_factor=4 if workers else None,
                          multiprocessing_context=LOADER_START_METHOD if workers else None,
                          # The loader draws its workers' base seed from this generator, not the global RNG.
                          generator=torch.Generator().manual_seed(shuffle_seed))

    def train_epoch(self, epoch: int) -> bool:
        """One epoch from the current step; False when --stop-after-steps ended it early."""
        config = self.config
        start = self.step - epoch * self.steps_per_epoch
        self.sampler.set_position(epoch, start * config.batch_size)
        self.train_model.train()
        progress = make_progress(self.steps_per_epoch, start, f"epoch {epoch + 1}/{config.epochs}", config.progress and self.ctx.is_main)
        window_loss = torch.zeros((), device=self.ctx.device)
        window_steps, window_data, window_start = 0, 0.0, time.perf_counter()
        batches = iter(self.loader(self.train_set, self.sampler, config.seed * 1000 + epoch))
        for _ in range(start, self.steps_per_epoch):
            fetch_start = time.perf_counter()
            images, labels = next(batches)
            window_data += time.perf_counter() - fetch_start
            images, labels = self.to_device(images), labels.to(self.ctx.device, non_blocking=True)
            with self.autocast():
                loss = F.cross_entropy(self.train_model(images), labels, label_smoothing=config.label_smoothing)
            objective = loss + self.resource() if self.resource is not None else loss
            self.optimizer.zero_grad(set_to_none=True)
            if self.gate_optimizer is not None:
                self.gate_optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.gate_optimizer is not None:
                self.gate_optimizer.step()
            if self.resource is not None:
                self.resource.adapt_strength(config.dual_rate)
            self.step += 1
            if self.gate_optimizer is not None and self.step >= FREEZE_BITS_AT * self.total_steps:
                freeze_bits_once_within_budget(self.gate_optimizer, self.resource)
            if self.step == self.fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
            window_loss += loss.detach().float()
            window_steps += 1
            last_of_epoch = self.step % self.steps_per_epoch == 0
            if window_steps == config.log_every or last_of_epoch or self.stop_reached():
                self.log_window(epoch, window_loss / window_steps, window_steps, window_data, time.perf_counter() - window_start, progress)
                window_loss.zero_()
                window_steps, window_data, window_start = 0, 0.0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            # At an epoch's last step the epoch end (evaluation, checkpoint) runs first; run() stops after it.
            stopping = self.stop_reached() and not last_of_epoch
            if stopping or (config.save_every_steps and self.step % config.save_every_steps == 0 and not last_of_epoch):
                self.save_checkpoint()
            if stopping:
                if progress is not None:
                    progress.close()
                return False
        if progress is not None:
            progress.close()
        return True

    def stop_reached(self) -> bool:
        return self.config.stop_after_steps is not None and self.step >= self.config.stop_after_steps

    def log_window(self, epoch: int, loss: Tensor, steps: int, data_seconds: float, seconds: float, progress) -> None:
        if is_distributed():
            dist.all_reduce(loss)
            loss = loss / self.ctx.world_size
        images_per_s = steps * self.config.batch_size * self.ctx.world_size / max(seconds, 1e-9)
        fields = {"epoch": epoch, "step": self.step, "loss": float(loss), "lr": self.optimizer.param_groups[0]["lr"],
                  "img_s": images_per_s, "img_s_per_rank": images_per_s / self.ctx.world_size,
                  "data_wait_fraction": data_seconds / max(seconds, 1e-9)}
        if self.resource is not None:
            fields.update(resource_strength=self.resource.strength, over_budget=self.resource.over_budget())
        if self.ctx.device.type == "cuda":
            fields["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        self.log.write("train", **fields)
        if progress is not None:
            progress.set_postfix(loss=f"{fields['loss']:.3f}", img_s=f"{images_per_s:.0f}", lr=f"{fields['lr']:.2e}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 over the whole validation set: ranks take disjoint slices (no padding), counts summed."""
        indices = list(range(self.ctx.rank, len(self.val_set), self.ctx.world_size))
        loader = self.loader(self.val_set, indices, self.config.seed)
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)
        for images, labels in loader:
            images, labels = self.to_device(images), labels.to(self.ctx.device)
            with self.autocast():
                logits = self.model(images)
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            totals[0] += (top5[:, 0] == labels).sum()
            totals[1] += (top5 == labels[:, None]).any(dim=1).sum()
            totals[2] += F.cross_entropy(logits.float(), labels, reduction="sum")
            totals[3] += len(labels)
        if is_distributed():
            dist.all_reduce(totals)
        count = max(float(totals[3]), 1.0)
        return {"top1": 100 * float(totals[0]) / count, "top5": 100 * float(totals[1]) / count,
                "val_loss": float(totals[2]) / count, "val_images": int(totals[3])}

    def check_replicas(self, epoch: int) -> None:
        """Every rank's bits and a fingerprint of its whole model state: they must be identical."""
        bits = [[r.weight_bits, r.act_bits] for r in ddq.model_bits_report(self.model)] if self.config.method != "fp" else []
        ranks = gather_objects({"rank": self.ctx.rank, "bits": bits, "state_sha256": state_fingerprint(self.model)})
        in_sync = all(r["bits"] == ranks[0]["bits"] and r["state_sha256"] == ranks[0]["state_sha256"] for r in ranks)
        self.log.write("sync_check", epoch=epoch, step=self.step, in_sync=in_sync, ranks=ranks)
        if not in_sync:
            raise RuntimeError(f"ranks disagree on the model state after epoch {epoch + 1}: {ranks}")

    def end_epoch(self, epoch: int) -> None:
        """Checkpoint the epoch's training before evaluating it, so a failing evaluation (an unreadable
        --val-dir image) loses none of it: a resume from that checkpoint evaluates first."""
        sync_buffers(self.model)
        self.check_replicas(epoch)
        self.evaluation_pending = True
        self.save_checkpoint()
        self.evaluate_epoch(epoch)

    def evaluate_epoch(self, epoch: int) -> None:
        """Evaluation, bits and log of a finished epoch, then the checkpoint again with the best top-1."""
        metrics = self.evaluate()
        self.best_top1 = max(self.best_top1, metrics["top1"])
        fields: dict[str, Any] = {"epoch": epoch, "step": self.step, **metrics, "best_top1": self.best_top1}
        if self.config.method != "fp":
            fields.update(ddq.summarize_bits(self.model), layers=[row._asdict() for row in ddq.model_bits_report(self.model)])
            if self.ctx.is_main:
                table = bits_table(self.model)
                (self.out / f"bits_epoch{epoch + 1:03d}.txt").write_text(table + "\n")
                plot_bits(self.model, self.out / f"bits_epoch{epoch + 1:03d}.png",
                          f"{self.config.model} {self.config.method} after epoch {epoch + 1}")
                print(table, flush=True)
        self.log.write("epoch", **fields)
        if self.ctx.is_main:
            print(f"epoch {epoch + 1}/{self.config.epochs}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
                  f"val loss {metrics['val_loss']:.4f}", flush=True)
        self.evaluation_pending = False
        self.save_checkpoint()

    def run(self) -> dict[str, Any]:
        if self.evaluation_pending:  # resumed from the checkpoint written before its epoch's evaluation
            self.evaluate_epoch(self.step // self.steps_per_epoch - 1)
        while self.step < self.total_steps:
            if self.stop_reached():  # checked before training: a run resumed at that step trains no further
                self.log.write("stopped", step=self.step)
                return {"step": self.step, "stopped": True}
            epoch = self.step // self.steps_per_epoch
            if self.train_epoch(epoch):
                self.end_epoch(epoch)
            else:
                self.check_replicas(epoch)
        self.log.write("done", step=self.step, best_top1=self.best_top1)
        return {"step": self.step, "stopped": False, "best_top1": self.best_top1}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    config = parse_args(argv)
    context = setup_process(config)
    try:
        try:
            Path(config.out).mkdir(parents=True, exist_ok=True)
            result = Trainer(config, context).run()
        except (UsageError, DataError, FileNotFoundError, NotADirectoryError) as error:
            sys.exit(f"python -m ddq.train: error: {error}")
        if is_distributed():
            dist.barrier()  # no rank tears its connections down while another still uses them
        return result
    finally:
        if is_distributed():
            dist.destroy_process_group()


def console_main() -> None:
    main()


if __name__ == "__main__":
    main()
