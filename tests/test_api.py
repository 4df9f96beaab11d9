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


@pytest.mark.parametrize("config", [Int8StaticConfig(), Int8StaticConfig(act_symmetric=False), Int8DynamicConfig()])
def test_w8a8_digits_cnn_keeps_accuracy(digits, config):
    model, x, y, fp32 = digits
    q = quantize_(copy.deepcopy(model), config, calib_data=ql.data.digits_calibration_batches(4))
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.fc, QuantLinear)
    assert q.conv1.static == isinstance(config, Int8StaticConfig)
    with kernels.trace() as ran:
        acc = ql.eval.accuracy(q, x, y)
    assert set(ran) == {kernels.INT_MM_CPU}
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
    assert model.blocks[0].mlp.c_fc.layout == "tinygemm"
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
    with pytest.raises(ValueError, match="granularity_w"):
        Int8DynamicConfig(granularity_w=ql.PerGroup(32))
    with pytest.raises(ValueError, match="weight_bits=1"):
        FakeQuantConfig(weight_bits=1)
    with pytest.raises(ValueError, match="config must be one of"):
        quantize_(model, {"bits": 8})


def test_configs_are_frozen():
    cfg = Int8DynamicConfig()
    with pytest.raises(AttributeError):
        cfg.act_symmetric = False


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
