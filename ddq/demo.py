"""`python -m ddq.demo`: FP vs LSQ vs DDQ quantization-aware training of a small CNN on real data.

Every QAT run fine-tunes the same FP checkpoint (per seed) with the same schedule; the FP row is that
checkpoint fine-tuned as long (the fair ceiling). Runs:
- fp; lsq_w4a4; ddq_w4a4 (fixed 4 bits, learned range and levels); ddq_mixed (learned weight bits,
  activations at 4 bits as in W4A4, with a ResourceLoss whose target is the W4A4 model's weight size,
  i.e. an average of 4 bits over the learned layers); lsq_w2a2 and ddq_w2a2 (all layers, first and last included, at 2 bits).
Writes results.json, a per-layer bitwidth plot and prints a table with mean ± spread over seeds and
DDQ − LSQ differences paired by seed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import ddq
from ddq.data import load_dataset
from ddq.models import SmallCNN
from ddq.optim import (FREEZE_BITS_AT, GATE_LR, RANGE_LR_SCALE_HELP, RANGE_LR_SCALES, freeze_bits_once_within_budget, gate_optimizer,
                       parameter_groups)
from ddq.resource import budget_at, set_learned_bits
from ddq.deploy import use_lut_levels


class UsageError(ValueError):
    """Settings or data the demo cannot run with; the command line reports it without a traceback."""


@dataclass(frozen=True)
class RunConfig:
    name: str
    method: Optional[str]
    bits: int = 4
    learn_bits: Union[bool, str] = False
    first_last_bits: Optional[int] = 8


RUNS = {
    "fp": RunConfig("fp", None),
    "lsq_w4a4": RunConfig("lsq_w4a4", "lsq", 4),
    "ddq_w4a4": RunConfig("ddq_w4a4", "ddq", 4),
    "ddq_mixed": RunConfig("ddq_mixed", "ddq", 4, learn_bits="weights"),
    "lsq_w2a2": RunConfig("lsq_w2a2", "lsq", 2, first_last_bits=None),
    "ddq_w2a2": RunConfig("ddq_w2a2", "ddq", 2, first_last_bits=None),
}
# DDQ weights at most 7 bits, so the exported integer model computes what the QAT model does (spec §5's
# int8 weight LUT cannot hold an 8-bit symmetric grid); the first/last layers are W7A8 for DDQ, W8A8 for LSQ.
DEPLOYABLE_WEIGHT_BITS = 7
PAIRS = (("ddq_w4a4", "lsq_w4a4"), ("ddq_w2a2", "lsq_w2a2"), ("ddq_mixed", "ddq_w4a4"))


@dataclass
class Settings:
    data: str = "mnist"
    data_dir: Optional[str] = None
    seeds: int = 1
    fp_epochs: int = 4
    qat_epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    qat_lr: float = 5e-4
    quant_lr: float = 1e-3
    gate_lr: float = GATE_LR
    range_lr_scale: str = "width"
    resource_strength: float = 1e-3
    dual_rate: float = 0.05
    width: int = 16
    runs: tuple[str, ...] = tuple(RUNS)
    device: str = "auto"
    out: str = "ddq_runs/demo"
    progress: bool = True


class Dataset:
    """Images on the training device as float tensors in [0, 1].

    Non-negative inputs give the first layer a zero-anchored (unsigned) quantizer, so the zero padding of
    its convolution is a level and the exported integer model pads exactly (spec §5).
    """

    def __init__(self, split: tuple[np.ndarray, ...], device: torch.device) -> None:
        train_x, train_y, test_x, test_y = split
        def prepare(x: np.ndarray) -> Tensor:
            return torch.from_numpy(x).to(device, torch.float32) / 255.0
        self.train_x, self.test_x = prepare(train_x), prepare(test_x)
        self.train_y, self.test_y = torch.from_numpy(train_y).to(device), torch.from_numpy(test_y).to(device)
        self.channels, self.image_size = train_x.shape[1], train_x.shape[2]


def make_progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def train(model: nn.Module, data: Dataset, epochs: int, optimizers: list[torch.optim.Optimizer], settings: Settings,
          seed: int, desc: str, resource: Optional[ddq.ResourceLoss] = None,
          gates: Optional[torch.optim.Optimizer] = None) -> list[float]:
    """Cosine-scheduled training (one schedule for every optimizer) without augmentation; learned bits (the
    `gates` optimizer, constant rate) freeze once past FREEZE_BITS_AT of the steps and within budget.
    Returns epoch losses."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    steps_per_epoch = math.ceil(len(data.train_y) / settings.batch_size)
    total_steps = epochs * steps_per_epoch
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(total_steps, 1)) for o in optimizers]
    stepping = optimizers + ([gates] if gates is not None else [])
    step = 0
    progress = make_progress(epochs * steps_per_epoch, desc, settings.progress)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), generator=generator).to(data.train_y.device)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            index = order[start : start + settings.batch_size]
            loss = F.cross_entropy(model(data.train_x[index]), data.train_y[index])
            objective = loss + resource() if resource is not None else loss
            for optimizer in stepping:
                optimizer.zero_grad(set_to_none=True)
            objective.backward()
            for optimizer in stepping:
                optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            if resource is not None:
                resource.adapt_strength(settings.dual_rate)
            step += 1
            if gates is not None and step >= FREEZE_BITS_AT * total_steps:
                freeze_bits_once_within_budget(gates, resource)
            total += float(loss.detach()) * len(index)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(loss):.3f}")
        losses.append(total / len(order))
    if progress is not None:
        progress.close()
    return losses


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 1000) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return 100.0 * float((predict(model, x) == y).float().mean())


def run_qat(config: RunConfig, fp_state: dict, data: Dataset, settings: Settings, seed: int) -> dict:
    torch.manual_seed(seed)
    model = SmallCNN(data.channels, 10, settings.width, data.image_size).to(data.train_x.device)
    model.load_state_dict(fp_state)
    resource = None
    if config.method is None:
        optimizers, gates = [torch.optim.Adam(model.parameters(), lr=settings.qat_lr)], None
    else:
        model = ddq.quantize_model(model, config.bits, config.bits, method=config.method, learn_bits=config.learn_bits,
                                   first_last_bits=config.first_last_bits,
                                   **({"learn_levels": True, "weight_max_bits": DEPLOYABLE_WEIGHT_BITS} if config.method == "ddq" else {}))
        if config.method == "ddq":
            use_lut_levels(model)  # trains what the integer export computes (docs/deploy.md)
        ddq.initialize_quantizers(model, data.train_x[: settings.batch_size * 4])
        # Groups first: range learning rates follow the bits the layer is meant to end at, not the 8 it starts from.
        optimizers = [torch.optim.Adam(parameter_groups(model, settings.qat_lr, quant_lr=settings.quant_lr,
                                                        range_lr_scale=settings.range_lr_scale, include_gates=False))]
        gates = gate_optimizer(model, settings.gate_lr)
        if config.learn_bits:
            weight_budget, bitops_budget = budget_at(model, config.bits)
            set_learned_bits(model, 8)
            resource = ddq.ResourceLoss(model, weight_bits=weight_budget, strength=settings.resource_strength,
                                        bitops=bitops_budget if config.learn_bits is True else None)
    initial = accuracy(model, data.test_x, data.test_y)
    losses = train(model, data, settings.qat_epochs, optimizers, settings, seed, f"{config.name} seed {seed}", resource, gates)
    result = {"run": config.name, "seed": seed, "accuracy": accuracy(model, data.test_x, data.test_y),
              "accuracy_at_init": initial, "final_train_loss": losses[-1], "train_losses": losses}
    if config.method == "ddq":
        result.update(integer_model_accuracy(model, data))
    if config.method is not None:
        result.update(ddq.summarize_bits(model))
        result["layers"] = [row._asdict() for row in ddq.model_bits_report(model)]
    else:
        params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
        result.update(avg_weight_bits=32.0, avg_act_bits=32.0, weight_kib=params * 4 / 1024)
    return result


def integer_model_accuracy(model: nn.Module, data: Dataset) -> dict:
    """Spec §5: the exported integer model's test accuracy and its agreement with the float QAT model."""
    from ddq.deploy.c_backend import library_path
    from ddq.deploy.export import integer_predictions

    try:
        library_path()
        backend = "c"
    except RuntimeError:  # arm_ref not built (no C compiler at install time): the NumPy golden instead
        backend = "numpy"
    try:
        predictions = integer_predictions(model, data.test_x.cpu().numpy(), backend=backend)
    except ValueError as error:  # e.g. learned levels moved 0 off the grid of a zero-padded conv's input
        print(f"integer export not possible: {error}")
        return {"integer_accuracy": None, "integer_agreement": None, "integer_error": str(error)}
    floats = predict(model, data.test_x)
    labels = data.test_y.cpu().numpy()
    return {"integer_accuracy": 100.0 * float((predictions == labels).mean()),
            "integer_agreement": 100.0 * float((predictions == floats.cpu().numpy()).mean()), "integer_backend": backend}


def pretrain(data: Dataset, settings: Settings, seed: int) -> dict:
    torch.manual_seed(seed)
    model = SmallCNN(data.channels, 10, settings.width, data.image_size).to(data.train_x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    train(model, data, settings.fp_epochs, [optimizer], settings, seed, f"fp pretrain seed {seed}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mean_or_none(values: list[Optional[float]]) -> Optional[float]:
    """The mean, or None (JSON null) where a value is missing: FP and LSQ runs have no integer model, and a
    DDQ export can fail."""
    return None if not values or None in values else float(np.mean(values))


def format_or_dash(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def json_ready(value):
    """`value` with every non-finite float (a diverged loss, say) as None: standard JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def summarize(results: list[dict], runs: tuple[str, ...]) -> dict:
    table = {}
    for name in runs:
        rows = [r for r in results if r["run"] == name]
        acc = np.array([r["accuracy"] for r in rows])
        table[name] = {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                       "accuracy_at_init_mean": float(np.mean([r["accuracy_at_init"] for r in rows])),
                       "final_train_loss_mean": float(np.mean([r["final_train_loss"] for r in rows])),
                       "integer_accuracy_mean": mean_or_none([r.get("integer_accuracy") for r in rows]),
                       **{k: float(np.mean([r[k] for r in rows])) for k in ("avg_weight_bits", "avg_act_bits", "weight_kib")}}
    paired = {}
    for a, b in PAIRS:
        if a in runs and b in runs:
            by_seed = {r["seed"]: r["accuracy"] for r in results if r["run"] == b}
            diffs = np.array([r["accuracy"] - by_seed[r["seed"]] for r in results if r["run"] == a])
            paired[f"{a} - {b}"] = {"mean": float(diffs.mean()), "std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
                                    "per_seed": diffs.tolist()}
    return {"table": table, "paired": paired}


def format_table(summary: dict, seeds: int) -> str:
    lines = [f"{'run':<10} {'test acc %':>16} {'acc@init %':>10} {'train loss':>10} {'w bits':>7} {'a bits':>7} {'size KiB':>9} {'int acc %':>9}"]
    for name, row in summary["table"].items():
        acc = f"{row['accuracy_mean']:.2f}" + (f" ± {row['accuracy_std']:.2f}" if seeds > 1 else "")
        lines.append(f"{name:<10} {acc:>16} {row['accuracy_at_init_mean']:>10.2f} {row['final_train_loss_mean']:>10.4f} "
                     f"{row['avg_weight_bits']:>7.2f} {row['avg_act_bits']:>7.2f} {row['weight_kib']:>9.2f} "
                     f"{format_or_dash(row['integer_accuracy_mean']):>9}")
    for pair, diff in summary["paired"].items():
        lines.append(f"paired {pair}: {diff['mean']:+.2f} ± sd {diff['std']:.2f}" if seeds > 1 else f"{pair}: {diff['mean']:+.2f}")
    return "\n".join(lines)


def plot_bits(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = [r for r in results if "layers" in r and r["seed"] == results[0]["seed"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(len(runs), 1)
    for index, run in enumerate(runs):
        names = [layer["name"] for layer in run["layers"]]
        for axis, key in zip(axes, ("weight_bits", "act_bits")):
            axis.bar(np.arange(len(names)) + index * width, [layer[key] for layer in run["layers"]], width, label=run["run"])
            axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20, fontsize=8)
    for axis, title in zip(axes, ("weight bits per layer", "activation bits per layer")):
        axis.set_title(title)
        axis.set_ylim(0, 8.5)
    if runs:  # an FP-only demo has no bits to plot
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_data(settings: Settings, device: torch.device) -> Dataset:
    try:
        return Dataset(load_dataset(settings.data, settings.data_dir), device)
    except (FileNotFoundError, ValueError) as error:  # the dataset's files are not where --data-dir says
        raise UsageError(str(error)) from error


def make_out_folder(out: str) -> Path:
    """--out, made before any training, so that a path that cannot be a folder fails at once."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out!r} cannot be a folder: {error}") from error
    return Path(out)


def run_demo(settings: Settings) -> dict:
    device = torch.device("cuda" if settings.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if settings.device == "auto" else settings.device))
    problems = settings_problems(settings)
    if problems:
        raise UsageError("; ".join(problems))
    data = read_data(settings, device)
    out = make_out_folder(settings.out)
    started = time.time()
    results = []
    for seed in range(settings.seeds):
        fp_state = pretrain(data, settings, seed)
        for name in settings.runs:
            results.append(run_qat(RUNS[name], fp_state, data, settings, seed))
    summary = summarize(results, settings.runs)
    report = {"settings": asdict(settings), "device": str(device), "torch": torch.__version__,
              "platform": platform.platform(), "seconds": time.time() - started, "summary": summary, "results": results}
    (out / "results.json").write_text(json.dumps(json_ready(report), indent=2, allow_nan=False))
    plot_bits(results, out / "bits_per_layer.png")
    print(format_table(summary, settings.seeds))
    print(f"wrote {out / 'results.json'} and {out / 'bits_per_layer.png'} in {report['seconds']:.0f} s on {device}")
    return report


def parse_args(argv: Optional[list[str]] = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m ddq.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("mnist", "fashion-mnist", "cifar10"), default="mnist")
    parser.add_argument("--data-dir", default=None, help="folder of the dataset (cifar10: numpy shards)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--fp-epochs", type=int, default=None,
                        help="FP pretraining epochs (default 4; 2 for the larger sets; 0: every run starts from the untrained network)")
    parser.add_argument("--qat-epochs", type=int, default=None, help="fine-tuning epochs per run (default 4; 2 for the larger sets)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64; 128 for the larger sets")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--range-lr-scale", choices=RANGE_LR_SCALES, default="width", help=RANGE_LR_SCALE_HELP)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    large = args.data != "mnist"
    settings = Settings(
        data=args.data, data_dir=args.data_dir, seeds=args.seeds,
        fp_epochs=default_if_none(args.fp_epochs, 2 if large else 4), qat_epochs=default_if_none(args.qat_epochs, 2 if large else 4),
        batch_size=default_if_none(args.batch_size, 128 if large else 64), runs=tuple(r for r in args.runs.split(",") if r),
        device=args.device, out=args.out or f"ddq_runs/demo-{args.data}", progress=not args.no_progress,
        width=32 if args.data == "cifar10" else 16, range_lr_scale=args.range_lr_scale,
    )
    problems = settings_problems(settings)
    if problems:
        parser.error("; ".join(problems))
    return settings


def default_if_none(value: Optional[int], default: int) -> int:
    """The flag's value, 0 included; the default only where it was not given."""
    return default if value is None else value


def settings_problems(settings: Settings) -> list[str]:
    unknown = [run for run in settings.runs if run not in RUNS]
    repeated = sorted({run for run in settings.runs if settings.runs.count(run) > 1})
    checks = (
        (settings.seeds >= 1, f"--seeds must be at least 1, got {settings.seeds}"),
        (settings.fp_epochs >= 0, f"--fp-epochs must be at least 0, got {settings.fp_epochs}"),
        (settings.qat_epochs >= 1, f"--qat-epochs must be at least 1, got {settings.qat_epochs}"),
        (settings.batch_size >= 1, f"--batch-size must be at least 1, got {settings.batch_size}"),
        (bool(settings.runs), f"--runs must name at least one of {','.join(RUNS)}"),
        (not unknown, f"--runs: unknown run(s) {','.join(unknown)}; choose from {','.join(RUNS)}"),
        (not repeated, f"--runs names {','.join(repeated)} more than once"),
        (settings.data != "cifar10" or settings.data_dir is not None, "--data cifar10 needs --data-dir (the folder of its numpy shards)"),
        (settings.data_dir is None or Path(settings.data_dir).is_dir(), f"--data-dir {settings.data_dir!r} is not a folder"),
        (settings.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is visible"),
    )
    return [message for ok, message in checks if not ok]


def main(argv: Optional[list[str]] = None) -> None:
    settings = parse_args(argv)
    try:
        run_demo(settings)
    except UsageError as error:
        sys.exit(f"python -m ddq.demo: error: {error}")


if __name__ == "__main__":
    main()
