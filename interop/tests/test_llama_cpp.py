"""ql.export.save_gguf against llama.cpp itself (llama-cpp-python 0.3.36, its CPU backend): llama.cpp loads the
Tiny GPT as qlab writes it, in every GGUF type save_gguf writes, tokenizes text into the same bytes, and its
logits are the ones qlab computes for the same file.

Runs in .venv-interop once `make interop` has built llama-cpp-python there (README.md has the build times);
without it the module is skipped and says how to build it.

The reference is qlab's model of the same file (`ql.export.load_gguf`: the dequantized blocks), plus the two
things llama.cpp computes differently from the Tiny GPT, copied here so that what is left is rounding:
1) GELU: llama.cpp's GPT-2 MLP calls ggml_gelu, the tanh approximation, and its CPU backend reads it from a
   table of float16 results indexed by the input rounded to float16 (|x| < 10; ggml-cpu/vec.h). The Tiny GPT
   uses exact GELU (`GgmlGELU` below is ggml's).
2) the activations of a quantized matmul: ggml's CPU backend multiplies a block weight with its activations
   quantized to blocks too (the type's `vec_dot_type`): Q8_0 blocks of 32 for Q8_0/Q4_0/Q5_0, Q8_1 for
   Q4_1/Q5_1 (Q8_0's codes plus a float16 block sum; copied here as Q8_0), Q8_K blocks of 256 for the K-quants,
   float16 for F16 weights. Every other op (embeddings, LayerNorm, attention with an F32 KV cache, the F32 LM
   head) is float32 in both.
What stays: float32 sums in another order, and where such a difference moves a value across a rounding
boundary (float16 in GELU, a code of the activation blocks) a jump of one step, carried through the later
layers. Hence the bounds (ATOL below): about 3x the measured max |difference| over the 128 x 256 logits of 128
bytes of text (the logits span about +-25), in one batch and one token at a time alike. The Tiny GPT itself
(exact GELU, float activations) is compared too, with a looser bound and the top-1 agreement: llama.cpp runs
qlab's model.

    type   vs the reference: max|diff| (mean), top-1    vs qlab's own model: max|diff|, top-1
    F32    1.3e-3 (1.2e-4), 100 %                       2.6e-2, 100 %
    F16    3.1e-3 (4.7e-4), 100 %                       2.8e-2, 100 %
    Q8_0   4.9e-2 (5.0e-3), 100 %                       0.10, 100 %
    Q4_0   3.8e-2 (6.7e-3), 100 %                       0.17, 99.2 % (one position of 128)
    Q5_0   5.6e-2 (9.5e-3), 100 %                       0.12, 100 %
    Q4_1   0.13 (1.7e-2), 100 % (Q8_1's float16 block sums are not copied)    0.15, 100 %
    Q5_1   0.14 (1.9e-2), 100 %                         0.12, 100 %
    Q4_K   8.8e-2 (1.5e-2), 100 %                       0.24, 100 %
    Q6_K   7.0e-2 (8.6e-3), 100 %                       0.25, 100 %
"""

import numpy as np
import pytest
import torch
from torch import nn

import qlab as ql
from qlab.export import load_gguf, save_gguf

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not built in this environment: `make interop` builds it into "
                        ".venv-interop (README.md: 4-12 minutes on 2 cores)")

torch.set_num_threads(1)  # tiny ops on a 2-core machine: one thread is much faster (tests/conftest.py)

QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q4_K", "Q6_K")
N_CTX = 128  # the Tiny GPT's block_size: position_embd has 128 rows
# max |llama.cpp - reference| over the logits: about 3x the measured values in the module docstring
ATOL = {"F32": 5e-3, "F16": 1e-2, "Q8_0": 0.15, "Q4_0": 0.15, "Q5_0": 0.15, "Q4_1": 0.4, "Q5_1": 0.4,
        "Q4_K": 0.25, "Q6_K": 0.25}
MEAN_ATOL = {"F32": 5e-4, "F16": 2e-3}  # mean |difference|; 0.05 for the block types
OWN_MODEL_ATOL = {"F32": 0.1, "F16": 0.1}  # against qlab's own model of the file; 0.6 for the block types


# ----------------------------------------------------------------------------- what ggml computes differently
class GgmlGELU(nn.Module):
    """ggml_vec_gelu_f32 with GGML_GELU_FP16 (ggml-cpu/vec.h): x rounded to float16 indexes a table of
    float16(0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))); x <= -10 gives 0 and x >= 10 gives x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.half().float()
        y = (0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * h * (1.0 + 0.044715 * h * h)))).half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def q8_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """x's rows as Q8_0 blocks of 32 decode them: d = amax / 127 (float16), q = round(x / d); ql.gguf's rounding
    (C's roundf), which matches ggml's activation blocks better than round-half-even on this model."""
    rows = x.reshape(-1, x.shape[-1])  # (B * T, K)
    return ql.gguf.dequantize(ql.gguf.quantize(rows, "Q8_0"), "Q8_0", rows.shape).reshape(x.shape)


def q8_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """x's rows as Q8_K blocks of 256 (quantize_row_q8_K_ref): max = the signed value of the largest |x|,
    iscale = -127 / max, q = min(127, round-half-even(iscale * x)), x_hat = q * (1 / iscale), in float32."""
    b = x.reshape(*x.shape[:-1], -1, 256)  # (..., K / 256, 256)
    peak = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # (..., K / 256, 1)
    iscale = torch.where(peak != 0, -127.0 / peak, torch.zeros_like(peak))
    d = torch.where(peak != 0, 1.0 / iscale, torch.zeros_like(peak))
    return (torch.round(iscale * b).clamp(max=127) * d).reshape(x.shape)


ACTIVATIONS = {"F16": lambda x: x.half().float(), "Q8_0": q8_0_blocks, "Q4_0": q8_0_blocks, "Q5_0": q8_0_blocks,
               "Q4_1": q8_0_blocks, "Q5_1": q8_0_blocks, "Q4_K": q8_k_blocks, "Q6_K": q8_k_blocks}


class GgmlInputs(nn.Module):
    """A block linear whose input is first rounded as ggml rounds it for this weight type (its vec_dot_type)."""

    def __init__(self, linear: nn.Module, round_input) -> None:
        super().__init__()
        self.linear, self.round_input = linear, round_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.round_input(x))


def ggml_reference(path, qtype: str) -> nn.Module:
    """qlab's model of the file (load_gguf) with ggml's GELU and ggml's rounding of the block linears' inputs."""
    model = load_gguf(path)
    for block in model.blocks:
        block.mlp.act = GgmlGELU()
        if qtype in ACTIVATIONS:
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                 (block.mlp, "c_proj")):
                setattr(parent, name, GgmlInputs(getattr(parent, name), ACTIVATIONS[qtype]))
    return model


# ----------------------------------------------------------------------------- llama.cpp
def open_llama(path) -> "llama_cpp.Llama":
    """llama.cpp on one thread, every position's logits kept, an F32 KV cache (its default F16 would round the
    keys and values), no flash attention."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=1,
                           n_threads_batch=1, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False)


def llama_logits(llm, tokens: list[int], one_at_a_time: bool) -> torch.Tensor:
    """(T, 256) logits of every position: the whole sequence in one batch (prompt processing) or one token per
    llama_decode call through llama.cpp's KV cache (generation)."""
    llm.reset()
    if one_at_a_time:
        for t in tokens:
            llm.eval([t])
    else:
        llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[: len(tokens)]))


@pytest.fixture(scope="module")
def model():
    return ql.models.tiny_gpt()


@pytest.fixture(scope="module")
def tokens():
    return ql.data.pydoc_corpus("val")[:N_CTX].long()  # 128 bytes of Python documentation


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {q: save_gguf(model, folder / f"tiny-gpt-{q}.gguf", qtype=q) for q in QTYPES}


@pytest.fixture(scope="module")
def llama_runs(files, tokens):
    """llama.cpp's logits per type, in one batch and one token at a time; each model closed after use."""
    out = {}
    for q, path in files.items():
        llm = open_llama(path)
        try:
            out[q] = {mode: llama_logits(llm, tokens.tolist(), mode == "decode") for mode in ("batch", "decode")}
        finally:
            llm.close()
    return out


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


# ----------------------------------------------------------------------------- the file, as llama.cpp reads it
def test_llama_cpp_reads_the_hyper_parameters_and_vocabulary(files):
    llm = open_llama(files["Q4_0"])
    try:
        meta = llm.metadata  # every value as a string
        assert meta["general.architecture"] == "gpt2" and meta["general.file_type"] == "2"  # MOSTLY_Q4_0
        assert meta["gpt2.context_length"] == str(N_CTX) and meta["gpt2.block_count"] == "4"
        assert llm.n_vocab() == 256 and llm.n_embd() == 256
        assert llm.token_bos() == 0 and llm.token_eos() == 0
        text = "def f(x):\n    return x ** 2  # grüße, 量子化\n"
        ids = llm.tokenize(text.encode(), add_bos=True)  # the file says add_bos_token false: nothing prepended
        assert ids == list(text.encode())  # token i is byte i, through llama.cpp's GPT-2 BPE (no merges)
        assert llm.detokenize(ids) == text.encode()
        assert llm.detokenize(list(range(1, 256))) == bytes(range(1, 256))  # every byte's piece is that byte
    finally:
        llm.close()


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("mode", ["batch", "decode"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_llama_cpp_logits_equal_qlab_reference(qtype, mode, files, llama_runs, tokens):
    ours = ggml_reference(files[qtype], qtype)
    with torch.no_grad():
        expected = ours(tokens[None])[0]  # (128, 256)
    got = llama_runs[qtype][mode]
    diff = (got - expected).abs()
    assert float(diff.max()) < ATOL[qtype], (qtype, mode, float(diff.max()))
    assert float(diff.mean()) < MEAN_ATOL.get(qtype, 0.05), (qtype, mode, float(diff.mean()))
    assert top1_agreement(got, expected) >= (1.0 if qtype in ("F32", "F16") else 127 / 128)


@pytest.mark.parametrize("qtype", QTYPES)
def test_llama_cpp_runs_qlabs_model_of_the_file(qtype, files, llama_runs, tokens, model):
    """Against qlab's own model of the file (exact GELU, float activations): what a user of either sees."""
    loaded = load_gguf(files[qtype])
    with torch.no_grad():
        ours = loaded(tokens[None])[0]
        if qtype == "F32":  # the F32 file is the Tiny GPT exactly
            assert torch.equal(ours, model(tokens[None])[0])
    got = llama_runs[qtype]["batch"]
    assert float((got - ours).abs().max()) < OWN_MODEL_ATOL.get(qtype, 0.6)
    assert top1_agreement(got, ours) >= (1.0 if qtype in ("F32", "F16") else 0.98)


def test_batch_and_one_token_at_a_time_agree(llama_runs):
    """llama.cpp's KV-cached decoding (one token per call, its matrix-vector kernels) gives the logits of its
    prompt processing (one batch, its matrix-matrix kernels), up to the same rounding."""
    for q, runs in llama_runs.items():
        assert float((runs["batch"] - runs["decode"]).abs().max()) < ATOL[q], q
        assert top1_agreement(runs["batch"], runs["decode"]) >= 127 / 128, q


def test_ggml_reference_is_closer_than_the_tiny_gpt(files, llama_runs, tokens):
    """The two copied differences are what separate llama.cpp from qlab: leaving them out is several times worse."""
    for q in ("F32", "Q8_0", "Q4_0", "Q4_K"):
        with torch.no_grad():
            plain = load_gguf(files[q])(tokens[None])[0]
            copied = ggml_reference(files[q], q)(tokens[None])[0]
        got = llama_runs[q]["batch"]
        assert float((got - copied).abs().mean()) < float((got - plain).abs().mean()) / 2, q
