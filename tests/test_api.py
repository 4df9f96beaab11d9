"""ql.api.quantize_: whole models, configs, include/exclude patterns and the errors they raise."""

import copy

import pytest
import torch

import qlab as ql
from qlab import kernels
from qlab.api import (
    FakeQuantConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    quantize_,
    select_modules,
)
from qlab.nn import Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantConv2d, QuantLinear


@pytest.fixture(scope="module")
def digits():
    x, y = ql.data.digits_split("test")
    model = ql.models.digits_cnn(pretrained=True)
    return model, x, y, ql.eval.accuracy(model, x, y)


@pytest.mark.parametrize("config", [Int8StaticConfig(), Int8StaticConfig(act_qtype=ql.uint8), Int8DynamicConfig()])
def test_w8a8_digits_cnn_keeps_accuracy(digits, config):
    model, x, y, fp32 = digits
    q = quantize_(copy.deepcopy(model), config, calib_data=ql.data.digits_calibration_batches(4))
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.fc, QuantLinear)
    assert q.conv1.static == isinstance(config, Int8StaticConfig)
    with kernels.trace() as ran:
        acc = ql.eval.accuracy(q, x, y)
    assert ran and kernels.REFERENCE not in ran  # a fast integer kernel ran every layer
    assert acc >= fp32 - 0.01


def test_tiny_gpt_logits_stay_close():
    torch.manual_seed(0)
    model = ql.models.tiny_gpt(pretrained=False)
    tokens = torch.randint(0, 256, (2, 32))
    ref = model(tokens)
    cases = [(Int8DynamicConfig(), None, 0.99), (Int8StaticConfig(), [tokens], 0.99), (Int8WeightOnlyConfig(), None, 0.99),
             (Int4WeightOnlyConfig(group_size=32), None, 0.97)]  # 4 bits on Gaussian weights: ~20 dB per layer
    for config, data, threshold in cases:
        q = quantize_(copy.deepcopy(model), config, calib_data=data)
        cos = torch.nn.functional.cosine_similarity(q(tokens).flatten(), ref.flatten(), dim=0)
        assert cos > threshold, (config, cos)


def test_weight_only_configs_swap_linears_only():
    model = ql.models.tiny_gpt(pretrained=False)
    quantize_(model, Int4WeightOnlyConfig(group_size=64, exclude="lm_head"))
    assert isinstance(model.blocks[0].mlp.c_fc, Int4WeightOnlyLinear)
    assert type(model.lm_head) is torch.nn.Linear
    model = quantize_(ql.models.digits_cnn(pretrained=False), Int8WeightOnlyConfig())
    assert isinstance(model.fc, Int8WeightOnlyLinear) and type(model.conv1) is torch.nn.Conv2d


def test_include_exclude_patterns():
    model = ql.models.tiny_gpt(pretrained=False)
    cfg = Int8DynamicConfig(include=("blocks.*.mlp.*",), exclude="blocks.0.*")
    names = [n for n, _ in select_modules(model, cfg)]
    assert names and all(".mlp." in n and not n.startswith("blocks.0.") for n in names)
    quantize_(model, cfg)
    assert isinstance(model.blocks[1].mlp.c_proj, QuantLinear)
    assert type(model.blocks[0].mlp.c_proj) is torch.nn.Linear
    assert type(model.blocks[1].attn.c_attn) is torch.nn.Linear


def test_quantize_returns_the_same_model_mutated():
    model = ql.models.digits_cnn(pretrained=False)
    assert quantize_(model, Int8DynamicConfig()) is model


def test_model_gets_smaller():
    model = ql.models.tiny_gpt(pretrained=False)
    before = ql.eval.model_nbytes(model)
    after = ql.eval.model_nbytes(quantize_(model, Int4WeightOnlyConfig(group_size=64, exclude="lm_head")))
    assert after < before / 2


def test_errors_teach():
    model = ql.models.digits_cnn(pretrained=False)
    with pytest.raises(ValueError, match="needs calib_data"):
        quantize_(model, Int8StaticConfig())
    with pytest.raises(ValueError, match="selects no"):
        quantize_(model, Int8DynamicConfig(include="nothing.*"))
    with pytest.raises(ValueError, match="calib_data is empty"):
        quantize_(model, Int8StaticConfig(), calib_data=[])
    with pytest.raises(ValueError, match="group_size=128 must divide in_features=64"):
        quantize_(model, Int4WeightOnlyConfig(group_size=128))
    with pytest.raises(ValueError, match="use Int8DynamicConfig"):
        Int8StaticConfig(act_granularity=ql.PerToken())
    with pytest.raises(ValueError, match="weight_granularity"):
        Int8DynamicConfig(weight_granularity=ql.PerGroup(32))
    with pytest.raises(ValueError, match="weight_qtype must be a signed"):
        FakeQuantConfig(weight_qtype=ql.qtype(1, signed=False))
    with pytest.raises(ValueError, match="config must be a QuantConfig"):
        quantize_(model, {"bits": 8})
    with pytest.raises(ValueError, match="targets must be nn.Module types"):
        Int8DynamicConfig(targets=(int,))


def test_configs_are_frozen():
    cfg = Int8DynamicConfig()
    with pytest.raises(AttributeError):
        cfg.act_qtype = ql.uint8


def test_static_config_takes_an_observer_factory():
    seen = []

    class FixedObserver:
        def __call__(self, x):
            seen.append(x.shape)
            return x

        def calculate_qparams(self):
            return torch.tensor(0.5), torch.tensor(0)

    model = quantize_(ql.models.digits_cnn(pretrained=False), Int8StaticConfig(observer=FixedObserver),
                      calib_data=ql.data.digits_calibration_batches(2, batch_size=4))
    assert len(seen) == 2 * 4  # 2 batches x 4 layers
    assert float(model.conv2.act_scale) == 0.5


def test_no_selection_lists_every_candidate_and_why():
    model = ql.models.digits_cnn(pretrained=False)
    quantize_(model, Int8DynamicConfig(include="conv*"))
    with pytest.raises(ValueError) as err:
        quantize_(model, Int8DynamicConfig(exclude="fc"))
    text = str(err.value)
    assert "'conv1' (QuantConv2d): already quantized" in text and "'fc' (Linear): excluded by 'fc'" in text
    with pytest.raises(ValueError, match="matches no include pattern"):
        quantize_(model, Int8WeightOnlyConfig(include="head"))
    with pytest.raises(ValueError, match="has no such module; its layer types are"):
        quantize_(torch.nn.Sequential(torch.nn.ReLU()), Int8WeightOnlyConfig())


def test_targets_match_subclasses_and_weight_only_after_qat():
    """FakeQuantLinear is an nn.Linear: after weight-only QAT, Int4WeightOnlyConfig takes it (convert_'s advice)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    quantize_(model, FakeQuantConfig(weight_qtype=ql.int4, act_qtype=None))
    with pytest.raises(ValueError, match="Int4WeightOnlyConfig"):
        ql.convert_(model)
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    assert isinstance(model[0], Int4WeightOnlyLinear) and isinstance(model[2], Int4WeightOnlyLinear)


def test_a_recipe_is_an_ordered_list_of_configs():
    model = ql.models.digits_cnn(pretrained=False)
    batches = (b for b in ql.data.digits_calibration_batches(2, batch_size=4))  # a generator, consumed once
    quantize_(model, [Int8StaticConfig(include="conv*"), Int8WeightOnlyConfig()], calib_data=batches)
    assert isinstance(model.conv1, QuantConv2d) and model.conv1.static
    assert isinstance(model.fc, Int8WeightOnlyLinear)


def test_register_handler_gives_a_model_level_handler():
    """A new algorithm: its handler sees the whole model (here: scales every selected weight, then swaps)."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class HalveThenInt8(ql.QuantConfig):
        pass

    seen = {}

    @ql.register_handler(HalveThenInt8)
    def handler(model, config, calib_data):
        chosen = select_modules(model, config)
        seen["names"] = [n for n, _ in chosen]
        for _, m in chosen:
            m.weight.data /= 2
        ql.swap_modules(model, config, lambda name, m: Int8WeightOnlyLinear.from_float(m))
        return model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    w0 = model[0].weight.detach().clone()
    quantize_(model, HalveThenInt8())
    assert seen["names"] == ["0", "1"]
    torch.testing.assert_close(model[0].dequantize_weight(), w0 / 2, atol=float(w0.abs().max()) / 254, rtol=0)

    @dataclass(frozen=True)
    class Unhandled(ql.QuantConfig):
        pass

    with pytest.raises(ValueError, match="no handler is registered for Unhandled"):
        quantize_(model, Unhandled())


def test_wraps_quantized_selects_already_quantized_modules():
    model = quantize_(torch.nn.Sequential(torch.nn.Linear(8, 8)), Int8WeightOnlyConfig())
    config = ql.QuantConfig(targets=(ql.WeightOnlyLinear,), wraps_quantized=True)
    assert [n for n, _ in select_modules(model, config)] == ["0"]
    with pytest.raises(ValueError, match="already quantized"):
        select_modules(model, ql.QuantConfig(targets=(ql.WeightOnlyLinear,)))


def test_reduce_range_uses_7_bit_activation_codes():
    model = quantize_(torch.nn.Sequential(torch.nn.Linear(64, 16)), Int8DynamicConfig(reduce_range=True))
    assert model[0].act_qtype == ql.qtype(7)
    model = quantize_(torch.nn.Sequential(torch.nn.Linear(64, 16)), Int8DynamicConfig(reduce_range=False))
    assert model[0].act_qtype == ql.int8
