"""qlab.bitnet against Hugging Face's BitNet integration (WeightQuant, ActQuant, pack_weights, unpack_weights),
the oracle for BitNet b1.58's quantizers and 2-bit layout, and against the equations by hand."""

import copy

import pytest
import torch
from torch import nn

import qlab as ql
from qlab import bitnet

hf = pytest.importorskip("transformers.integrations.bitnet")


def _original(fn):
    """The function under a torch.compile decorator (compiling would take minutes here)."""
    return getattr(fn, "_torchdynamo_orig_callable", None) or getattr(fn, "__wrapped__", fn)


@pytest.mark.parametrize("shape,scale", [((64, 96), 1.0), ((7, 33), 0.02), ((128, 256), 30.0)])
def test_quantizers_match_hugging_face(shape, scale):
    g = torch.Generator().manual_seed(shape[0])
    W = torch.randn(*shape, generator=g) * scale
    codes, gamma = bitnet.weight_quant(W)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(codes.float() / (1.0 / gamma), _original(hf.WeightQuant.forward)(None, W))
    x = torch.randn(3, 5, shape[1], generator=g) * scale
    x[0, 0] = 0  # an all-zero token: the 1e-5 clamp
    x_q, s = bitnet.act_quant(x)
    assert s.shape == (3, 5, 1) and int(x_q.abs().max()) <= 128
    assert torch.equal(x_q.float() / s, _original(hf.ActQuant.forward)(None, x))


def test_ternary_rule_by_hand():
    W = torch.tensor([[0.4, -0.1, 0.05, -0.6], [0.2, 0.0, -0.25, 0.4]])  # mean |W| = 0.25
    codes, gamma = bitnet.weight_quant(W)
    assert float(gamma) == pytest.approx(0.25)
    # 0.4/0.25 = 1.6 -> 1; 0.1/0.25 = 0.4 -> 0; 0.2/0.25 = 0.8 -> 1; 0.25/0.25 = 1 -> -1 (negative); 0.6 -> clip
    assert codes.tolist() == [[1, 0, 0, -1], [1, 0, -1, 1]]


@pytest.mark.parametrize("N", [4, 8, 13, 30])
def test_packing_is_hugging_faces_strided_layout(N):
    codes, _ = bitnet.weight_quant(torch.randn(N, 24, generator=torch.Generator().manual_seed(N)))
    packed = bitnet.pack_ternary(codes)
    assert packed.shape == (-(-N // 4), 24) and packed.dtype == torch.uint8
    if N % 4 == 0:  # HF's pack_weights handles whole groups of four rows
        assert torch.equal(packed, hf.pack_weights(codes.clone()))
        assert torch.equal(_original(hf.unpack_weights)(packed, torch.float32), codes.float())
    assert torch.equal(bitnet.unpack_ternary(packed, N), codes)


def test_ternary_linear_is_the_integer_form_of_the_fake_quantized_layer():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    layer = bitnet.TernaryLinear.from_linear(lin)
    x = torch.randn(2, 7, 96)
    expected = nn.functional.linear(_original(hf.ActQuant.forward)(None, x),
                                    _original(hf.WeightQuant.forward)(None, lin.weight.detach()), lin.bias.detach())
    with ql.kernels.trace() as ran:
        y = layer(x)
    assert ran and all("int_mm" in r or r == "reference" or "_int_mm" in r for r in ran), ran
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)  # exact integer sums vs float32 sums
    assert layer.packed_nbytes == 10 * 96 + 4  # 2 bits per weight and one float32 scale
    fresh = bitnet.TernaryLinear.from_linear(nn.Linear(96, 40))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)


def test_bitlinear_straight_through_gradients():
    torch.manual_seed(1)
    layer = bitnet.BitLinear.from_linear(nn.Linear(32, 16))
    x = torch.randn(5, 32, requires_grad=True)
    grad_y = torch.randn(5, 16)
    layer(x).backward(grad_y)
    x_q = bitnet.fake_quant_act(x.detach())
    assert torch.allclose(layer.weight.grad, grad_y.t() @ x_q, atol=1e-5)  # as if rounding were the identity
    w_q = bitnet.fake_quant_weight(layer.weight.detach())
    assert torch.allclose(x.grad, grad_y @ w_q, atol=1e-5)
    assert len(layer.weight.detach().unique()) > 3  # the latent weights are not ternary


def test_qat_beats_post_training_ternarization_on_the_tiny_gpt():
    gpt = ql.models.tiny_gpt()
    val = ql.data.pydoc_corpus("val")

    def bpb(m):
        return ql.eval.perplexity(m, val, max_tokens=2048, batch_size=16, progress=False)["bits_per_token"]

    ptq = ql.quantize_(copy.deepcopy(gpt), bitnet.BitNetConfig(ternarize=True, include=("blocks.*",)))
    qat = ql.quantize_(copy.deepcopy(gpt), bitnet.BitNetConfig(include=("blocks.*",)))
    assert isinstance(qat.blocks[0].mlp.c_fc, bitnet.BitLinear)
    ql.lora.finetune(qat, ql.data.pydoc_corpus("train"), steps=30, batch_size=8, seq_len=64, lr=1e-3, optimizer="adamw",
                     progress=False)
    trained_fake = bpb(qat)
    bitnet.convert_(qat)
    assert isinstance(qat.blocks[0].mlp.c_fc, bitnet.TernaryLinear)
    assert abs(bpb(qat) - trained_fake) < 0.02  # the integer model computes what training saw
    assert bpb(qat) < bpb(ptq) - 0.3, (bpb(qat), bpb(ptq))


def test_errors_teach():
    with pytest.raises(ValueError, match="no BitLinear layers"):
        bitnet.convert_(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"int8 codes in \{-1, 0, 1\}"):
        bitnet.pack_ternary(torch.full((4, 4), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="packed rows hold"):
        bitnet.unpack_ternary(torch.zeros(2, 4, dtype=torch.uint8), 20)
    model = ql.quantize_(nn.Sequential(nn.Linear(8, 8)), bitnet.BitNetConfig())
    with pytest.raises(ValueError, match="already quantized"):
        ql.quantize_(model, bitnet.BitNetConfig())
