"""qlab.sensitivity: one-layer-at-a-time drops on a hand-made model, and a greedy bit assignment under budget."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qlab as ql
from qlab.sensitivity import assign_mixed_precision, fake_quantize_weight_, layer_sensitivity


def test_layer_sensitivity_hand_made():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[1].weight.copy_(2 * torch.eye(2))
    x = torch.ones(1, 2)
    metric = lambda m: float(m(x).sum())  # noqa: E731  FP value: 4
    halve = lambda m: m.weight.data.mul_(0.5)  # noqa: E731  "quantization" that halves a layer
    drops = layer_sensitivity(model, metric, halve, progress=False)
    assert drops == {"0": 2.0, "1": 2.0}
    assert torch.equal(model[0].weight, torch.eye(2)) and torch.equal(model[1].weight, 2 * torch.eye(2))
    zero_second = lambda m: m.weight.data.zero_() if m is model[1] else None  # noqa: E731
    drops = layer_sensitivity(model, metric, zero_second, layer_names=["1", "0"], higher_is_better=False, progress=False)
    assert drops == {"1": -4.0, "0": -0.0}  # a loss that went down by 4 is a negative drop


def test_model_restored_even_if_eval_fails():
    model = nn.Sequential(nn.Linear(3, 3))
    w = model[0].weight.clone()
    calls = []

    def eval_fn(m):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("eval failed")
        return 1.0

    with pytest.raises(RuntimeError, match="eval failed"):
        layer_sensitivity(model, eval_fn, progress=False)
    assert torch.equal(model[0].weight, w)


def test_digits_cnn_sensitivity_default_int4():
    model = ql.models.digits_cnn(pretrained=True)
    x, y = ql.data.digits_split("test")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    drops = layer_sensitivity(model, lambda m: ql.eval.accuracy(m, x, y), progress=False)
    assert list(drops) == ["conv1", "conv2", "conv3", "fc"]
    assert all(-0.05 < d < 1.0 for d in drops.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fake_quantize_weight_():
    layer = nn.Linear(8, 4)
    w = layer.weight.detach().clone()
    fake_quantize_weight_(layer, ql.int8, ql.PerTensor())
    assert torch.equal(layer.weight, ql.fake_quantize(w, ql.int8, ql.PerTensor()))
    with pytest.raises(ValueError, match="no weight"):
        fake_quantize_weight_(nn.ReLU())


def test_assign_mixed_precision_hand_made():
    sizes = {"a": 100, "b": 100, "c": 1000}  # bytes at 4 bits: 50, 50, 500 -> 600 in all
    sens = {"a": 0.5, "b": 0.1, "c": 0.6}  # per extra byte at 8 bits: a 0.01, b 0.002, c 0.0012
    assert assign_mixed_precision(sens, sizes, budget_bytes=600) == {"a": 4, "b": 4, "c": 4}
    assert assign_mixed_precision(sens, sizes, budget_bytes=650) == {"a": 8, "b": 4, "c": 4}
    assert assign_mixed_precision(sens, sizes, budget_bytes=1100) == {"a": 8, "b": 8, "c": 4}
    assert assign_mixed_precision(sens, sizes, budget_bytes=1200) == {"a": 8, "b": 8, "c": 8}
    # with a middle option, a layer that cannot reach 8 bits still gets 6: c costs +250 bytes at 6 bits
    assert assign_mixed_precision(sens, sizes, (8, 6, 4), budget_bytes=950) == {"a": 8, "b": 8, "c": 6}


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 10_000), st.floats(-0.1, 1.0)), min_size=1, max_size=8),
    st.floats(0.0, 1.0),
    st.sampled_from([(8, 4), (8, 6, 4), (4, 2), (16, 8, 4)]),
)
def test_assignment_respects_the_budget(layers, slack, bit_options):
    sizes = {f"l{i}": n for i, (n, _) in enumerate(layers)}
    sens = {f"l{i}": s for i, (_, s) in enumerate(layers)}
    low = sum(sizes.values()) * min(bit_options) / 8
    high = sum(sizes.values()) * max(bit_options) / 8
    budget = low + slack * (high - low)
    bits = assign_mixed_precision(sens, sizes, bit_options, budget_bytes=budget)
    assert set(bits) == set(sizes) and set(bits.values()) <= set(bit_options)
    assert sum(sizes[n] * b / 8 for n, b in bits.items()) <= budget + 1e-9


def test_assign_mixed_precision_errors():
    with pytest.raises(ValueError, match="smaller than every layer at 4 bits"):
        assign_mixed_precision({"a": 1.0}, {"a": 100}, budget_bytes=49)
    with pytest.raises(ValueError, match="same layers"):
        assign_mixed_precision({"a": 1.0}, {"b": 100}, budget_bytes=1e9)
    with pytest.raises(ValueError, match="bit_options"):
        assign_mixed_precision({"a": 1.0}, {"a": 100}, (8, 0), budget_bytes=1e9)
    with pytest.raises(ValueError, match="positive numbers of weights"):
        assign_mixed_precision({"a": 1.0}, {"a": 0}, budget_bytes=1e9)
