"""The CIFAR-10 experiment's report, rebuilt from the result files under --out after every call.

results.json (table per model, paired differences, every run's result, environments, commands), table.md,
bits_<model>.png (per-layer bits of the mixed-precision runs) and curves_<model>.png (training curves).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# (run, reference): differences paired by seed.
PAIRS = (("ddq_w4a4", "lsq_w4a4"), ("ddq_w2a2", "lsq_w2a2"), ("ddq_mixed4", "ddq_w4a4"), ("ddq_mixed3", "ddq_mixed4"))
RUN_ORDER = ("fp", "lsq_w4a4", "ddq_w4a4", "lsq_w2a2", "ddq_w2a2", "ddq_mixed4", "ddq_mixed3")


def record_command(out: Path, argv: list[str], facts: dict[str, Any]) -> None:
    """Append this call's command line, card and date to out/commands.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commands.jsonl", "a") as handle:
        handle.write(json.dumps({"command": "python -m ddq.experiments.cifar10 " + " ".join(argv[1:]), **facts}) + "\n")


def read_results(out: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
    pretrain = {p.stem: json.loads(p.read_text()) for p in sorted((out / "pretrain").glob("*.json"))}
    return runs, pretrain


def spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], pretrain: dict[str, dict[str, Any]]) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for model in sorted({r["model"] for r in runs} | set(pretrain)):
        mine = [r for r in runs if r["model"] == model]
        table = {}
        for name in sorted({r["run"] for r in mine}, key=lambda n: RUN_ORDER.index(n) if n in RUN_ORDER else len(RUN_ORDER)):
            rows = [r for r in mine if r["run"] == name]
            top1 = [r["top1"] for r in rows]
            table[name] = {"seeds": sorted(r["seed"] for r in rows), "top1_mean": float(np.mean(top1)), "top1_std": spread(top1),
                           "top1_at_init_mean": float(np.mean([r["top1_at_init"] for r in rows])),
                           **{key: float(np.mean([r[key] for r in rows])) for key in ("avg_weight_bits", "avg_act_bits", "weight_kib")}}
        paired = {}
        for run, reference in PAIRS:
            by_seed = {r["seed"]: r["top1"] for r in mine if r["run"] == reference}
            diffs = [r["top1"] - by_seed[r["seed"]] for r in mine if r["run"] == run and r["seed"] in by_seed]
            if diffs:
                paired[f"{run} - {reference}"] = {"mean": float(np.mean(diffs)), "std": spread(diffs), "per_seed": diffs}
        fp = pretrain.get(model)
        models[model] = {"pretrained_fp_top1": fp["top1"] if fp else None, "table": table, "paired": paired}
    return models


def markdown_table(summary: dict[str, Any]) -> str:
    lines = []
    for model, part in summary["models"].items():
        pretrained = part["pretrained_fp_top1"]
        lines += [f"**{model}** (FP checkpoint: {pretrained:.2f} % top-1)" if pretrained is not None else f"**{model}**", "",
                  "| run | seeds | top-1 % (mean ± sd) | top-1 at init % | avg weight bits | avg act bits (per MAC) | weights KiB |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in part["table"].items():
            accuracy = f"{row['top1_mean']:.2f}" + (f" ± {row['top1_std']:.2f}" if len(row["seeds"]) > 1 else "")
            lines.append(f"| {name} | {len(row['seeds'])} | {accuracy} | {row['top1_at_init_mean']:.2f} | {row['avg_weight_bits']:.2f} "
                         f"| {row['avg_act_bits']:.2f} | {row['weight_kib']:.1f} |")
        for pair, diff in part["paired"].items():
            lines.append(f"\npaired by seed, {pair}: {diff['mean']:+.2f}" + (f" ± {diff['std']:.2f}" if len(diff["per_seed"]) > 1 else "")
                         + f" points (n = {len(diff['per_seed'])})")
        lines.append("")
    return "\n".join(lines)


def plot_bits(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Weight and activation bits per layer of every learned-bit run (one bar per run and seed)."""
    from matplotlib import pyplot as plt

    names = [layer["name"] for layer in runs[0]["layers"]]
    positions = np.arange(len(names))
    width = 0.8 / len(runs)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.28 * len(names) + 2), 7), sharex=True)
    for index, run in enumerate(runs):
        for axis, key in zip(axes, ("weight_bits", "act_bits")):
            axis.bar(positions - 0.4 + (index + 0.5) * width, [layer[key] for layer in run["layers"]], width,
                     label=f"{run['run']} seed {run['seed']} ({run['avg_weight_bits']:.2f} avg w bits)")
    for axis, label in zip(axes, ("weight bits", "activation bits")):
        axis.set_ylabel(label)
        axis.set_ylim(0, 8.5)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(positions, names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: list[dict[str, Any]], pretrain: dict[str, Any] | None, path: Path, title: str) -> None:
    """Test top-1 and training loss per epoch of every run (and of FP pretraining when present)."""
    from matplotlib import pyplot as plt

    panels = 3 if pretrain else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for run in runs:
        epochs = [row["epoch"] for row in run["curve"]]
        label = f"{run['run']} s{run['seed']}"
        axes[0].plot(epochs, [row["test_top1"] for row in run["curve"]], label=label)
        axes[1].plot(epochs, [row["train_loss"] for row in run["curve"]], label=label)
    axes[0].set(title=f"{title}: test top-1 (QAT)", xlabel="epoch", ylabel="%")
    axes[1].set(title="training loss (QAT)", xlabel="epoch", yscale="log")
    axes[0].legend(fontsize=6)
    if pretrain:
        epochs = [row["epoch"] for row in pretrain["curve"]]
        axes[2].plot(epochs, [row["test_top1"] for row in pretrain["curve"]], label="test top-1")
        axes[2].plot(epochs, [row["train_top1"] for row in pretrain["curve"]], label="train top-1 (augmented)")
        axes[2].set(title="FP pretraining", xlabel="epoch", ylabel="%")
        axes[2].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path) -> dict[str, Any]:
    """Rebuild results.json, table.md and the plots from every result under `out`; returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    runs, pretrain = read_results(out)
    commands_file = out / "commands.jsonl"
    commands = [json.loads(line) for line in commands_file.read_text().splitlines()] if commands_file.exists() else []
    summary = {"models": summarize(runs, pretrain)}
    environments = sorted({json.dumps(r["environment"], sort_keys=True) for r in [*runs, *pretrain.values()]})
    payload = {**summary, "cards": sorted({json.loads(e)["card"] for e in environments}), "commands": commands,
               "pretrain": pretrain, "results": runs}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "table.md").write_text(markdown_table(summary) + "\n")
    for model in summary["models"]:
        mine = [r for r in runs if r["model"] == model]
        mixed = [r for r in mine if r.get("learn_bits")]
        if mixed:
            plot_bits(mixed, out / f"bits_{model}.png", f"{model}: learned bits per layer (first and last fixed at 8)")
        if mine or model in pretrain:
            plot_curves(mine, pretrain.get(model), out / f"curves_{model}.png", model)
    return summary
