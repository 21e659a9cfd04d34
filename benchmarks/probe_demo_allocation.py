"""Why the demo's mixed-precision run does not beat DDQ W4A4 on Fashion-MNIST (docs/method.md, issue 2).

Three probes on the demo's SmallCNN, each against the same FP checkpoint per seed as `python -m ddq.demo`:
- `dual`: the learned-bit run (`ddq_mixed`) with other dual-ascent rates for λ (the demo uses 0.05);
- `fixed`: DDQ with the two inner layers' weight bits fixed from the start (e.g. 6/3), everything else as in
  DDQ W4A4: the accuracy of an allocation when no bits have to be learned, an upper reference for the learner;
- `freeze`: the learned-bit run with bits frozen from another fraction of the steps (ddq.optim.FREEZE_BITS_AT);
- `edges`: the learned-bit run with the first and last layers' weight bits learned too (from 7, their
  activations still at 8), against the same budget: the W4A4 model's weight size with those layers at 7 bits.

    python benchmarks/probe_demo_allocation.py --dual 0.01 --fixed 4/4,7/3,6/3 --freeze 0.1,0.5 --edges --out probe.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Callable

import torch

import ddq
from ddq import demo
from ddq.quantizer import graded_gate_logits
from ddq.resource import quantized_layers

INNER_LAYERS = slice(1, 3)  # SmallCNN's learned-bit layers: first and last stay at the fixed 7/8 bits
QUANTIZE_MODEL = ddq.quantize_model  # the demo calls ddq.quantize_model: the fixed probe swaps it for a while


def with_inner_weight_bits(bits: tuple[int, ...]) -> Callable:
    """quantize_model, then the inner layers' weight quantizers set to `bits` before their ranges are initialised."""
    def convert(model: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
        model = QUANTIZE_MODEL(model, *args, **kwargs)
        inner = [layer for _, layer in quantized_layers(model)][INNER_LAYERS]
        if len(inner) != len(bits):
            raise ValueError(f"the demo's CNN has {len(inner)} inner layers, got bits for {len(bits)}")
        with torch.no_grad():
            for layer, layer_bits in zip(inner, bits):
                layer.weight_quantizer.gate_logits.copy_(graded_gate_logits(layer_bits))
                layer.weight_quantizer.init_bits = layer_bits
        return model
    return convert


BUDGET_AT = demo.budget_at


def with_learned_edge_weights(model: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    """quantize_model, then the first and last layers' weight quantizers learn their bits too."""
    model = QUANTIZE_MODEL(model, *args, **kwargs)
    layers = [layer for _, layer in quantized_layers(model)]
    for layer in (layers[0], layers[-1]):
        layer.weight_quantizer.learn_bits = True
        layer.weight_quantizer.gate_logits.requires_grad_(True)
    return model


def budget_with_edges_at_their_fixed_bits(model: torch.nn.Module, learned_bits: int) -> tuple[float, float]:
    """`ddq.resource.budget_at` as if only the inner layers learned bits: the first and last layers count at
    their W4A4 weight bits (the cap, 7), so the budget is the W4A4 model's weight size."""
    layers = [layer for _, layer in quantized_layers(model)]
    edges = [layers[0].weight_quantizer.gate_logits, layers[-1].weight_quantizer.gate_logits]
    for logits in edges:
        logits.requires_grad_(False)
    try:
        return BUDGET_AT(model, learned_bits)
    finally:
        for logits in edges:
            logits.requires_grad_(True)


def run(name: str, value, settings: demo.Settings, fp_state: dict, data: demo.Dataset, seed: int) -> dict:
    config = demo.RUNS["ddq_mixed"]
    freeze_at = demo.FREEZE_BITS_AT
    if name == "dual":
        settings = dataclasses.replace(settings, dual_rate=value)
    elif name == "fixed":
        config = demo.RUNS["ddq_w4a4"]
        ddq.quantize_model = with_inner_weight_bits(value)
    elif name == "edges":
        ddq.quantize_model, demo.budget_at = with_learned_edge_weights, budget_with_edges_at_their_fixed_bits
    else:
        demo.FREEZE_BITS_AT = value
    try:
        started = time.time()
        result = demo.run_qat(config, fp_state, data, settings, seed)
    finally:
        ddq.quantize_model, demo.FREEZE_BITS_AT, demo.budget_at = QUANTIZE_MODEL, freeze_at, BUDGET_AT
    return {"probe": name, "value": value, "seed": seed, "accuracy": result["accuracy"],
            "weight_bits": [row["weight_bits"] for row in result["layers"]], "weight_kib": result["weight_kib"],
            "integer_agreement": result.get("integer_agreement"), "seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dual", default="", help="comma-separated dual-ascent rates")
    parser.add_argument("--fixed", default="", help="comma-separated inner weight bits, e.g. 4/4,6/3")
    parser.add_argument("--freeze", default="", help="comma-separated fractions of the steps")
    parser.add_argument("--edges", action="store_true", help="also learn the first and last layers' weight bits")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    probes = ([("dual", float(v)) for v in args.dual.split(",") if v]
              + [("fixed", tuple(int(b) for b in v.split("/"))) for v in args.fixed.split(",") if v]
              + [("freeze", float(v)) for v in args.freeze.split(",") if v] + ([("edges", 1)] if args.edges else []))
    settings = demo.parse_args(["--data", args.data, "--seeds", str(args.seeds), "--no-progress"])
    data = demo.Dataset(demo.load_dataset(settings.data, settings.data_dir), torch.device("cpu"))
    rows = []
    for seed in range(args.seeds):
        fp_state = demo.pretrain(data, settings, seed)
        for name, value in probes:
            rows.append(run(name, value, settings, fp_state, data, seed))
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as file:
        json.dump({"settings": dataclasses.asdict(settings), "torch": torch.__version__, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
