"""The library refuses bad data with an error that says what is wrong and how to fix it (issue 14, items 17-18),
and still accepts the awkward but valid cases: all zeros, a constant, -0.0, half-precision input."""

import math

import pytest
import torch

import qlab as ql
from qlab.core.checks import check_finite
from qlab.models.tiny_gpt import GPTConfig, TinyGPT
from qlab.observers import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver,
                            PercentileObserver, qparams_from_range)

NAN, INF = math.nan, math.inf
NAN_AT_1 = r"x contains 1 NaN \(at index 1\): clean or mask the data"


# ------------------------------------------------------------------ 17) the one check: count and first position
def test_check_finite_names_the_count_and_the_first_position():
    with pytest.raises(ValueError, match=NAN_AT_1):
        check_finite(torch.tensor([1.0, NAN, 0.5]))
    x = torch.zeros(3, 4)
    x[1, 2], x[2, 0], x[2, 3] = INF, -INF, NAN
    with pytest.raises(ValueError, match=r"w contains 1 NaN and 1 \+Inf and 1 -Inf \(first at index \(1, 2\)\)"):
        check_finite(x, "w")
    with pytest.raises(ValueError, match=r"^x contains 1 NaN: fix it$"):
        check_finite(torch.tensor(NAN), hint="fix it")  # a 0-d tensor has no index
    with pytest.raises(ValueError, match=r"1 \+Inf \(at index 0\)"):
        check_finite(torch.tensor([INF, 1.0], dtype=torch.bfloat16))


def test_check_finite_passes_finite_data_whose_sum_overflows():
    check_finite(torch.tensor([3e38, 3e38]))  # the fast path's sum overflows float32: min and max decide
    check_finite(torch.full((8,), 6e4, dtype=torch.float16))  # float16 sums overflow at 65504
    check_finite(torch.arange(5))  # integers are always finite
    check_finite(torch.empty(0))


@pytest.mark.parametrize("fn", [
    lambda x: ql.choose_qparams(x, ql.int8),
    lambda x: ql.choose_qparams(x, ql.uint8, symmetric=False),
    lambda x: ql.quantize(x, 0.1, 0, ql.int8),
    lambda x: ql.fake_quantize(x, ql.int8),  # used to return [1, 0, 0]
    lambda x: ql.quantize_tensor(x, ql.int4, ql.PerGroup(3)),
    lambda x: ql.metrics.sqnr_db(x, torch.zeros(3)),
], ids=["choose_qparams", "choose_qparams asym", "quantize", "fake_quantize", "quantize_tensor", "metrics"])
def test_nan_is_refused_everywhere(fn):
    with pytest.raises(ValueError, match=NAN_AT_1):
        fn(torch.tensor([1.0, NAN, 0.5]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", [ql.PerTensor(), ql.PerChannel(0), ql.PerToken(), ql.PerGroup(2)], ids=str)
def test_inf_is_refused_with_every_granularity(gran, symmetric):
    x = torch.ones(2, 4)
    x[1, 3] = -INF  # used to give scale inf and zero point -2^31
    with pytest.raises(ValueError, match=r"x contains 1 -Inf \(at index \(1, 3\)\)"):
        ql.choose_qparams(x, ql.int8, gran, symmetric)
    with pytest.raises(ValueError, match=r"x contains 1 -Inf"):
        ql.fake_quantize(x, ql.uint8 if not symmetric else ql.int8, gran, symmetric)


def test_a_finite_range_wider_than_float32_still_gets_a_finite_scale():
    x = torch.tensor([-3e38, 0.0, 3e38])  # max - min = 6e38 overflows float32: computed in float64
    scale, zero_point = ql.choose_qparams(x, ql.int8, symmetric=False)
    assert math.isfinite(float(scale)) and float(scale) == pytest.approx(6e38 / 255, rel=1e-6)
    assert int(zero_point) == 0  # round(-128 + 3e38 / scale) = round(-0.5), half to even
    x_hat = ql.fake_quantize(x, ql.int8, symmetric=False)
    assert torch.isfinite(x_hat).all()
    torch.testing.assert_close(x_hat, x, rtol=0.01, atol=0)
    with pytest.raises(ValueError, match="too wide for float32 scales.*divide x by a power of two"):
        ql.choose_qparams(x, ql.qtype(1, signed=False), symmetric=False)  # 6e38 / 1 level really is too wide
    with pytest.raises(ValueError, match="too wide for float32 scales"):
        ql.choose_qparams(torch.tensor([1e39, 1.0], dtype=torch.float64), ql.int8)  # finite only in float64


# ------------------------------------------------------------------ 17) observers, metrics, dynamic layers
@pytest.mark.parametrize("make", [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, HistogramObserver,
                                  MSEObserver], ids=lambda m: m.__name__)
def test_observers_refuse_nan_and_inf(make):
    obs = make()
    obs(torch.randn(8))
    with pytest.raises(ValueError, match=rf"{make.__name__}'s input contains 1 NaN \(at index 2\): clean or mask"):
        obs(torch.tensor([1.0, 2.0, NAN]))
    with pytest.raises(ValueError, match=rf"{make.__name__}'s input contains 1 \+Inf"):
        obs(torch.tensor([1.0, INF]))  # HistogramObserver used to crash inside torch.bincount
    assert int(obs.num_batches) == 1  # the refused batches left no trace
    assert torch.isfinite(obs.calculate_qparams()[0]).all()


def test_observer_range_error_says_nan_not_no_data():
    with pytest.raises(ValueError, match=r"min_val contains 1 NaN: a range must be finite; NaN or Inf here comes"):
        qparams_from_range(NAN, 1.0)
    with pytest.raises(ValueError, match=r"max_val contains 1 NaN \(at index 1\)"):
        qparams_from_range(torch.zeros(2), torch.tensor([1.0, NAN]))
    obs = MinMaxObserver()
    obs(torch.randn(8))
    obs.max_val.fill_(NAN)  # e.g. a corrupted state_dict
    with pytest.raises(ValueError, match="max_val contains 1 NaN.*corrupted state_dict"):
        obs.calculate_qparams()


def test_metrics_refuse_bad_input():
    x = torch.tensor([1.0, 2.0])
    for metric in (ql.metrics.mse, ql.metrics.sqnr_db, ql.metrics.cosine):
        with pytest.raises(ValueError, match=r"x and x_hat are empty \(shape \(0,\)\)"):
            metric(torch.empty(0), torch.empty(0))
        with pytest.raises(ValueError, match=r"x_hat contains 1 \+Inf \(at index 1\): the approximation is broken"):
            metric(x, torch.tensor([1.0, INF]))
        with pytest.raises(ValueError, match=r"x contains 1 NaN \(at index 0\)"):
            metric(torch.tensor([NAN, 1.0]), x)


@pytest.mark.parametrize("act", [dict(), dict(act_granularity=ql.PerTensor()), dict(act_symmetric=False),
                                 dict(act_qparams=(torch.tensor(0.05), torch.tensor(0)))],
                         ids=["dynamic per token", "dynamic per tensor", "dynamic uint8", "static"])
def test_quant_linear_refuses_a_nan_row(act):
    torch.manual_seed(0)
    layer = ql.QuantLinear.from_float(torch.nn.Linear(16, 4), **act)
    x = torch.randn(3, 16)
    assert torch.isfinite(layer(x)).all()
    x[1, 5] = NAN  # used to come out as finite numbers
    with pytest.raises(ValueError, match=r"QuantLinear's input contains 1 NaN \(at index \(1, 5\)\): clean or mask"):
        layer(x)
    x[1, 5] = INF
    with pytest.raises(ValueError, match=r"QuantLinear's input contains 1 \+Inf"):
        layer(x)


def test_quant_conv2d_refuses_nan():
    conv = ql.QuantConv2d.from_float(torch.nn.Conv2d(2, 3, 3))
    x = torch.randn(1, 2, 5, 5)
    x[0, 1, 2, 3] = NAN
    with pytest.raises(ValueError, match=r"QuantConv2d's input contains 1 NaN \(at index \(0, 1, 2, 3\)\)"):
        conv(x)


# ------------------------------------------------------------------ 18) qparams and codes
def test_dequantize_requires_integer_codes_and_a_positive_finite_scale():
    q = torch.tensor([-3, 0, 5], dtype=torch.int8)
    with pytest.raises(ValueError, match=r"q must hold integer codes \(ql.quantize returns int8 or uint8\), got dtype "
                                         r"torch.float32; quantize first"):
        ql.dequantize(q.float(), 0.5, 0)
    for bad in (0.0, -0.5, NAN, INF):
        with pytest.raises(ValueError, match="scale must be positive and finite everywhere.*ql.choose_qparams"):
            ql.dequantize(q, bad, 0)
    with pytest.raises(ValueError, match=r"scale must be positive and finite everywhere, got 0 to 1"):
        ql.dequantize(q.reshape(3, 1), torch.tensor([1.0, 0.0, 1.0]), 0, ql.PerChannel(0))
    with pytest.raises(ValueError, match=r"zero_point must hold integers \(it is a code\), got 0.5; round it first"):
        ql.dequantize(q, 0.5, 0.5)


def test_quantize_requires_an_integer_zero_point_of_the_type():
    x = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"zero_point must hold integers \(it is a code\)"):
        ql.quantize(x, 0.1, torch.tensor(3.0), ql.uint8)
    with pytest.raises(ValueError, match=r"zero_point must hold integers"):
        ql.quantize(x, 0.1, 2.5, ql.uint8)
    with pytest.raises(ValueError, match=r"zero_point must be a code of ql.uint8, in \[0, 255\], got 300; take it "
                                         r"from ql.choose_qparams with the same qtype"):
        ql.quantize(x, 0.1, 300, ql.uint8)
    with pytest.raises(ValueError, match=r"zero_point must be a code of ql.int4, in \[-8, 7\], got -9 to 0"):
        ql.quantize(x.reshape(2, 1), torch.ones(2), torch.tensor([0, -9]), ql.int4, ql.PerChannel(0))
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        ql.quantize(x, NAN, 0, ql.int8)
    assert ql.quantize(x, 0.1, 255, ql.uint8).tolist() == [255, 255]  # the ends of the range are codes


def test_unsigned_symmetric_refuses_negative_data():
    with pytest.raises(ValueError, match=r"symmetric ql.uint8 has zero_point 0 and no negative codes, but x goes down "
                                         r"to -0.5; use a signed type \(ql.int8\) for symmetric, or symmetric=False"):
        ql.choose_qparams(torch.tensor([-0.5, 2.0]), ql.uint8, symmetric=True)
    with pytest.raises(ValueError, match="symmetric ql.uint4 has zero_point 0"):
        ql.fake_quantize(torch.tensor([[1.0, 2.0], [3.0, -1.0]]), ql.uint4, ql.PerChannel(0), symmetric=True)
    with pytest.raises(ValueError, match="symmetric ql.uint8 has zero_point 0"):
        qparams_from_range(-1.0, 1.0, ql.uint8, symmetric=True)
    obs = MinMaxObserver(qtype=ql.uint8, symmetric=True)
    obs(torch.tensor([-1.0, 3.0]))
    with pytest.raises(ValueError, match="symmetric ql.uint8 has zero_point 0"):
        obs.calculate_qparams()
    # ReLU outputs, -0.0 included, are what unsigned symmetric is for
    scale, zero_point = ql.choose_qparams(torch.tensor([-0.0, 0.0, 2.55]), ql.uint8, symmetric=True)
    assert float(scale) == pytest.approx(0.01) and int(zero_point) == 0


# ------------------------------------------------------------------ 18) perplexity
@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32))


def test_perplexity_checks_batch_size(gpt):
    data = torch.randint(0, 256, (100,))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"batch_size={bad} must be a positive integer"):
            ql.eval.perplexity(gpt, data, batch_size=bad, progress=False)


def test_perplexity_checks_ids_against_the_vocabulary(gpt):
    data = torch.randint(0, 256, (100,))
    data[60], data[80] = 300, 256
    with pytest.raises(ValueError, match=r"token id 300 at position 60 is outside the model's vocabulary \[0, 256\) "
                                         r"\(2 such ids in data\); tokenize with the model's own tokenizer"):
        ql.eval.perplexity(gpt, data, progress=False)  # config.vocab_size: checked before any forward pass
    data[60], data[80] = 7, 7
    data[3] = -1
    with pytest.raises(ValueError, match=r"token id -1 at position 3 is negative \(1 such id in data\)"):
        ql.eval.perplexity(lambda x: gpt(x), data, seq_len=32, progress=False)
    # a model without config.vocab_size: the logits' width is the vocabulary, checked after the first forward pass
    data[3] = 7
    data[-1] = 256
    with pytest.raises(ValueError, match=r"token id 256 at position 99 is outside the model's vocabulary \[0, 256\)"):
        ql.eval.perplexity(lambda x: gpt(x), data, seq_len=32, batch_size=1, progress=False)


# ------------------------------------------------------------------ valid edge cases still work
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("x", [torch.zeros(4, 8), torch.full((4, 8), 3.5), torch.full((4, 8), -0.0),
                               torch.tensor([[-0.0, 0.0, 1.0, -2.0] * 2] * 4)], ids=["zeros", "constant", "-0.0", "mixed"])
def test_valid_edge_cases_still_work(x, symmetric):
    qtype = ql.int8 if symmetric else ql.uint8
    for gran in (ql.PerTensor(), ql.PerChannel(0), ql.PerGroup(4)):
        scale, zero_point = ql.choose_qparams(x, qtype, gran, symmetric)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        x_hat = ql.fake_quantize(x, qtype, gran, symmetric)
        torch.testing.assert_close(x_hat, x, rtol=0.01, atol=1e-6)
        torch.testing.assert_close(ql.quantize_tensor(x, qtype, gran, symmetric).dequantize(), x_hat)
    obs = MinMaxObserver(qtype=qtype, symmetric=symmetric)
    obs(x)
    assert torch.isfinite(obs.calculate_qparams()[0]).all()
    assert ql.metrics.mse(x, x) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_still_works(dtype):
    torch.manual_seed(0)
    x = torch.randn(16, 32).to(dtype)
    x_hat = ql.fake_quantize(x, ql.int8, ql.PerChannel(0))
    assert x_hat.dtype == dtype and ql.metrics.sqnr_db(x, x_hat) > 35
    qt = ql.quantize_tensor(x, ql.uint4, ql.PerGroup(8), symmetric=False)
    assert torch.isfinite(qt.dequantize()).all()
    big = torch.tensor([6e4, -6e4, 1.0], dtype=torch.float16)  # max - min overflows float16, not the check
    torch.testing.assert_close(ql.fake_quantize(big, ql.int8).float(), big.float(), rtol=0.01, atol=300)
    layer = ql.QuantLinear.from_float(torch.nn.Linear(32, 4))
    assert torch.isfinite(layer(x.float())).all()
    with pytest.raises(ValueError, match=r"x contains 1 NaN \(at index \(0, 1\)\)"):
        x[0, 1] = NAN
        ql.fake_quantize(x, ql.int8)


@pytest.mark.parametrize("config", [ql.LLMInt8Config(), ql.FP8Config()], ids=["llm_int8", "fp8"])
def test_other_dynamic_layers_refuse_non_finite_input(config):
    layer = ql.quantize_(torch.nn.Sequential(torch.nn.Linear(16, 8)), config)
    x = torch.randn(3, 16)
    x[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"input contains 1 NaN \(at index \(1, 5\)\): clean or mask the data"):
        layer(x)
