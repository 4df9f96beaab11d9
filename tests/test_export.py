"""ql.export: AutoGPTQ checkpoints written and read by qlab, and the Hugging Face GPT-2 view of the Tiny GPT.

Oracles here: transformers' own GPT-2 forward (to_hf_gpt2), int32 words computed by hand from the format's
statement ("input row 8r+j at bits 4j"), and save -> load round trips that must give back the very same
codes and logits. AutoGPTQ itself loads these checkpoints in interop/tests/test_autogptq_checkpoint.py."""

import json
import warnings

import pytest
import torch
from torch import nn

import qlab as ql
from qlab.export import load_autogptq, pack_gptq, qtensor_to_autogptq, save_autogptq, unpack_gptq

LINEARS = [f"blocks.{i}.{c}" for i in range(4) for c in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def _i32(word: int) -> int:
    """An unsigned 32-bit word as the int32 torch stores."""
    return word - 2**32 if word >= 2**31 else word


@pytest.fixture(scope="module")
def calib():
    return ql.data.lm_calibration_batches(n_batches=2, batch_size=2, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))


def _gptq_model(calib, **options):
    model = ql.models.tiny_gpt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ql.quantize_(model, ql.GPTQConfig(**options), calib_data=calib)
    return model


def _round_scales_to_fp16_(model):
    """What the checkpoint keeps of the scales (fp16): the reference the loaded model must equal exactly."""
    for name in LINEARS:
        m = model.get_submodule(name)
        m.weight_scale.copy_(m.weight_scale.half().float())
        m._kernel_cache.clear()


# ----------------------------------------------------------------------------- Hugging Face GPT-2
def test_to_hf_gpt2_logits_equal(tokens):
    pytest.importorskip("transformers")
    model = ql.models.tiny_gpt()
    hf = model.to_hf_gpt2()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.activation_function == "gelu"
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied, as in TinyGPT
    torch.testing.assert_close(hf.transformer.h[0].attn.c_attn.weight, model.blocks[0].attn.c_attn.weight.t())
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=0)


def test_to_hf_gpt2_refuses_a_quantized_model():
    pytest.importorskip("transformers")
    model = ql.models.tiny_gpt()
    ql.quantize_(model, ql.RTNConfig(include=("blocks.*",)))
    with pytest.raises(ValueError, match="converts a float TinyGPT.*save_autogptq"):
        model.to_hf_gpt2()


# ----------------------------------------------------------------------------- packing, by hand
def test_pack_4bit_by_hand():
    # codes (K=32, N=2): column 0 is k % 16, column 1 is 15 - k % 16. Row 8r+j sits at bits 4j..4j+3 of word r.
    k = torch.arange(32)
    codes = torch.stack([k % 16, 15 - k % 16], dim=1)  # (K, N)
    expected = torch.tensor([[_i32(0x76543210), _i32(0x89ABCDEF)],  # rows 0..7: codes 0..7 | 15..8
                             [_i32(0xFEDCBA98), _i32(0x01234567)],  # rows 8..15: codes 8..15 | 7..0
                             [_i32(0x76543210), _i32(0x89ABCDEF)],
                             [_i32(0xFEDCBA98), _i32(0x01234567)]], dtype=torch.int32)
    assert torch.equal(pack_gptq(codes, 4), expected)
    assert torch.equal(unpack_gptq(expected, 4), codes.to(torch.int32))


def test_pack_2_and_8_bit_by_hand():
    codes = torch.tensor([j % 4 for j in range(32)]).reshape(32, 1)  # 2 bits: row 16r+j at bits 2j
    assert pack_gptq(codes, 2).flatten().tolist() == [_i32(0xE4E4E4E4), _i32(0xE4E4E4E4)]  # 0b11100100 per 4 rows
    codes = torch.arange(32).reshape(32, 1) * 7  # 8 bits: row 4r+j at bits 8j
    words = pack_gptq(codes, 8).flatten().tolist()
    assert words[0] == 0x150E0700 and words[7] == _i32(0xD9D2CBC4)  # rows 0..3 = 0, 7, 14, 21; rows 28..31
    for bits in (2, 3, 4, 8):  # 3 bits: 32 values in 3 words, two of them straddling (checked against AutoGPTQ in interop)
        q = torch.randint(0, 2**bits, (64, 5), generator=torch.Generator().manual_seed(bits))
        assert pack_gptq(q, bits).shape == (64 * bits // 32, 5)
        assert torch.equal(unpack_gptq(pack_gptq(q, bits), bits), q.to(torch.int32))


def test_layer_tensors_by_hand():
    # a symmetric int4 layer (N=32, K=32), codes c[n, k] = k % 16 - 8: AutoGPTQ's unsigned codes are k % 16
    # and its zero point 8, stored as 7 in every nibble
    codes = (torch.arange(32) % 16 - 8).repeat(32, 1)  # (N, K)
    scale = torch.full((32, 1), 0.5)
    qt = ql.from_codes(codes, scale, None, ql.int4, ql.PerGroup(32), symmetric=True)
    t = qtensor_to_autogptq(qt)
    assert t["qweight"].shape == (4, 32) and t["qzeros"].shape == (1, 4) and t["scales"].shape == (1, 32)
    assert t["qweight"][:, 0].tolist() == [_i32(0x76543210), _i32(0xFEDCBA98)] * 2  # row 8r+j at bits 4j
    assert t["qzeros"].tolist() == [[0x77777777] * 4]  # zero - 1 = 7, eight outputs per word
    assert t["scales"].dtype == torch.float16 and torch.equal(t["g_idx"], torch.zeros(32, dtype=torch.int32))


# ----------------------------------------------------------------------------- save -> load round trips
ROUND_TRIPS = {
    "4bit-sym-g128": dict(qtype=ql.uint4, group_size=128, symmetric=True),
    "4bit-sym-act-order-g64": dict(qtype=ql.uint4, group_size=64, symmetric=True, act_order=True),
    "4bit-asym-g128": dict(qtype=ql.uint4, group_size=128, symmetric=False),
    "8bit-sym-g128": dict(qtype=8, group_size=128, symmetric=True),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_same_codes_and_logits(case, calib, tokens, tmp_path):
    options = ROUND_TRIPS[case]
    model = _gptq_model(calib, **options)
    if options["symmetric"]:
        save_autogptq(model, tmp_path)
    else:
        assert all(int(model.get_submodule(n).weight_zero_point.min()) > 0 for n in LINEARS)  # the case's premise
        with pytest.warns(UserWarning, match="asymmetric zero points.*symmetric=True is the portable"):
            save_autogptq(model, tmp_path)
    bits, act_order = ql.gptq._bits_of(options["qtype"]), options.get("act_order", False)
    qconfig = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qconfig == {"bits": bits, "group_size": options["group_size"], "damp_percent": 0.01, "desc_act": act_order,
                       "static_groups": False, "sym": options["symmetric"], "true_sequential": True,
                       "model_name_or_path": "qlab-tiny-gpt", "model_file_base_name": "model",
                       "is_marlin_format": False, "quant_method": "gptq"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu" and config["vocab_size"] == 256

    loaded = load_autogptq(tmp_path)
    for name in LINEARS:
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert type(b) is (ql.Int4WeightOnlyLinear if bits == 4 else ql.WeightOnlyLinear)
        qa, qb = a.qweight(), b.qweight()
        assert qb.qtype == qa.qtype and qb.symmetric == qa.symmetric and qb.granularity == qa.granularity
        assert torch.equal(qb.int_repr(), qa.int_repr()), name
        assert torch.equal(qb.scale, qa.scale.half().float()), name  # the checkpoint stores fp16 scales
        assert torch.equal(qb.zero_point, qa.zero_point), name
        assert (qa.g_idx is None) == (not act_order) and (qb.g_idx is None) == (qa.g_idx is None)
        if act_order:
            assert torch.equal(qb.g_idx, qa.g_idx), name
        assert torch.equal(b.bias, a.bias), name
    _round_scales_to_fp16_(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)


def test_asymmetric_zero_point_0_is_refused(tmp_path):
    model = ql.models.tiny_gpt()
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.weight[:3, :128].abs_()  # groups of positive weights: range [0, max], zero 0
    ql.quantize_(model, ql.RTNConfig(qtype=ql.uint4, group_size=128, symmetric=False, include=("blocks.*",)))
    assert int(model.blocks[1].mlp.c_fc.weight_zero_point.min()) == 0
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.c_fc.*zero points equal to 0.*zero - 1.*symmetric=True"):
        save_autogptq(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_loads_a_checkpoint_named_as_autogptq_names_it(calib, tokens, tmp_path):
    model = ql.models.tiny_gpt()
    ql.quantize_(model, ql.RTNConfig(qtype=ql.uint4, group_size=-1, symmetric=True, include=("blocks.*",)))
    save_autogptq(model, tmp_path)
    assert json.loads((tmp_path / "quantize_config.json").read_text())["group_size"] == -1  # one group per row
    (tmp_path / "model.safetensors").rename(tmp_path / "gptq_model-4bit--1g.safetensors")
    qconfig = json.loads((tmp_path / "quantize_config.json").read_text())
    (tmp_path / "quantize_config.json").write_text(json.dumps({**qconfig, "model_file_base_name": None}))
    loaded = load_autogptq(tmp_path)
    assert loaded.blocks[3].mlp.c_proj.weight_granularity == ql.PerGroup(1024)
    _round_scales_to_fp16_(model)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


# ----------------------------------------------------------------------------- errors that teach
def _rtn_model(**options):
    model = ql.models.tiny_gpt()
    ql.quantize_(model, ql.RTNConfig(**{"qtype": ql.uint4, "group_size": 128, "symmetric": True,
                                        "include": ("blocks.*",), **options}))
    return model


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="writes a qlab TinyGPT.*got Linear"):
        save_autogptq(nn.Linear(4, 4), tmp_path)
    with pytest.raises(ValueError, match=r"\['blocks\.2\.attn\.c_proj'\] are not quantized"):
        save_autogptq(_rtn_model(exclude=("blocks.2.attn.c_proj",)), tmp_path)
    quantized_head = _rtn_model()
    quantized_head.lm_head = ql.Int4WeightOnlyLinear.from_qtensor(
        ql.gptq.rtn(quantized_head.lm_head.weight.detach(), 4, 128, True), None)
    with pytest.raises(ValueError, match="lm_head in float.*include=\\('blocks"):
        save_autogptq(quantized_head, tmp_path)
    with pytest.raises(ValueError, match=r"hold \(2, 3, 4, 8\)-bit codes, got 5 bits"):
        save_autogptq(_rtn_model(qtype=5), tmp_path)
    model = _rtn_model()
    lin = model.blocks[0].mlp.c_fc
    W = lin.dequantize_weight()
    model.blocks[0].mlp.c_fc = ql.WeightOnlyLinear.from_qtensor(ql.gptq.rtn(W, 8, 128, True), lin.bias)
    with pytest.raises(ValueError, match="one bit width.*mixed bits.*'blocks.0.mlp.c_fc': 8"):
        save_autogptq(model, tmp_path)
    model.blocks[0].mlp.c_fc = ql.Int4WeightOnlyLinear.from_qtensor(ql.gptq.rtn(W, 4, 64, True), lin.bias)
    with pytest.raises(ValueError, match="one group size.*mixed group sizes.*'blocks.0.mlp.c_fc': 64"):
        save_autogptq(model, tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_autogptq(tmp_path)
    save_autogptq(_rtn_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_new"}))
    with pytest.raises(ValueError, match="'activation_function': 'gelu_new'.*TinyGPT cannot represent"):
        load_autogptq(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'.*GPT-2"):
        load_autogptq(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").rename(tmp_path / "elsewhere.bin")
    with pytest.raises(FileNotFoundError, match="expected one .safetensors file"):
        load_autogptq(tmp_path)
