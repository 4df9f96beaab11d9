"""ql.export's GGUF files: the Tiny GPT in llama.cpp's GPT-2 architecture, written and read back.

Oracles:
- the `gguf` package (llama.cpp's own gguf-py 0.19.0): its GGUFReader reads what save_gguf wrote, and its
  constants say what llama.cpp expects: the metadata keys (gguf.Keys), the tensor names of MODEL_ARCH.GPT2
  (gguf.TENSOR_NAMES), the ggml types, and GPT-2's byte-to-unicode table (gguf.vocab.bytes_to_unicode);
  gguf.quants.dequantize decodes the stored blocks to exactly qlab's values;
- the shapes llama.cpp's GPT-2 loader asks for (ggml ne, innermost first): attn_qkv [C, 3C], attn_output [C, C],
  ffn_up [C, 4C], ffn_down [4C, C], token_embd / output [C, vocab], position_embd [C, n_ctx];
- Hugging Face GPT-2 (to_hf_gpt2): GGUF's linear weights are its Conv1D weights transposed, as llama.cpp's
  convert_hf_to_gguf.py writes them;
- load_gguf round trips: the logits equal, bit for bit, those of a qlab model whose block linears hold the
  dequantized weights (every other tensor is stored in F32, exactly), and bits/byte stays near FP32's.
llama.cpp itself loads these files in interop/tests/test_llama_cpp.py (`make interop`, where it is built).
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import qlab as ql
from qlab.export import gguf_gpt2_name, gpt2_byte_tokens, load_gguf, read_gguf, save_gguf
from qlab.models.tiny_gpt import GPTConfig, TinyGPT

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFReader, Keys  # noqa: E402

QTYPES = ("Q8_0", "Q4_0", "Q4_K")
C, N_CTX, N_LAYER = 256, 128, 4  # the shipped Tiny GPT
LINEARS = [f"blocks.{i}.{c}" for i in range(N_LAYER) for c in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
# bits/byte on the first 4096 validation bytes minus FP32's (1.05713), measured: Q8_0 +0.00020, Q4_0 +0.00539,
# Q4_K +0.00157 (Q6_K -0.00053, Q5_1 +0.00049, Q5_0 +0.00262, Q4_1 +0.00590). Bounds: about 10x for Q8_0, 3x else.
BPB_BOUND = {"Q8_0": 0.002, "Q4_0": 0.015, "Q4_K": 0.005}
FILE_TYPE = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S}


@pytest.fixture(scope="module")
def model():
    return ql.models.tiny_gpt()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {q: save_gguf(model, folder / f"tiny-gpt-{q}.gguf", qtype=q) for q in QTYPES}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, N_CTX), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def val_bytes():
    return ql.data.pydoc_corpus("val")[:4096]


def _blocks(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """What GGUF keeps of a weight: qlab's blocks, dequantized by qlab."""
    return ql.gguf.dequantize(ql.gguf.quantize(w, qtype), qtype, w.shape)


def _dequantized_model(qtype: str) -> TinyGPT:
    """The reference: the Tiny GPT with every block linear holding its dequantized GGUF blocks."""
    reference = ql.models.tiny_gpt()
    with torch.no_grad():
        for name in LINEARS:
            w = reference.get_submodule(name).weight
            w.copy_(_blocks(w, qtype))
    return reference


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _bits_per_byte(m: nn.Module, data: torch.Tensor) -> float:
    return ql.eval.perplexity(m, data, progress=False)["bits_per_token"]


# ----------------------------------------------------------------------------- the file, read by gguf-py
@pytest.mark.parametrize("qtype", QTYPES)
def test_metadata(qtype, files):
    r = GGUFReader(files[qtype])
    arch = "gpt2"
    assert _field(r, Keys.General.ARCHITECTURE) == arch
    assert _field(r, Keys.General.NAME) == "qlab-tiny-gpt"
    assert _field(r, Keys.General.FILE_TYPE) == FILE_TYPE[qtype]
    assert _field(r, Keys.General.QUANTIZATION_VERSION) == gguf.GGML_QUANT_VERSION
    expected = {Keys.LLM.CONTEXT_LENGTH: N_CTX, Keys.LLM.EMBEDDING_LENGTH: C, Keys.LLM.FEED_FORWARD_LENGTH: 4 * C,
                Keys.LLM.BLOCK_COUNT: N_LAYER, Keys.Attention.HEAD_COUNT: 4, Keys.LLM.VOCAB_SIZE: 256}
    for key, value in expected.items():
        assert _field(r, key.format(arch=arch)) == value, key
    eps = _field(r, Keys.Attention.LAYERNORM_EPS.format(arch=arch))
    assert eps == np.float32(1e-5)  # nn.LayerNorm's default, stored as float32


def test_tokenizer_is_the_256_bytes(files):
    r = GGUFReader(files["Q4_0"])
    assert _field(r, Keys.Tokenizer.MODEL) == "gpt2" and _field(r, Keys.Tokenizer.PRE) == "gpt-2"
    tokens = _field(r, Keys.Tokenizer.LIST)
    byte_of = {ch: b for b, ch in gguf.vocab.bytes_to_unicode().items()}  # GPT-2's table, from gguf-py
    assert len(tokens) == 256 and all(len(t) == 1 for t in tokens)
    assert bytes(byte_of[t] for t in tokens) == bytes(range(256))  # token i spells byte i
    assert tokens[ord(" ")] == "Ġ" and tokens[ord("\n")] == "Ċ" and tokens[ord("A")] == "A"
    assert tokens == gpt2_byte_tokens()
    assert _field(r, Keys.Tokenizer.TOKEN_TYPE) == [gguf.TokenType.NORMAL] * 256
    assert Keys.Tokenizer.MERGES in r.fields and _field(r, Keys.Tokenizer.MERGES) == []  # present, and empty
    assert _field(r, Keys.Tokenizer.BOS_ID) == 0 and _field(r, Keys.Tokenizer.EOS_ID) == 0
    assert not _field(r, Keys.Tokenizer.ADD_BOS) and not _field(r, Keys.Tokenizer.ADD_EOS)


def _expected_tensors(qtype: str) -> dict[str, tuple[list[int], GGMLQuantizationType]]:
    """name -> (ggml ne, type) as llama.cpp's GPT-2 loader asks for them, names from gguf's constants."""
    T, F32, q = gguf.MODEL_TENSOR, GGMLQuantizationType.F32, GGMLQuantizationType[qtype]
    name = gguf.TENSOR_NAMES
    out = {f"{name[T.TOKEN_EMBD]}.weight": ([C, 256], F32), f"{name[T.POS_EMBD]}.weight": ([C, N_CTX], F32),
           f"{name[T.OUTPUT_NORM]}.weight": ([C], F32), f"{name[T.OUTPUT_NORM]}.bias": ([C], F32),
           f"{name[T.OUTPUT]}.weight": ([C, 256], F32)}
    for i in range(N_LAYER):
        for t, ne in ((T.ATTN_NORM, None), (T.FFN_NORM, None), (T.ATTN_QKV, [C, 3 * C]), (T.ATTN_OUT, [C, C]),
                      (T.FFN_UP, [C, 4 * C]), (T.FFN_DOWN, [4 * C, C])):
            base = name[t].format(bid=i)
            out[f"{base}.weight"] = ([C], F32) if ne is None else (ne, q)
            out[f"{base}.bias"] = ([C if ne is None else ne[1]], F32)
    assert {t for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]} == {T.TOKEN_EMBD, T.POS_EMBD, T.OUTPUT_NORM, T.OUTPUT,
                                                                     T.ATTN_NORM, T.ATTN_QKV, T.ATTN_OUT, T.FFN_NORM,
                                                                     T.FFN_UP, T.FFN_DOWN}  # every GPT-2 tensor
    return out


@pytest.mark.parametrize("qtype", QTYPES)
def test_tensor_names_types_and_shapes(qtype, files):
    r = GGUFReader(files[qtype])
    got = {t.name: ([int(d) for d in t.shape], t.tensor_type) for t in r.tensors}
    assert got == _expected_tensors(qtype)
    assert {gguf_gpt2_name(n) for n in ql.models.tiny_gpt(pretrained=False).state_dict()} == set(got)


@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_decode_to_qlab_values_bit_for_bit(qtype, files, model):
    tensors = {t.name: t for t in GGUFReader(files[qtype]).tensors}
    for name in LINEARS:
        w = model.get_submodule(name).weight.detach()
        t = tensors[gguf_gpt2_name(f"{name}.weight")]
        assert np.array_equal(t.data, ql.gguf.quantize(w, qtype).numpy())  # (out, row bytes): qlab's bytes
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # (out, in), llama.cpp's decoding
        assert values.dtype == np.float32 and values.shape == tuple(w.shape)
        assert np.array_equal(values.view(np.uint32), _blocks(w, qtype).numpy().view(np.uint32))
    state = model.state_dict()
    for param in ("wte.weight", "wpe.weight", "blocks.2.ln_1.bias", "blocks.3.mlp.c_fc.bias", "ln_f.weight"):
        assert np.array_equal(tensors[gguf_gpt2_name(param)].data, state[param].numpy())  # F32, as they are
    assert np.array_equal(tensors["output.weight"].data, state["wte.weight"].numpy())  # the tied head, copied


def test_orientation_is_hugging_face_conv1d_transposed(model, tmp_path):
    pytest.importorskip("transformers")
    path = save_gguf(model, tmp_path / "f32.gguf", qtype="F32")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    hf = model.to_hf_gpt2().transformer
    for i in (0, N_LAYER - 1):
        for gguf_name, conv1d in (("attn_qkv", hf.h[i].attn.c_attn), ("attn_output", hf.h[i].attn.c_proj),
                                  ("ffn_up", hf.h[i].mlp.c_fc), ("ffn_down", hf.h[i].mlp.c_proj)):
            t = tensors[f"blk.{i}.{gguf_name}.weight"]
            assert t.tensor_type == GGMLQuantizationType.F32
            assert [int(d) for d in t.shape] == list(conv1d.weight.shape)  # ne = [in, out] = Conv1D's (in, out)
            assert np.array_equal(t.data, conv1d.weight.detach().T.numpy())  # numpy (out, in): Conv1D transposed
    assert _field(GGUFReader(path), Keys.General.FILE_TYPE) == gguf.LlamaFileType.ALL_F32


def test_read_gguf_agrees_with_gguf_reader(files):
    meta, tensors = read_gguf(files["Q4_K"])
    r = GGUFReader(files["Q4_K"])
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta.keys() == fields.keys()
    for key, value in fields.items():
        assert meta[key] == value, key
    assert list(tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        mine = tensors[t.name]
        assert mine.type == t.tensor_type.name and mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(mine.data.numpy(), t.data.reshape(-1).view(np.uint8))


# ----------------------------------------------------------------------------- load_gguf: logits and bits/byte
@pytest.mark.parametrize("qtype", QTYPES)
def test_load_gives_the_dequantized_model_exactly(qtype, files, tokens, model):
    loaded = load_gguf(files[qtype])
    assert isinstance(loaded, TinyGPT) and not loaded.training
    assert loaded.config == dataclasses.replace(model.config, dropout=0.0)  # GGUF keeps no training settings
    assert {m.eps for m in loaded.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}
    assert loaded.lm_head.weight is loaded.wte.weight
    with torch.no_grad():
        # fp32 exact: block weights are the same float32 values, everything else is stored in F32 as it was
        assert torch.equal(loaded(tokens), _dequantized_model(qtype)(tokens))


def test_bits_per_byte_near_fp32(files, val_bytes, model):
    fp32 = _bits_per_byte(model, val_bytes)
    assert math.isclose(fp32, 1.05713, abs_tol=1e-4)
    bpb = {q: _bits_per_byte(load_gguf(files[q]), val_bytes) for q in QTYPES}
    for q in QTYPES:
        assert abs(bpb[q] - fp32) < BPB_BOUND[q], (q, bpb[q], fp32)
    assert bpb["Q4_K"] < bpb["Q4_0"]  # the same 4.5 bits per weight; K-quant's fitted scales and mins win


def test_f32_round_trip_of_rows_no_block_divides(tmp_path, tokens):
    small = TinyGPT(GPTConfig(n_layer=1, n_head=4, n_embd=40, block_size=16)).eval()
    path = save_gguf(small, tmp_path / "small.gguf", qtype="F32")
    with torch.no_grad():
        assert torch.equal(load_gguf(path)(tokens[:, :16]), small(tokens[:, :16]))


# ----------------------------------------------------------------------------- errors that teach
def test_save_errors(model, tmp_path):
    path = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="writes a qlab TinyGPT.*got Linear"):
        save_gguf(nn.Linear(4, 4), path)
    with pytest.raises(ValueError, match=r"qtype='Q3_K' is not a GGUF type save_gguf writes; use one of"):
        save_gguf(model, path, qtype="Q3_K")
    with pytest.raises(ValueError, match=r"did you mean 'Q4_0'"):
        save_gguf(model, path, qtype="q4_0")
    wide = TinyGPT(GPTConfig(n_layer=1, n_head=4, n_embd=96, block_size=16))
    with pytest.raises(ValueError, match=r"blk\.0\.attn_qkv\.weight \(blocks\.0\.attn\.c_attn\) has rows of "
                                         r"in_features=96 .*Q4_K's block of 256.*smaller blocks \(Q8_0, Q4_0"):
        save_gguf(wide, path, qtype="Q4_K")
    narrow = TinyGPT(GPTConfig(n_layer=1, n_head=4, n_embd=40, block_size=16))
    with pytest.raises(ValueError, match=r"in_features=40 .*no GGUF block type divides 40: keep the blocks in "
                                         r"F16/F32 \(qtype='F32'\)"):
        save_gguf(narrow, path, qtype="Q8_0")
    quantized = TinyGPT(GPTConfig(n_layer=1, n_head=4, n_embd=128, block_size=16))
    ql.quantize_(quantized, ql.RTNConfig(include=("blocks.*",)))
    with pytest.raises(ValueError, match=r"quantizes the float weights itself.*blocks\.0\.attn\.c_attn is "
                                         r"Int4WeightOnlyLinear, not a float nn\.Linear; pass the float model"):
        save_gguf(quantized, path)
    assert not path.exists()  # nothing written by a refused call


def test_load_errors(files, tmp_path):
    with pytest.raises(ValueError, match="is not a GGUF file: it starts with b'PK"):
        (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
        load_gguf(tmp_path / "zip.gguf")
    data = files["Q4_0"].read_bytes()
    with pytest.raises(ValueError, match="ends inside its GGUF header: the file is truncated"):
        (tmp_path / "head.gguf").write_bytes(data[:1000])
        load_gguf(tmp_path / "head.gguf")
    with pytest.raises(ValueError, match="ends inside tensor .*truncated"):
        (tmp_path / "cut.gguf").write_bytes(data[:-100])
        load_gguf(tmp_path / "cut.gguf")
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture='llama': TinyGPT is llama.cpp's 'gpt2'"):
        load_gguf(tmp_path / "llama.gguf")
