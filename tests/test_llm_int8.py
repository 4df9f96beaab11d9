"""LLM.int8(): vector-wise quantization with the outlier split, against a hand-computed case, an exact int64
reference written from the paper's equation, and bitsandbytes 0.50 itself (CPU, eval mode)."""

import copy

import pytest
import torch

import qlab as ql
from qlab import llm_int8


def test_vectorwise_quant_by_hand():
    """Row 0: the 6.0 is an outlier (>= 6), so the row absmax is 2.0, not 6.0; column 2 is zeroed.
    Codes: 1 * 127/2 = 63.5 -> 64 (half to even), 0.5 * 127/2 = 31.75 -> 32; row 1: 0.3 * 127/0.4 = 95.25 -> 95."""
    A = torch.tensor([[1.0, -2.0, 6.0, 0.5], [0.3, 0.1, 0.2, -0.4]])
    q, absmax, cols = llm_int8.vectorwise_quant(A, threshold=6.0)
    assert q.tolist() == [[64, -127, 0, 32], [95, 32, 0, -127]]
    torch.testing.assert_close(absmax, torch.tensor([2.0, 0.4]))
    assert cols.tolist() == [2]
    q0, absmax0, cols0 = llm_int8.vectorwise_quant(A, threshold=0.0)  # no split: 6.0 sets row 0's scale
    assert cols0.numel() == 0 and float(absmax0[0]) == 6.0 and q0[0].tolist() == [21, -42, 127, 11]
    assert llm_int8.vectorwise_quant(A, threshold=6.5)[2].numel() == 0  # 6.0 < 6.5: no outlier


def exact_reference(x, w, threshold):
    """The paper's decomposition with int64 sums and float64 everywhere else, written out from the spec."""
    x, w = x.double(), w.double()
    w_absmax = w.abs().amax(1)
    w_q = torch.round(w * 127 / w_absmax[:, None]).clamp(-127, 127)
    outliers = x.abs() >= threshold if threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
    cols = outliers.any(0)
    absmax = x.masked_fill(outliers, 0).abs().amax(1)
    x_q = torch.round(x * 127 / absmax[:, None]).clamp(-127, 127)
    x_q[:, cols] = 0
    acc = x_q.long() @ w_q.long().t()  # exact integers
    y = acc.double() * absmax[:, None] * w_absmax[None, :] / 127**2
    return y + x[:, cols] @ (w_q[:, cols] * w_absmax[:, None] / 127).t()


def with_outliers(M, K, channels=(3, 17), scale=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, list(channels)] *= scale  # a few large channels, as in LLMs above 6.7B parameters
    return x


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_matmul_matches_the_exact_reference(threshold):
    torch.manual_seed(0)
    x, w = with_outliers(9, 64), torch.randn(24, 64) * 0.1
    w_q, w_absmax = llm_int8.quantize_weight(w)
    y, cols = llm_int8.int8_matmul_outliers(x, w_q, w_absmax, threshold)
    torch.testing.assert_close(y.double(), exact_reference(x, w, threshold), rtol=1e-5, atol=1e-5)
    assert (cols.tolist() == [3, 17]) if threshold else cols.numel() == 0


def test_outlier_split_beats_plain_vectorwise_on_outlier_inputs():
    x, w = with_outliers(32, 256, channels=(5, 100, 200), scale=60.0), torch.randn(128, 256) * 0.05
    ref = x @ w.t()
    w_q, w_absmax = llm_int8.quantize_weight(w)
    err = {t: float((llm_int8.int8_matmul_outliers(x, w_q, w_absmax, t)[0] - ref).norm() / ref.norm()) for t in (0.0, 6.0)}
    assert err[6.0] < err[0.0] / 3, err


bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("M", [1, 7])
def test_module_agrees_with_bitsandbytes_linear8bitlt(M):
    """bitsandbytes' CPU path casts inputs to fp16 and uses 1/127^2 with a typo (6.200124e-05): agreement to
    fp16 rounding, and qlab agrees with the exact reference far more tightly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = with_outliers(M, 64).half().float()  # fp16-representable inputs, so both see the same values
    theirs = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu").eval()  # has_fp16_weights=False: quantized on .to()
    their_codes, their_absmax = theirs.state_dict()["weight"].clone(), theirs.state_dict()["SCB"].clone()
    ours = llm_int8.Int8OutlierLinear.from_float(lin, threshold=6.0)
    with torch.no_grad():
        y_bnb, y = theirs(x).float(), ours(x)
    # the same int8 codes (CB) and absmax (SCB); bitsandbytes rounds the weight to fp16 first, which moves a
    # few codes that sit on a rounding boundary by one
    diff = (ours.weight_q.int() - their_codes.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    torch.testing.assert_close(ours.weight_scale * 127, their_absmax.float(), rtol=1e-3, atol=0)
    assert float((y - y_bnb).norm() / y_bnb.norm()) < 2e-3
    exact = exact_reference(x, lin.weight.detach(), 6.0) + lin.bias.double()
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    assert ours.last_outlier_fraction == 2 / 64


def test_config_quantizes_a_model_and_round_trips():
    torch.manual_seed(0)
    model = ql.models.tiny_gpt(pretrained=False)
    tokens = torch.randint(0, 256, (2, 32))
    ref = model(tokens)
    q = ql.quantize_(copy.deepcopy(model), ql.LLMInt8Config(exclude="lm_head"))
    assert isinstance(q.blocks[0].mlp.c_fc, ql.Int8OutlierLinear)
    cos = torch.nn.functional.cosine_similarity(q(tokens).flatten(), ref.flatten(), dim=0)
    assert cos > 0.99
    again = ql.quantize_(copy.deepcopy(model), ql.LLMInt8Config(exclude="lm_head"))
    again.load_state_dict(q.state_dict())
    torch.testing.assert_close(again(tokens), q(tokens))
    with pytest.raises(ValueError, match="already quantized"):
        ql.quantize_(q, ql.LLMInt8Config(include="blocks.0.mlp.c_fc"))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="threshold=-1.0 must be >= 0"):
        ql.LLMInt8Config(threshold=-1)
    with pytest.raises(ValueError, match="floating-point"):
        llm_int8.vectorwise_quant(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="reshape first"):
        llm_int8.vectorwise_quant(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="symmetric int8 codes per output row"):
        llm_int8.Int8OutlierLinear(ql.quantize_tensor(torch.randn(4, 8), ql.int8, ql.PerTensor()))
    q, absmax, _ = llm_int8.vectorwise_quant(torch.zeros(2, 4), threshold=6.0)  # an all-zero row: finite, codes 0
    assert q.abs().sum() == 0 and torch.isfinite(absmax).all()
