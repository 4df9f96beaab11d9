"""qlab.nf4 against bitsandbytes 0.50 on CPU (the reference implementation of QLoRA's formats).

Oracles: `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` (packed bytes, absmax, offset, nested
absmax, dequantized values), `create_dynamic_map`, `get_4bit_type`, and hand-computed cases.
"""

import itertools
import logging
import math

import pytest
import torch

import qlab as ql
from qlab import nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def test_codebooks_are_bitsandbytes_tables():
    assert torch.equal(nf4.codebook("nf4"), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.codebook("fp4"), bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnb_functional.create_dynamic_map())
    # qlab's formats chapter computes NF4 from normal quantiles: the same levels up to float32 rounding
    assert torch.allclose(ql.nf4_codebook(), nf4.NF4_LEVELS, rtol=0, atol=2e-7)


def test_nearest_level_by_hand():
    levels = torch.tensor([0.0, 1.0, -1.0, 0.5])  # any order: indices refer to this order
    x = torch.tensor([-0.9, -0.5, 0.25, 0.26, 0.75, 2.0, 0.74])
    # -0.5 is half-way between -1 and 0: the lower level (-1, index 2); 0.25 likewise goes to 0; 0.75 to 0.5
    assert nf4.nearest_level(x, levels).tolist() == [2, 2, 0, 3, 3, 1, 3]


def test_pack_order_first_element_in_high_nibble():
    w = torch.tensor([1.0, -1.0, 0.0])  # one block: absmax 1 -> NF4 codes 15, 0, 7, then the padding value 0 -> 7
    t = nf4.quantize_4bit(w, "nf4", group_size=32)
    assert t.qdata.tolist() == [(15 << 4) | 0, (7 << 4) | 7]
    assert t.codes().tolist() == [15, 0, 7]
    assert t.dequantize().tolist() == [1.0, -1.0, 0.0]


CASES = list(itertools.product(["nf4", "fp4"], [32, 64, 128, 4096], [1, 7, 64 * 5 + 3, 4096 * 2],
                               [torch.float32, torch.float16, torch.bfloat16], [False, True]))


@pytest.mark.parametrize("quant_type,group_size,numel,dtype,double_quant", CASES)
def test_quantize_4bit_matches_bitsandbytes(quant_type, group_size, numel, dtype, double_quant):
    g = torch.Generator().manual_seed(numel + group_size)
    w = (torch.randn(numel, generator=g) * 3).to(dtype)
    if numel > 128:
        w[:128] = 0  # all-zero blocks
    packed, state = bnb_functional.quantize_4bit(w, blocksize=group_size, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    t = nf4.quantize_4bit(w, quant_type, group_size, double_quant)
    assert torch.equal(t.qdata, packed.reshape(-1))
    if double_quant:
        assert torch.equal(t.offset, state.offset) and torch.equal(t.nested_absmax, state.state2.absmax)
        _assert_nested_codes_agree(w, t, state)
    else:
        assert torch.equal(t.absmax, state.absmax)
    ours, theirs = t.dequantize(), bnb_functional.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == w.shape
    if double_quant:  # where a nested code differs (see below) the block's absmax differs by one 8-bit step
        assert torch.allclose(ours.float(), theirs.reshape(w.shape).float(), rtol=2e-2, atol=0)
    else:
        assert torch.equal(ours, theirs.reshape(w.shape))


def _assert_nested_codes_agree(w, t, state):
    """Double quantization's 8-bit codes: qlab takes the exactly nearest level (ties low), as bitsandbytes'
    pure-torch backend and its CUDA kernel do. Its CPU C kernel searches a table and may pick the other
    neighbour for a value within 2e-5 of a midpoint; anywhere else the codes must be identical."""
    _, plain = bnb_functional.quantize_4bit(w, blocksize=t.group_size, quant_type=t.quant_type)
    centred = plain.absmax - state.offset  # what bitsandbytes coded in 8 bits
    nested = state.state2.absmax[torch.arange(centred.numel()) // nf4.NESTED_BLOCK_SIZE]
    v = centred / nested
    levels = nf4.dynamic_map()
    midpoints = (levels[:-1] + levels[1:]) / 2
    near_midpoint = (v[:, None] - midpoints[None, :]).abs().min(dim=1).values < 2e-5
    ours, theirs = t.absmax.long(), state.absmax.long()
    differ = (ours != theirs) & (nested != 0)  # an all-zero nested block decodes to 0 whatever its codes
    assert not (differ & ~near_midpoint).any(), (ours[differ], theirs[differ], v[differ])
    assert bool(((ours - theirs)[differ].abs() <= 1).all())
    # and where the CPU kernel is not in doubt, the codes are the exactly nearest levels
    exact = nf4.nearest_level(v[nested != 0], levels)
    assert torch.equal(exact, ours[nested != 0])


def test_double_quantization_bits_per_param_on_4096_squared():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    plain, dq = nf4.quantize_4bit(w, group_size=64), nf4.quantize_4bit(w, group_size=64, double_quant=True)
    assert plain.bits_per_param == 4.5
    # QLoRA: 8/64 + 32/(64*256) = 0.127 extra bits per parameter; qlab also counts the one float32 offset
    assert dq.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2, abs=1e-12)
    assert math.isclose(round(dq.bits_per_param, 3), 4.127)


def test_nf4_beats_fp4_on_normal_weights():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    err = {q: float((nf4.quantize_4bit(w, q, 64).dequantize() - w).pow(2).mean()) for q in ("nf4", "fp4")}
    assert err["nf4"] < err["fp4"], err


def test_bad_input_teaches():
    w = torch.randn(64)
    with pytest.raises(ValueError, match=r"group_size=48 is not a block size bitsandbytes supports; use one of \(32"):
        nf4.quantize_4bit(w, group_size=48)
    with pytest.raises(ValueError, match="quant_type='int4' is not a 4-bit block format"):
        nf4.quantize_4bit(w, "int4")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16 tensor, got torch.int64"):
        nf4.quantize_4bit(torch.arange(64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize_4bit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize_4bit(torch.empty(0))


# ----------------------------------------------------------------------------- the layer and quantize_
def test_nf4_linear_forward_state_dict_and_gradients(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    layer = ql.nf4.NF4Linear.from_float(lin, "nf4", 64, double_quant=True)
    x = torch.randn(2, 5, 128, requires_grad=True)
    w_hat = nf4.quantize_4bit(lin.weight.detach(), "nf4", 64, True).dequantize()
    with ql.kernels.trace() as ran:
        y = layer(x)
    assert ran == [nf4.BNB_CPU]  # bitsandbytes' own matmul on qlab's bytes: the reference's result bit for bit
    with ql.kernels.disable(nf4.BNB_CPU), ql.kernels.trace() as ran_ref:
        y_ref = layer(x)
    assert ran_ref == ["reference"] and torch.equal(y, y_ref)
    assert torch.allclose(y, x @ w_hat.t() + lin.bias, atol=1e-5)
    y.sum().backward()  # the input gets a gradient through the frozen 4-bit weight
    assert torch.allclose(x.grad, w_hat.sum(0).expand(2, 5, 128), atol=1e-5)
    x.grad = None
    y_ref.sum().backward()
    assert torch.allclose(x.grad, w_hat.sum(0).expand(2, 5, 128), atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())
    torch.save(layer.state_dict(), tmp_path / "nf4.pt")
    fresh = ql.nf4.NF4Linear.from_float(torch.nn.Linear(128, 48), "nf4", 64, double_quant=True)
    fresh.load_state_dict(torch.load(tmp_path / "nf4.pt"))  # plain tensors: no bitsandbytes needed to load
    assert torch.equal(fresh(x), y)
    assert layer.packed_nbytes == 128 * 48 // 2 + 96 + 4 + 4


def test_nf4_config_quantizes_a_model_and_keeps_it_close():
    model = ql.models.tiny_gpt().eval()
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
    ql.quantize_(model, ql.nf4.NF4Config(double_quant=True, include=("blocks.*",)))
    assert isinstance(model.blocks[0].mlp.c_fc, ql.nf4.NF4Linear) and type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        out = model(tokens)
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.01
    with pytest.raises(ValueError, match="already quantized"):
        ql.quantize_(model, ql.nf4.NF4Config(include=("blocks.0.mlp.c_fc",)))


def test_nf4_config_errors():
    with pytest.raises(ValueError, match="group_size=100 is not a block size"):
        ql.nf4.NF4Config(group_size=100)
    with pytest.raises(ValueError, match="quant_type='nf3'"):
        ql.nf4.NF4Config(quant_type="nf3")
    with pytest.raises(ValueError, match="2-D"):
        ql.nf4.NF4Linear(nf4.quantize_4bit(torch.randn(64)))
