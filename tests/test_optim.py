"""ddq.optim's parameter groups: which parameters learn at which rate, and the DDQ range-rate scales."""

import pytest
import torch
from torch import nn

import ddq
from ddq.baselines import LSQQuantizer
from ddq.optim import RANGE_LR_SCALES, parameter_groups, range_lr_multiplier
from ddq.quantizer import DDQQuantizer


def quantized_model(method: str, **options) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    model = ddq.quantize_model(model, 4, 4, method=method, first_last_bits=8, **options)
    ddq.initialize_quantizers(model, torch.randn(4, 3, 6, 6))
    return model


def rates(model: nn.Module, **options) -> dict[int, float]:
    return {id(p): group["lr"] for group in parameter_groups(model, 0.1, 5e-4, quant_lr=1e-3, gate_lr=0.5, **options)
            for p in group["params"]}


def test_groups_split_weights_quantizer_parameters_and_gates():
    model = quantized_model("ddq", learn_bits="weights")
    groups = parameter_groups(model, 0.1, 5e-4, quant_lr=1e-3, gate_lr=0.5)
    by_role = {}
    for group in groups:
        by_role.setdefault(group["role"], []).append(group)
    assert set(by_role) == {"weights", "quant_range", "gates"}
    assert [g["weight_decay"] for g in by_role["weights"]] == [5e-4] and by_role["weights"][0]["lr"] == 0.1
    assert all(g["weight_decay"] == 0.0 for g in by_role["quant_range"] + by_role["gates"])
    assert by_role["gates"][0]["lr"] == 0.5
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad), "each parameter once"
    without_gates = parameter_groups(model, 0.1, quant_lr=1e-3, include_gates=False)
    assert "gates" not in {g["role"] for g in without_gates}


@pytest.mark.parametrize("scale", RANGE_LR_SCALES)
def test_range_rates_follow_the_steps_each_range_spans(scale):
    model = quantized_model("ddq")
    lr = rates(model, range_lr_scale=scale)
    quantizers = [m for m in model.modules() if isinstance(m, DDQQuantizer)]
    modes = {m.mode for m in quantizers}
    assert {"symmetric", "unsigned"} <= modes, modes
    for quantizer in quantizers:
        width = 2**quantizer.init_bits - 1
        expected = {"width": width, "steps": width / 2 if quantizer.mode == "symmetric" else width, "none": 1}[scale]
        assert lr[id(quantizer.range_top)] == pytest.approx(1e-3 * expected), (quantizer.mode, quantizer.init_bits)
        assert lr[id(quantizer.residuals)] == pytest.approx(1e-3), "levels are not ranges"
    assert any(m.init_bits == 8 for m in quantizers) and any(m.init_bits == 4 for m in quantizers)


def test_lsq_steps_keep_the_quantizer_rate_and_bad_scales_are_named():
    model = quantized_model("lsq")
    lsq = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    lr = rates(model, range_lr_scale="steps")
    assert lsq and all(lr[id(p)] == 1e-3 for m in lsq for p in m.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="range_lr_scale must be one of"):
        parameter_groups(model, 0.1, range_lr_scale="half")
    with pytest.raises(ValueError, match="range_lr_scale must be one of"):
        range_lr_multiplier(lsq[0], "step_size", "fast")


def test_zero_quantizer_and_gate_rates_are_kept_not_replaced_by_lr():
    """0 is a rate (the parameters stay put), not "not given": only None falls back to lr."""
    model = quantized_model("ddq", learn_bits="weights")
    frozen = {g["role"]: g["lr"] for g in parameter_groups(model, 0.1, quant_lr=0.0, gate_lr=0.0)}
    assert frozen == {"weights": 0.1, "quant_range": 0.0, "gates": 0.0}
    defaults = parameter_groups(model, 0.1, range_lr_scale="none")
    assert all(g["lr"] == 0.1 for g in defaults)
