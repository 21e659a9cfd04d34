"""quantize_model: which layers convert, with what bits, on models with depthwise and grouped convs."""

import pytest
import torch
from torch import nn

import ddq
from ddq.baselines import LSQQuantizer
from ddq.models import SmallCNN
from ddq.nn import DDQConv2d, DDQLinear
from ddq.quantizer import DDQQuantizer


class InvertedResidual(nn.Module):
    """A MobileNetV2 block: 1×1 expand, 3×3 depthwise (stride 2), 1×1 project, with BatchNorm."""

    def __init__(self, c_in: int, c_out: int, expand: int = 4) -> None:
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        return self.body(x)


def tiny_mobilenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        InvertedResidual(8, 12),
        nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )


def test_converts_every_layer_with_first_and_last_at_8_bits():
    model = ddq.quantize_model(tiny_mobilenet(), weight_bits=3, act_bits=5)
    layers = ddq.quantized_layers(model)
    assert len(layers) == 6
    assert isinstance(layers[0][1], DDQConv2d) and isinstance(layers[-1][1], DDQLinear)
    assert [(layer.weight_quantizer.bits, layer.input_quantizer.bits) for _, layer in layers] == [(8, 8)] + [(3, 5)] * 4 + [(8, 8)]
    depthwise = layers[2][1]
    assert depthwise.groups == depthwise.in_channels and depthwise.weight_quantizer.groups == depthwise.out_channels


def test_converted_model_matches_float_model_at_8_bits_and_trains():
    torch.manual_seed(0)
    float_model = tiny_mobilenet().eval()
    x = torch.randn(4, 3, 16, 16)
    model = ddq.quantize_model(float_model, weight_bits=8, act_bits=8, learn_levels=False)
    ddq.initialize_quantizers(model, x)
    reference = float_model(x)
    relative = (model.eval()(x) - reference).norm() / reference.norm()
    assert relative < 0.05, "8-bit quantization must stay close to the float model"
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "gate_logits" not in n)


def test_float_model_is_left_untouched_unless_inplace():
    model = SmallCNN()
    ddq.quantize_model(model)
    assert not ddq.quantized_layers(model)
    converted = ddq.quantize_model(model, inplace=True)
    assert converted is model and len(ddq.quantized_layers(model)) == 4


def test_policy_options():
    model = ddq.quantize_model(SmallCNN(), weight_bits=2, act_bits=2, first_last_bits=None, skip=("features.0",))
    layers = dict(ddq.quantized_layers(model))
    assert "features.0" not in layers and type(model.features[0]) is nn.Conv2d
    assert all(layer.weight_quantizer.bits == 2 for layer in layers.values())
    learned = ddq.quantize_model(SmallCNN(), learn_bits=True)
    flags = [layer.weight_quantizer.gate_logits.requires_grad for _, layer in ddq.quantized_layers(learned)]
    assert flags == [False, True, True, False]


def test_lsq_method_builds_lsq_quantizers():
    model = ddq.quantize_model(SmallCNN(), method="lsq", weight_bits=4, act_bits=4)
    kinds = {type(q) for _, layer in ddq.quantized_layers(model) for q in (layer.weight_quantizer, layer.input_quantizer)}
    assert kinds == {LSQQuantizer}
    ddq.initialize_quantizers(model, torch.randn(2, 1, 28, 28))
    assert model.features[3].input_quantizer.signedness == "unsigned"  # fed by a ReLU


def test_bad_arguments():
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        ddq.quantize_model(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="unknown quantization method"):
        ddq.quantize_model(SmallCNN(), method="pact")
    with pytest.raises(ValueError, match="init_bits"):
        ddq.quantize_model(SmallCNN(), weight_bits=9)


def test_state_dict_round_trip_of_a_quantized_model():
    torch.manual_seed(1)
    x = torch.randn(3, 1, 28, 28)
    model = ddq.quantize_model(SmallCNN(), learn_bits=True)
    ddq.initialize_quantizers(model, x)
    with torch.no_grad():
        model.features[3].weight_quantizer.gate_logits[3] = -1.0
    fresh = ddq.quantize_model(SmallCNN(), learn_bits=True)
    fresh.load_state_dict(model.state_dict())
    assert fresh.features[3].weight_quantizer.bits == 3
    assert fresh.features[3].input_quantizer.mode == "unsigned"
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)



def test_torchvision_models_convert_when_available():
    tv = pytest.importorskip("torchvision")
    for build in (tv.models.mobilenet_v2, tv.models.resnet18):
        model = ddq.quantize_model(build(num_classes=10))
        x = torch.randn(2, 3, 32, 32)  # MobileNetV2's last feature map is 1 × 1 here
        ddq.initialize_quantizers(model, x)
        assert model(x).shape == (2, 10)
        assert all(type(m) not in (nn.Conv2d, nn.Linear) for m in model.modules())


def test_initialize_quantizers_rejects_one_sample_where_batchnorm_needs_more():
    """Training-mode BatchNorm of one sample fails inside PyTorch where a feature map is 1 × 1; the pass says what
    to give instead, and leaves the model as it was."""
    model = ddq.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                               4, 4, first_last_bits=None)
    model.eval()
    with pytest.raises(ValueError, match="batch has 1 sample.*at least 2"):
        ddq.initialize_quantizers(model, torch.randn(1, 3, 3, 3))
    assert not model.training
    ddq.initialize_quantizers(model, torch.randn(2, 3, 3, 3))


def test_quantizer_types_in_a_converted_model_are_ddq():
    model = ddq.quantize_model(SmallCNN())
    assert all(isinstance(layer.weight_quantizer, DDQQuantizer) for _, layer in ddq.quantized_layers(model))


def test_initialize_quantizers_sees_training_mode_activations_and_keeps_batchnorm_state():
    """Ranges come from BatchNorm-normalised activations (training mode), whatever the running statistics
    say, and the running statistics are left as they were."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].running_var.fill_(1e6)  # eval-mode BatchNorm would shrink activations 1000×
    model = ddq.quantize_model(model, 4, 4, first_last_bits=None)
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    model.eval()
    x = torch.randn(8, 1, 12, 12)
    ddq.initialize_quantizers(model, x)
    assert not model.training
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        normalised = torch.relu(nn.functional.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias,
                                                         training=True))
    top = float(model[3].input_quantizer.range()[1])
    assert 0.3 * float(normalised.max()) < top <= 1.01 * float(normalised.max())


def test_learn_bits_weights_learns_only_weight_gates_and_bad_values_are_rejected():
    model = ddq.quantize_model(SmallCNN(), 4, 4, learn_bits="weights")
    middle = ddq.quantized_layers(model)[1:-1]
    assert all(layer.weight_quantizer.gate_logits.requires_grad for _, layer in middle)
    assert not any(layer.input_quantizer.gate_logits.requires_grad for _, layer in ddq.quantized_layers(model))
    acts = ddq.quantize_model(SmallCNN(), 4, 4, learn_bits="activations")
    assert [layer.input_quantizer.gate_logits.requires_grad for _, layer in ddq.quantized_layers(acts)] == [False, True, True, False]
    for bad in ("both", 1, None):
        with pytest.raises(ValueError, match="learn_bits"):
            ddq.quantize_model(SmallCNN(), 4, 4, learn_bits=bad)


def test_weight_max_bits_caps_ddq_weights_first_and_last_included():
    """weight_max_bits=7: DDQ edge layers become W7A8 and learned weight bits never pass 7; LSQ keeps W8A8."""
    from ddq.resource import set_learned_bits

    model = ddq.quantize_model(SmallCNN(), 4, 4, learn_bits="weights", weight_max_bits=7)
    ddq.initialize_quantizers(model, torch.rand(2, 1, 28, 28))
    set_learned_bits(model, 8)
    rows = ddq.model_bits_report(model)
    assert [(r.weight_bits, r.act_bits) for r in rows] == [(7, 8), (7, 4), (7, 4), (7, 8)]
    lsq = ddq.quantize_model(SmallCNN(), 4, 4, method="lsq", weight_max_bits=7)
    ddq.initialize_quantizers(lsq, torch.rand(2, 1, 28, 28))
    assert [(r.weight_bits, r.act_bits) for r in ddq.model_bits_report(lsq)][0] == (8, 8)
    with pytest.raises(ValueError, match="init_bits"):
        ddq.quantize_model(SmallCNN(), 8, 4, weight_max_bits=7, first_last_bits=None)


def test_a_layer_used_at_two_places_becomes_one_quantized_layer_at_both():
    shared = nn.Linear(4, 4)
    model = ddq.quantize_model(nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared, nn.Linear(4, 2)))
    assert [type(m).__name__ for m in model] == ["DDQLinear", "DDQLinear", "ReLU", "DDQLinear", "DDQLinear"]
    assert model[1] is model[3] and len(ddq.quantized_layers(model)) == 3

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.last = nn.Linear(4, 4), nn.Linear(4, 2)
            self.a = self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.last(self.b(self.a(self.first(x))))

    aliased = ddq.quantize_model(Aliased())
    assert isinstance(aliased.a, DDQLinear) and aliased.a is aliased.b
    skipped = ddq.quantize_model(Aliased(), skip="b")  # one name of a shared layer skips it at every name
    assert type(skipped.a) is nn.Linear and skipped.a is skipped.b


def test_a_model_that_is_one_layer_comes_back_quantized():
    for layer in (nn.Linear(4, 2), nn.Conv2d(3, 2, 3)):
        for inplace in (False, True):
            quantized = ddq.quantize_model(layer, first_last_bits=None, weight_bits=2, act_bits=2, inplace=inplace)
            assert isinstance(quantized, (DDQLinear, DDQConv2d)) and quantized.weight_quantizer.bits == 2
            assert ddq.quantized_layers(quantized) == [("", quantized)]


def test_quantized_layers_keep_the_float_parameters_so_tying_and_freezing_survive():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.body = nn.Embedding(16, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.embedding.weight

    tied = ddq.quantize_model(Tied())
    assert tied.head.weight is tied.embedding.weight
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    frozen[1].requires_grad_(False)
    converted = ddq.quantize_model(frozen)
    assert not converted[1].weight.requires_grad and not converted[1].bias.requires_grad
    assert converted[0].weight.requires_grad
    assert frozen[0].weight is not converted[0].weight  # inplace=False converts a copy


def test_skip_takes_one_name_or_several_and_names_a_misspelling():
    model = ddq.quantize_model(SmallCNN(), skip="features.3")
    assert type(model.features[3]) is nn.Conv2d and isinstance(model.features[0], DDQConv2d)
    with pytest.raises(ValueError, match=r"skip names no nn.Linear / nn.Conv2d of the model: \['features.33'\]"):
        ddq.quantize_model(SmallCNN(), skip=["features.33"])


def test_subclasses_stay_float_with_a_warning_and_lazy_layers_need_a_forward_first():
    class OwnLinear(nn.Linear):
        pass

    with pytest.warns(UserWarning, match=r"left in float.*2 \(OwnLinear\)"):
        model = ddq.quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), OwnLinear(4, 4), nn.Linear(4, 2)))
    assert type(model[2]) is OwnLinear
    lazy = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="layer '1' .*has not seen an input yet"):
        ddq.quantize_model(lazy)
    lazy(torch.randn(2, 4))  # materialises LazyLinear into an nn.Linear
    assert len(ddq.quantized_layers(ddq.quantize_model(lazy))) == 3


def test_each_quantizer_floors_its_own_bits_at_min_bits():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    converted = ddq.quantize_model(model, weight_bits=1, act_bits=4, learn_bits=True, min_bits=2)
    assert converted[2].weight_quantizer.min_bits == 1 and converted[2].input_quantizer.min_bits == 2
    with torch.no_grad():
        converted[2].input_quantizer.gate_logits.fill_(-1.0)
    assert converted[2].input_quantizer.bits == 2
