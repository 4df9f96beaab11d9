"""Checkpoints other tools load: the Tiny GPT as an AutoGPTQ 0.7.1 checkpoint or a llama.cpp GGUF file, and back.

AutoGPTQ (https://github.com/AutoGPTQ/AutoGPTQ) stores a GPTQ model as a Hugging Face GPT-2 whose block
linears are replaced by packed integer buffers (the "v1" / "gptq" checkpoint format of its
`qlinear_cuda.py` and `qlinear_cuda_old.py`). A checkpoint is a directory:

    config.json            the transformers GPT2Config (model_type "gpt2") + "quantization_config"
    quantize_config.json   bits, group_size (-1: one group per row), damp_percent, desc_act, static_groups,
                           sym, true_sequential, model_name_or_path, model_file_base_name, is_marlin_format,
                           quant_method "gptq"
    model.safetensors      the float tensors in fp16 (embeddings, LayerNorms, lm_head) and, for every block
                           linear transformer.h.{i}.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}:

For a linear with in_features K, out_features N, b bits and G = ceil(K / group_size) groups:

    | name    | shape        | dtype | content                                                       |
    |---------|--------------|-------|---------------------------------------------------------------|
    | qweight | [K*b/32, N]  | int32 | unsigned codes q[k, n] in [0, 2^b - 1], packed along K        |
    | qzeros  | [G, N*b/32]  | int32 | zero points MINUS ONE, packed along N                         |
    | scales  | [G, N]       | fp16  | one scale per (group, output)                                 |
    | g_idx   | [K]          | int32 | group of input k (k // group_size unless act order)           |
    | bias    | [N]          | fp16  |                                                               |

    W[n, k] = scales[g, n] * (q[k, n] - (qzeros_unpacked[g, n] + 1)),   g = g_idx[k]

Packing (`pack_gptq`): each run of 32 consecutive values is one little-endian stream of b int32 words, value
i at bit b*i. For 2, 4 and 8 bits no value straddles a word (4 bits: input row 8r+j sits at bits 4j..4j+3 of
qweight[r]); for 3 bits, 32 values fill 3 words and values 10 and 21 straddle word boundaries.

qlab's QTensor is the source of truth: its codes, scale, zero_point and g_idx are rewritten in AutoGPTQ's
unsigned convention. qlab's symmetric codes are signed (GPTQ's q - 2^(b-1), no zero points), so they are
stored as code + 2^(b-1) with zero 2^(b-1) (8 for 4 bits, stored as 7). Asymmetric codes keep their zero
points; because of the "- 1", a zero point of 0 would be stored as -1, which corrupts the neighbouring
packed fields (and AutoGPTQ's kernels do not undo it), so such a model is refused. GPT-2's block linears
are transformers Conv1D modules (weight [in, out]); AutoGPTQ's QuantLinear for them uses the same
(in_features=K, out_features=N) buffers as for an nn.Linear, so nothing extra is transposed.

    ql.quantize_(model, ql.GPTQConfig(qtype=ql.uint4, group_size=128, symmetric=True), calib_data=batches)
    ql.export.save_autogptq(model, "tiny-gpt-4bit")       # AutoGPTQForCausalLM.from_quantized loads it
    model = ql.export.load_autogptq("tiny-gpt-4bit")      # a TinyGPT with WeightOnlyLinear layers

GGUF (llama.cpp's file, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one little-endian file:
"GGUF", version 3, typed key-value metadata, a table of tensor infos (name, shape innermost-first, ggml type,
offset), then the tensor data, each tensor aligned to 32 bytes. `save_gguf(model, path, qtype)` writes a float
Tiny GPT (with gguf's GGUFWriter) in llama.cpp's GPT-2 architecture "gpt2"; the block formats are qlab.gguf's:

    metadata   general.architecture "gpt2", general.name, general.file_type (gguf.LlamaFileType; all-Q4_K is
               MOSTLY_Q4_K_S), general.quantization_version 2, gpt2.context_length (block_size),
               gpt2.embedding_length, gpt2.feed_forward_length (4 n_embd), gpt2.block_count,
               gpt2.attention.head_count, gpt2.attention.layer_norm_epsilon, gpt2.vocab_size (256)
    tokenizer  tokenizer.ggml.model "gpt2" (byte-level BPE), tokenizer.ggml.pre "gpt-2",
               tokenizer.ggml.tokens: the 256 bytes in GPT-2's byte-to-unicode spelling, token i = byte i
               (space "Ġ", newline "Ċ"; `gpt2_byte_tokens`), token_type all NORMAL (1), merges EMPTY (a
               byte vocabulary merges nothing; llama.cpp refuses a "gpt2" vocabulary without the key and
               gguf's writer refuses empty arrays, so a small writer subclass writes it), bos = eos = 0,
               add_bos_token = add_eos_token = false (below)

    TinyGPT (C = n_embd)     GGUF tensor                    ggml ne (innermost first)   type
    wte.weight               token_embd.weight              [C, 256]                    F32
    wpe.weight               position_embd.weight           [C, block_size]             F32
    blocks.i.ln_1.w / .b     blk.i.attn_norm.weight / .bias [C]                         F32
    blocks.i.attn.c_attn     blk.i.attn_qkv.weight  / .bias [C, 3C] / [3C]              qtype / F32
    blocks.i.attn.c_proj     blk.i.attn_output.weight/.bias [C, C] / [C]                qtype / F32
    blocks.i.ln_2.w / .b     blk.i.ffn_norm.weight / .bias  [C]                         F32
    blocks.i.mlp.c_fc        blk.i.ffn_up.weight / .bias    [C, 4C] / [4C]              qtype / F32
    blocks.i.mlp.c_proj      blk.i.ffn_down.weight / .bias  [4C, C] / [C]               qtype / F32
    ln_f.w / .b              output_norm.weight / .bias     [C]                         F32
    lm_head.weight (tied)    output.weight                  [C, 256]                    F32, a copy of token_embd

Orientation: llama.cpp computes a linear as ggml_mul_mat(W, x) with W's ne = [in, out]: each stored row is the
in_features of one output, which is PyTorch's nn.Linear weight (out, in) exactly as it is (numpy/gguf-py
shape (out, in)); a quantization block runs along those rows. Hugging Face GPT-2's Conv1D weights are
(in, out), their transpose (llama.cpp's convert_hf_to_gguf.py transposes these four for GPT-2). Only the
block linears are quantized; embeddings, norms and biases stay F32 (llama.cpp keeps 1-D tensors in F32 too).
llama.cpp's GPT-2 loader has required `output.weight` (newer versions fall back to token_embd), so the tied
head is written as a copy, as its converter does: 256 KiB more.

Choices llama.cpp sees: the Tiny GPT has no special tokens (it reads raw bytes from position 0). Without
bos/eos ids llama.cpp gives a "gpt2" vocabulary 11 (here a vertical tab), so save_gguf names byte 0 (NUL,
which UTF-8 text never holds) with add_bos_token false: nothing is prepended, and generation stops at the
length limit. Where llama.cpp will differ from qlab: its GPT-2 MLP uses ggml_gelu, the tanh approximation
(GPT-2's gelu_new), while the Tiny GPT uses exact GELU (swapping it in moves bits/byte on the first 4096
validation bytes by -0.0001 in float32); and position_embd has block_size = 128 rows, so run llama.cpp with
a context of at most 128 (-c 128). `load_gguf(path)` reads such a file back (its own `read_gguf`, struct
only) into a float TinyGPT whose block weights are the dequantized blocks. llama.cpp itself loads every type
save_gguf writes, with the same logits as qlab's model of the file (interop/tests/test_llama_cpp.py, run by
`make interop` in the environment where llama-cpp-python is built).

    ql.export.save_gguf(ql.models.tiny_gpt(), "tiny-gpt-q4_0.gguf", qtype="Q4_0")   # llama.cpp's GPT-2
    model = ql.export.load_gguf("tiny-gpt-q4_0.gguf")                             # a float TinyGPT again

ONNX (the last section of this file): `to_onnx` writes a W8A8 model (QuantLinear / QuantConv2d layers) as a QDQ
graph, QuantizeLinear / DequantizeLinear nodes holding qlab's own codes, scales and zero points; ONNX Runtime runs
it, and `ort_quantize` / `onnx_comparison` put ONNX Runtime's own quantizers beside it.

    ql.export.to_onnx(w8a8_cnn, "cnn-w8a8.onnx", x[:1])   # the example's dim 0 (batch) stays dynamic
    logits = ql.export.run_onnx("cnn-w8a8.onnx", x)       # ONNX Runtime on the CPU
"""

from __future__ import annotations

import copy
import json
import math
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .core.granularity import PerChannel, PerGroup
from .core.qtensor import QTensor, from_codes
from .core.qtypes import qtype as make_qtype
from .models.tiny_gpt import HF_GPT2_CONV1D, TinyGPT, config_from_hf_gpt2, hf_gpt2_config, hf_gpt2_name
from .nn import Int4WeightOnlyLinear, WeightOnlyLinear
from .gguf import GGML_TYPE_IDS, QTYPES, TYPE_SIZES
from .gguf import dequantize as dequantize_blocks
from .gguf import quantize as quantize_blocks
from .models.tiny_gpt import GPTConfig
from .core.granularity import PerTensor, PerToken
from .kernels.reference import ActQuant, quantize_activations
from .nn import QuantConv2d, QuantLinear

AUTOGPTQ_BITS = (2, 3, 4, 8)


# ----------------------------------------------------------------------------- 1) packing
def _check_bits(bits: int) -> None:
    if bits not in AUTOGPTQ_BITS:
        raise ValueError(f"AutoGPTQ checkpoints hold {AUTOGPTQ_BITS}-bit codes, got {bits} bits; quantize with one "
                         "of those (e.g. ql.GPTQConfig(qtype=ql.uint4))")


def _bit_slots(bits: int) -> list[tuple[int, int, int]]:
    """(value i, word, offset) for the 32 values of one packed run: value i at bit bits*i of the stream."""
    return [(i, *divmod(bits * i, 32)) for i in range(32)]


def pack_gptq(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (L, C) along dim 0 into int32 (L*bits/32, C), AutoGPTQ's order (module docstring)."""
    _check_bits(bits)
    L, C = codes.shape
    if L % 32:
        raise ValueError(f"AutoGPTQ packs runs of 32 values; the packed dimension has {L}, not a multiple of 32")
    v = codes.to(torch.int64).reshape(L // 32, 32, C)  # (R, 32, C): one run of 32 values per R
    if bool((v < 0).any()) or bool((v >= 2**bits).any()):
        raise ValueError(f"codes in [{int(v.min())}, {int(v.max())}] do not fit unsigned {bits}-bit fields")
    words = torch.zeros(L // 32, bits, C, dtype=torch.int64)  # (R, bits, C)
    for i, w, o in _bit_slots(bits):
        words[:, w] |= (v[:, i] << o) & 0xFFFFFFFF
        if o + bits > 32:  # straddles into the next word (3 bits only)
            words[:, w + 1] |= v[:, i] >> (32 - o)
    words = words.reshape(L * bits // 32, C)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # uint32 bits as int32


def unpack_gptq(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_gptq`: int32 (L*bits/32, C) -> unsigned codes (L, C) int32."""
    _check_bits(bits)
    P, C = packed.shape
    if P % bits:
        raise ValueError(f"{P} packed rows are not whole runs of {bits} words (32 values of {bits} bits)")
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(P // bits, bits, C)  # (R, bits, C)
    out = torch.zeros(P // bits, 32, C, dtype=torch.int64)
    for i, w, o in _bit_slots(bits):
        v = words[:, w] >> o
        if o + bits > 32:
            v = v | (words[:, w + 1] << (32 - o))
        out[:, i] = v & (2**bits - 1)
    return out.reshape(P * 32 // bits, C).to(torch.int32)


# ----------------------------------------------------------------------------- 2) one layer <-> QTensor
def _group_size(qt: QTensor) -> int:
    """qlab's group size of a weight-only QTensor (K for one group per row)."""
    K = qt.shape[1]
    if isinstance(qt.granularity, PerGroup):
        return qt.granularity.group_size
    if qt.granularity == PerChannel(0):
        return K
    raise ValueError(f"AutoGPTQ stores group-wise or per-output-channel scales, got {qt.granularity}")


def _offset(qt: QTensor) -> int:
    """What turns qlab's codes and zero points into AutoGPTQ's unsigned ones: 2^(b-1) for signed codes."""
    return 2 ** (qt.qtype.bits - 1) if qt.qtype.signed else 0


def autogptq_zero_points(qt: QTensor) -> torch.Tensor:
    """The (N, G) zero points AutoGPTQ's formula uses (before the "- 1"): 2^(b-1) for symmetric codes."""
    return qt.zero_point.to(torch.int32).reshape(qt.shape[0], -1) + _offset(qt)


def qtensor_to_autogptq(qt: QTensor) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one (N, K) weight QTensor, in AutoGPTQ's unsigned convention.

    A zero point of 0 is stored as -1 masked to b bits (what AutoGPTQ's cuda_old CPU path reads back as 0,
    but its other kernels do not); save_autogptq refuses such models."""
    bits, (N, K) = qt.qtype.bits, qt.shape
    _check_bits(bits)
    if K % 32 or N % 32:
        raise ValueError(f"AutoGPTQ packs runs of 32 values along in_features and out_features; a ({N}, {K}) weight "
                         "needs both to be multiples of 32")
    gs = _group_size(qt)
    q = qt.int_repr().to(torch.int32) + _offset(qt)  # (N, K) in [0, 2^b - 1]
    scale = qt.scale_values().float().reshape(N, -1)  # (N, G)
    zero = autogptq_zero_points(qt)  # (N, G)
    G = scale.shape[1]
    if G != math.ceil(K / gs):
        raise ValueError(f"{G} scale groups for in_features={K} and group_size={gs}")
    if bool((zero > 2**bits - 1).any()) or bool((zero < 0).any()):
        raise ValueError(f"zero points outside [0, {2**bits - 1}] cannot be stored in {bits} bits")
    g_idx = qt.g_idx if qt.g_idx is not None else torch.arange(K) // gs
    return {"qweight": pack_gptq(q.t(), bits),  # (K*b/32, N): packed along the inputs
            "qzeros": pack_gptq((zero - 1) & (2**bits - 1), bits).t().contiguous(),  # (G, N*b/32): zero - 1
            "scales": scale.t().contiguous().half(),  # (G, N)
            "g_idx": g_idx.to(torch.int32).contiguous()}


def qtensor_from_autogptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> QTensor:
    """The QTensor of one layer's qweight, qzeros, scales, g_idx. Symmetric layers (sym and every zero point
    2^(b-1)) become signed codes with symmetric=True; g_idx is kept only if it is not k // group_size."""
    _check_bits(bits)
    q = unpack_gptq(tensors["qweight"], bits).t().contiguous()  # (N, K) unsigned codes
    N, K = q.shape
    gs = K if group_size == -1 else group_size
    if K % gs:
        raise ValueError(f"group_size={group_size} does not divide in_features={K}; qlab needs whole groups")
    zero = (unpack_gptq(tensors["qzeros"].t(), bits) + 1) & (2**bits - 1)  # (N, G): undo the "- 1"
    scale = tensors["scales"].float().t().contiguous()  # (N, G)
    if scale.shape != (N, K // gs) or zero.shape != scale.shape:
        raise ValueError(f"scales {tuple(tensors['scales'].shape)} / qzeros do not fit a ({K}, {N}) qweight with "
                         f"group_size={group_size}")
    g_idx = tensors.get("g_idx")
    if g_idx is not None and torch.equal(g_idx.long(), torch.arange(K) // gs):
        g_idx = None  # the default order: nothing to store
    g_idx = None if g_idx is None else g_idx.to(torch.int32)
    mid = 2 ** (bits - 1)
    if sym and bool((zero == mid).all()):
        return from_codes(q - mid, scale, None, make_qtype(bits, signed=True), PerGroup(gs), True, g_idx=g_idx)
    return from_codes(q, scale, zero, make_qtype(bits, signed=False), PerGroup(gs), False, g_idx=g_idx)


# ----------------------------------------------------------------------------- 3) whole model
def _block_linears(model: TinyGPT) -> dict[str, nn.Module]:
    """TinyGPT name -> module of every block linear AutoGPTQ quantizes (blocks.{i}.attn.c_attn, ...)."""
    return {f"blocks.{i}.{c}": model.blocks[i].get_submodule(c) for i in range(len(model.blocks)) for c in HF_GPT2_CONV1D}


def _quantize_config(bits: int, group_size: int, desc_act: bool, sym: bool, damp: float, true_sequential: bool,
                     model_name_or_path: str) -> dict:
    return {"bits": bits, "group_size": group_size, "damp_percent": damp, "desc_act": desc_act,
            "static_groups": False, "sym": sym, "true_sequential": true_sequential,
            "model_name_or_path": model_name_or_path, "model_file_base_name": "model", "is_marlin_format": False,
            "quant_method": "gptq"}


@torch.no_grad()
def save_autogptq(model: TinyGPT, path: str | Path, *, model_name_or_path: str = "qlab-tiny-gpt", damp: float = 0.01,
                  true_sequential: bool = True) -> Path:
    """Write a weight-only quantized TinyGPT as an AutoGPTQ 0.7.1 checkpoint directory; returns the path.

    Args:
        model: a TinyGPT whose block linears are all qlab WeightOnlyLinear modules of one width (2, 3, 4 or
            8 bits) and group size, as `ql.quantize_(model, ql.GPTQConfig(...), calib_data=...)` leaves it
            (or ql.RTNConfig(include=("blocks.*",))); lm_head stays float, tied to wte.
        path: the directory (created; files in it are overwritten).
        model_name_or_path, damp, true_sequential: recorded in quantize_config.json (damp as damp_percent).
    """
    # 1) what can be exported
    if not isinstance(model, TinyGPT):
        raise ValueError(f"save_autogptq writes a qlab TinyGPT (ql.models.tiny_gpt()), got {type(model).__name__}")
    linears = _block_linears(model)
    float_left = [n for n, m in linears.items() if not isinstance(m, WeightOnlyLinear)]
    if float_left:
        raise ValueError(f"AutoGPTQ checkpoints quantize every block linear, but {float_left} are not quantized "
                         f"({type(linears[float_left[0]]).__name__}); run ql.quantize_(model, ql.GPTQConfig(...), "
                         "calib_data=...) on the whole model first")
    if type(model.lm_head) is not nn.Linear or model.lm_head.weight is not model.wte.weight:
        raise ValueError("AutoGPTQ keeps lm_head in float and tied to wte, but this model's lm_head is "
                         f"{type(model.lm_head).__name__}; quantize only the blocks, e.g. include=('blocks.*',)")
    qts = {n: m.qweight() for n, m in linears.items()}
    # 2) one width and one group size (AutoGPTQ has one quantize_config for the whole model)
    bits = {n: qt.qtype.bits for n, qt in qts.items()}
    if len(set(bits.values())) > 1:
        raise ValueError(f"AutoGPTQ needs one bit width for every layer, got mixed bits {bits}")
    bits = next(iter(bits.values()))
    _check_bits(bits)
    sizes = {n: _group_size(qt) for n, qt in qts.items()}
    per_row = all(gs == qt.shape[1] for gs, qt in zip(sizes.values(), qts.values()))
    if not per_row and len(set(sizes.values())) > 1:
        raise ValueError(f"AutoGPTQ needs one group size for every layer, got mixed group sizes {sizes}")
    group_size = -1 if per_row else next(iter(sizes.values()))
    # 3) asymmetric zero points survive the "- 1" only if none is 0
    asym = [n for n, qt in qts.items() if not qt.symmetric]
    zero0 = [n for n in asym if bool((autogptq_zero_points(qts[n]) == 0).any())]
    if zero0:
        raise ValueError(f"{zero0[:3]} have zero points equal to 0. AutoGPTQ's v1 format stores zero - 1, so 0 becomes "
                         "-1, which corrupts the neighbouring packed zero points and is not undone by its kernels. "
                         "Quantize with symmetric=True (zero 2^(bits-1), the portable AutoGPTQ format), e.g. "
                         "ql.GPTQConfig(qtype=ql.uint4, group_size=128, symmetric=True)")
    if asym:
        warnings.warn(f"exporting asymmetric zero points ({len(asym)} layers): AutoGPTQ v1 checkpoints store zero - 1, "
                      "which some loaders mishandle (exllama and GPTQModel's v2 format differ); symmetric=True is the "
                      "portable choice", stacklevel=2)
    # 4) the tensors: float parts in fp16 under GPT-2 names, packed buffers for the block linears
    tensors = {}
    for name, t in model.state_dict().items():
        if not name.startswith(tuple(f"{n}." for n in linears)):
            tensors[hf_gpt2_name(name)] = t.detach().half().contiguous().clone()  # lm_head too, as AutoGPTQ saves it
    for name, qt in qts.items():
        hf = hf_gpt2_name(name)
        tensors.update({f"{hf}.{k}": v for k, v in qtensor_to_autogptq(qt).items()})
        bias = linears[name].bias
        tensors[f"{hf}.bias"] = (torch.zeros(qt.shape[0]) if bias is None else bias).half().contiguous()  # AutoGPTQ always has one
    desc_act = any(m.weight_g_idx is not None for m in linears.values())
    qconfig = _quantize_config(bits, group_size, desc_act, not asym, damp, true_sequential, model_name_or_path)
    # 5) the files
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **hf_gpt2_config(model.config),
                 "torch_dtype": "float16", "quantization_config": qconfig}
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    (path / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
    meta = {"format": "pt", "gptq_bits": str(bits), "gptq_group_size": str(group_size), "gptq_desc_act": str(desc_act),
            "gptq_damp_percent": str(damp), "gptq_is_marlin_format": "False", "writer": "qlab"}
    save_file(tensors, str(path / "model.safetensors"), metadata=meta)
    return path


def _checkpoint_file(path: Path, qconfig: dict) -> Path:
    """The safetensors file: model_file_base_name's, else the only *.safetensors in the directory."""
    base = qconfig.get("model_file_base_name")
    if base and (path / f"{base}.safetensors").exists():
        return path / f"{base}.safetensors"
    if list(path.glob("*.safetensors.index.json")):
        raise ValueError(f"{path} holds a sharded checkpoint; load_autogptq reads a single .safetensors file")
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .safetensors file in {path} (e.g. model.safetensors or "
                                f"gptq_model-4bit-128g.safetensors), found {[f.name for f in files]}")
    return files[0]


@torch.no_grad()
def load_autogptq(path: str | Path) -> TinyGPT:
    """Read an AutoGPTQ GPT-2 checkpoint (qlab's or AutoGPTQ's own) as a TinyGPT in eval mode, float32, whose
    block linears are Int4WeightOnlyLinear (4 bits) or WeightOnlyLinear modules built from the stored codes."""
    from safetensors.torch import load_file

    # 1) configs
    path = Path(path)
    for f in ("config.json", "quantize_config.json"):
        if not (path / f).exists():
            raise FileNotFoundError(f"{path / f} is missing: an AutoGPTQ checkpoint directory has config.json, "
                                    "quantize_config.json and a .safetensors file")
    cfg = config_from_hf_gpt2(json.loads((path / "config.json").read_text()))
    qconfig = json.loads((path / "quantize_config.json").read_text())
    if qconfig.get("is_marlin_format") or qconfig.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError("load_autogptq reads the GPTQ v1 format; this checkpoint is Marlin/AWQ/v2 (repack it first)")
    bits, group_size, sym = qconfig["bits"], qconfig["group_size"], qconfig.get("sym", True)
    # 2) tensors
    state = load_file(str(_checkpoint_file(path, qconfig)))
    model = TinyGPT(cfg)
    linears = _block_linears(model)
    want = {hf_gpt2_name(n): n for n in model.state_dict() if not n.startswith(tuple(f"{m}." for m in linears))}
    want.pop("lm_head.weight")  # tied to wte
    missing = [k for k in want if k not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:4]}: not a GPT-2 of this shape")
    model.load_state_dict({n: state[k].float() for k, n in want.items()}, strict=False)
    # 3) the quantized block linears
    for name in linears:
        hf = hf_gpt2_name(name)
        parts = {k: state.get(f"{hf}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        if any(parts[k] is None for k in ("qweight", "qzeros", "scales")):
            raise ValueError(f"{hf} has no qweight/qzeros/scales: load_autogptq needs every block linear quantized")
        qt = qtensor_from_autogptq(parts, bits, group_size, sym)
        bias = None if parts["bias"] is None else parts["bias"].float()
        cls = Int4WeightOnlyLinear if bits == 4 else WeightOnlyLinear
        model.set_submodule(name, cls.from_qtensor(qt, bias))
    return model.eval()


# ============================================================================= GGUF: llama.cpp's GPT-2
# ----------------------------------------------------------------------------- 4) names, tokens, types
GGUF_ARCH = "gpt2"
# TinyGPT module -> llama.cpp's GPT-2 tensor (gguf.constants.TENSOR_NAMES of MODEL_ARCH.GPT2); "blk.{i}." in blocks
GGUF_GPT2_NAMES: MappingProxyType[str, str] = MappingProxyType({
    "wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "lm_head": "output",
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
})
GGUF_FLOAT_TYPES = ("F32", "F16")  # block weights kept as floats: any row length
# qtype -> gguf.LlamaFileType member written as general.file_type (all-Q4_K is closest to llama.cpp's Q4_K_S)
GGUF_FILE_TYPES: MappingProxyType[str, str] = MappingProxyType({
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_K": "MOSTLY_Q4_K_S", "Q6_K": "MOSTLY_Q6_K",
})
GGUF_BOS_EOS_ID = 0  # NUL: the Tiny GPT has no special tokens, and UTF-8 text never holds this byte
_GGML_TYPE_NAMES = {0: "F32", 1: "F16", **{i: name for name, i in GGML_TYPE_IDS.items()}}  # ggml_type -> name


def gguf_gpt2_name(name: str) -> str:
    """TinyGPT's parameter name -> llama.cpp's GPT-2 tensor name, e.g. blocks.0.attn.c_attn.weight ->
    blk.0.attn_qkv.weight, wte.weight -> token_embd.weight, lm_head.weight -> output.weight."""
    module, _, kind = name.rpartition(".")  # kind: weight or bias
    if module.startswith("blocks."):
        _, i, inner = module.split(".", 2)
        return f"blk.{i}.{GGUF_GPT2_NAMES[inner]}.{kind}"
    return f"{GGUF_GPT2_NAMES[module]}.{kind}"


def gpt2_byte_tokens() -> list[str]:
    """The 256 byte tokens in GPT-2's byte-to-unicode spelling: token i spells byte i.

    GPT-2's BPE runs on text where every byte is one visible character: the 188 printable Latin-1 bytes
    ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the other 68 (controls, space, DEL..NBSP, soft
    hyphen) become chr(256), chr(257), ... in byte order, so space (32) is 'Ġ' (U+0120) and newline 'Ċ'."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def _check_gguf_qtype(qtype: str) -> None:
    known = (*GGUF_FLOAT_TYPES, *QTYPES)
    if qtype not in known:
        hint = f" (did you mean {qtype.upper()!r}?)" if isinstance(qtype, str) and qtype.upper() in known else ""
        raise ValueError(f"qtype={qtype!r} is not a GGUF type save_gguf writes{hint}; use one of {known}")


def _check_gguf_rows(weights: dict[str, torch.Tensor], qtype: str) -> None:
    """Every weight's row (in_features) must be whole blocks of `qtype`; the error names the first that is not."""
    if qtype in GGUF_FLOAT_TYPES:
        return
    block = TYPE_SIZES[qtype][0]
    for name, w in weights.items():
        k = w.shape[1]
        if k % block:
            fits = [t for t in QTYPES if k % TYPE_SIZES[t][0] == 0]
            alt = (f"use a type with smaller blocks ({', '.join(fits)}) or keep the blocks in F16/F32" if fits else
                   f"no GGUF block type divides {k}: keep the blocks in F16/F32 (qtype='F32')")
            raise ValueError(f"{gguf_gpt2_name(name + '.weight')} ({name}) has rows of in_features={k} values, not a "
                             f"multiple of {qtype}'s block of {block} (llama.cpp quantizes whole blocks along each "
                             f"row); {alt}")


def _import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("save_gguf writes with llama.cpp's own Python writer: pip install gguf==0.19.0") from err
    return gguf


def _gguf_writer(gguf, path: Path):
    """gguf's GGUFWriter, except that it writes an empty array whose element type is given.

    gguf 0.19.0 refuses every empty array (it takes the element type from the first element), but a
    byte-level vocabulary has no merges, and llama.cpp refuses a "gpt2" vocabulary without the merges key."""

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)  # element type, count 0
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(path, GGUF_ARCH)


# ----------------------------------------------------------------------------- 5) write
@torch.no_grad()
def save_gguf(model: TinyGPT, path: str | Path, qtype: str = "Q4_0", *, name: str = "qlab-tiny-gpt") -> Path:
    """Write a float TinyGPT as a llama.cpp GGUF file (architecture "gpt2"); returns the path.

    Args:
        model: a float TinyGPT (ql.models.tiny_gpt()), any float dtype; its byte vocabulary of 256 and tied
            LM head as built. save_gguf quantizes the block linears itself, with ql.gguf.quantize.
        path: the file to write (overwritten).
        qtype: the block linears' GGUF type: "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K" (rows of
            in_features must be whole blocks: 32, or 256 for the K-quants), or "F16" / "F32".
        name: general.name.
    The names, shapes, metadata and tokenizer are in the module docstring; everything but the block linear
    weights is stored in F32.
    """
    # 1) what can be exported
    if not isinstance(model, TinyGPT):
        raise ValueError(f"save_gguf writes a qlab TinyGPT (ql.models.tiny_gpt()), got {type(model).__name__}")
    _check_gguf_qtype(qtype)
    cfg, linears = model.config, _block_linears(model)
    not_float = [n for n, m in linears.items() if type(m) is not nn.Linear]
    if not_float or type(model.lm_head) is not nn.Linear:
        first = not_float[0] if not_float else "lm_head"
        raise ValueError(f"save_gguf quantizes the float weights itself into GGUF blocks, but {first} is "
                         f"{type(model.get_submodule(first)).__name__}, not a float nn.Linear; pass the float model "
                         "(ql.models.tiny_gpt()) and choose the format with qtype=...")
    if model.lm_head.weight is not model.wte.weight or cfg.vocab_size != 256:
        raise ValueError("the GGUF byte tokenizer needs the Tiny GPT's 256-byte vocabulary with lm_head tied to wte")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"GGUF's gpt2.attention.layer_norm_epsilon is one value, the LayerNorms have {sorted(eps)}")
    _check_gguf_rows({n: m.weight for n, m in linears.items()}, qtype)
    # 2) metadata: the architecture's hyper-parameters
    gguf = _import_gguf()
    path = Path(path)
    writer = _gguf_writer(gguf, path)  # writes general.architecture = "gpt2"
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[GGUF_FILE_TYPES[qtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(eps.pop())
    writer.add_vocab_size(cfg.vocab_size)
    # 3) the tokenizer: 256 byte tokens and no merges
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(gpt2_byte_tokens())
    writer.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    writer.add_bos_token_id(GGUF_BOS_EOS_ID)
    writer.add_eos_token_id(GGUF_BOS_EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    # 4) the tensors: block linear weights (out, in) as qtype blocks along in, everything else F32
    block_weights = {f"{n}.weight" for n in linears}
    tensors = dict(model.state_dict())  # wte, wpe, blocks.*, ln_f, lm_head (the tied copy: output.weight)
    tensors.update({f"{n}.bias": torch.zeros(m.out_features) for n, m in linears.items() if m.bias is None})
    for param, t in tensors.items():
        t = t.detach().float().contiguous()
        if param in block_weights and qtype in QTYPES:
            raw = quantize_blocks(t, qtype)  # (out, row bytes) uint8, exactly the file's bytes
            writer.add_tensor(gguf_gpt2_name(param), raw.numpy(), raw_dtype=gguf.GGMLQuantizationType[qtype])
        elif param in block_weights and qtype == "F16":
            writer.add_tensor(gguf_gpt2_name(param), t.half().numpy())
        else:
            writer.add_tensor(gguf_gpt2_name(param), t.numpy())  # float32 -> F32
    # 5) the file
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- 6) read
class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file: its ggml type name ("F32", "F16", "Q4_0", ...), its shape in PyTorch's
    order (the file's ne reversed: (out, in) for a linear), and its raw bytes (uint8, flat)."""

    type: str
    shape: tuple[int, ...]
    data: torch.Tensor


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFCursor:
    """Reads GGUF's little-endian values front to back: a string is a u64 length and UTF-8 bytes; an array
    an element type u32, a count u64 and the elements."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string past the end of the file")
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            item_type, count = self.take("I"), self.take("Q")
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _GGUF_SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.take(_GGUF_SCALARS[vtype])


def _gguf_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if type_name in GGUF_FLOAT_TYPES:
        return n * (4 if type_name == "F32" else 2)
    block_size, type_size = TYPE_SIZES[type_name]
    return n // block_size * type_size


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """The metadata and tensors of a little-endian GGUF file (version 2 or 3), parsed with struct.

    Layout: "GGUF" | version u32 | n_tensors u64 | n_kv u64 | n_kv x (key string, value type u32, value) |
    n_tensors x (name string, n_dims u32, ne u64 x n_dims innermost first, ggml type u32, offset u64) |
    zero padding to general.alignment (32) | the data, each tensor at its offset from there.
    Returns: ({key: int | float | bool | str | list}, {name: GGUFTensor}) in file order.
    """
    path = Path(path)
    buf = path.read_bytes()
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {buf[:4]!r}, not b'GGUF'")
    r = _GGUFCursor(buf, 4)
    try:
        version = r.take("I")
        if version not in (2, 3):
            raise ValueError(f"{path} is GGUF version {version}; read_gguf reads versions 2 and 3, little-endian")
        n_tensors, n_kv = r.take("Q"), r.take("Q")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            ne = [r.take("Q") for _ in range(r.take("I"))]
            infos.append((name, tuple(reversed(ne)), r.take("I"), r.take("Q")))  # shape in PyTorch's order
    except struct.error as err:
        raise ValueError(f"{path} ends inside its GGUF header: the file is truncated") from err
    alignment = metadata.get("general.alignment", 32)
    start = -(-r.pos // alignment) * alignment  # the data section begins at the next multiple of the alignment
    tensors = {}
    for name, shape, type_id, offset in infos:
        if type_id not in _GGML_TYPE_NAMES:
            raise ValueError(f"tensor {name} has ggml type {type_id}; read_gguf reads "
                             f"{sorted(_GGML_TYPE_NAMES.values())}")
        type_name = _GGML_TYPE_NAMES[type_id]
        begin, end = start + offset, start + offset + _gguf_nbytes(type_name, shape)
        if end > len(buf):
            raise ValueError(f"{path} ends inside tensor {name}: the file is truncated")
        tensors[name] = GGUFTensor(type_name, shape, torch.frombuffer(bytearray(buf[begin:end]), dtype=torch.uint8))
    return metadata, tensors


def gguf_tensor_values(t: GGUFTensor) -> torch.Tensor:
    """The float32 values of a GGUF tensor, in t.shape: F32 as stored, F16 widened, blocks dequantized."""
    if t.type == "F32":
        return t.data.view(torch.float32).reshape(t.shape).clone()
    if t.type == "F16":
        return t.data.view(torch.float16).float().reshape(t.shape)
    return dequantize_blocks(t.data, t.type, t.shape)


@torch.no_grad()
def load_gguf(path: str | Path) -> TinyGPT:
    """Read a GPT-2 GGUF file with the 256-byte vocabulary (what save_gguf writes) as a float32 TinyGPT in eval
    mode: block weights dequantized with ql.gguf.dequantize, everything else as stored (F32 or F16). GGUF keeps
    no training settings: the config's dropout is 0."""
    # 1) the architecture
    meta, tensors = read_gguf(path)
    if meta.get("general.architecture") != GGUF_ARCH:
        raise ValueError(f"general.architecture={meta.get('general.architecture')!r}: TinyGPT is llama.cpp's 'gpt2'")
    keys = ["context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
            "attention.layer_norm_epsilon"]
    missing = [f"gpt2.{k}" for k in keys if f"gpt2.{k}" not in meta]
    if missing:
        raise ValueError(f"{path} lacks the GPT-2 hyper-parameters {missing}")
    tokens = meta.get("tokenizer.ggml.tokens", [])
    if tokens != gpt2_byte_tokens():
        raise ValueError(f"TinyGPT reads bytes: it needs tokenizer.ggml.tokens to be the 256 bytes in GPT-2's "
                         f"spelling (token i = byte i), this file has {len(tokens)} other tokens")
    n_embd = meta["gpt2.embedding_length"]
    if meta["gpt2.feed_forward_length"] != 4 * n_embd:
        raise ValueError(f"gpt2.feed_forward_length={meta['gpt2.feed_forward_length']}: TinyGPT's MLP is 4 * n_embd "
                         f"= {4 * n_embd}")
    cfg = GPTConfig(vocab_size=256, block_size=meta["gpt2.context_length"], n_layer=meta["gpt2.block_count"],
                    n_head=meta["gpt2.attention.head_count"], n_embd=n_embd)
    model = TinyGPT(cfg)
    eps = meta["gpt2.attention.layer_norm_epsilon"]  # a float32: 1e-5 reads back as 9.99999975e-06
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and struct.unpack("<f", struct.pack("<f", m.eps))[0] != eps:
            m.eps = eps  # only if the file's value is not nn.LayerNorm's own eps rounded to float32
    # 2) the tensors, by llama.cpp's names; the LM head is tied to token_embd
    state, used = {}, {"output.weight"}
    for param, p in model.state_dict().items():
        if param == "lm_head.weight":
            continue
        g = gguf_gpt2_name(param)
        if g not in tensors:
            raise ValueError(f"{path} has no tensor {g} (TinyGPT's {param}): not a GPT-2 of this shape")
        if tensors[g].shape != tuple(p.shape):
            raise ValueError(f"{g} has shape {tensors[g].shape} (ne {tensors[g].shape[::-1]}), TinyGPT's {param} is "
                             f"{tuple(p.shape)}; ggml stores a linear (out, in) as ne = [in, out]")
        state[param] = gguf_tensor_values(tensors[g])
        used.add(g)
    unexpected = [n for n in tensors if n not in used]
    if unexpected:
        raise ValueError(f"{path} has tensors TinyGPT does not: {unexpected[:4]}")
    output = tensors.get("output.weight")
    if output is not None and not torch.equal(gguf_tensor_values(output), state["wte.weight"]):
        raise ValueError("output.weight differs from token_embd.weight (e.g. llama-quantize stored them in different "
                         "types): TinyGPT ties its LM head to the token embedding and cannot hold both")
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state)
    return model.eval()


__all__ = ["pack_gptq", "unpack_gptq", "autogptq_zero_points", "qtensor_to_autogptq", "qtensor_from_autogptq",
           "save_autogptq", "load_autogptq", "GGUF_GPT2_NAMES", "GGUF_FILE_TYPES", "gguf_gpt2_name", "gpt2_byte_tokens",
           "save_gguf", "GGUFTensor", "read_gguf", "gguf_tensor_values", "load_gguf"]


# ============================================================================= ONNX: W8A8 models with QDQ nodes
# ONNX (https://onnx.ai/onnx/operators/) writes a quantized tensor with two operators:
#
#     QuantizeLinear(x, y_scale, y_zero_point)    q = saturate(round_half_to_even(x / y_scale) + y_zero_point)
#     DequantizeLinear(q, x_scale, x_zero_point)  x = (q - x_zero_point) * x_scale
#
# with one scale (per tensor) or a 1-D scale along `axis` (per channel); saturate clamps to the code type, int8
# [-128, 127] or uint8 [0, 255]. A "QDQ model" is a float graph with such pairs wherever values are quantized.
# ONNX Runtime fuses DQ -> op -> Q groups into integer kernels where it has them (QLinearConv, QGemm, ...) and
# otherwise runs the float op on the dequantized values: the same numbers up to float rounding.
#
# to_onnx writes qlab's W8A8 layers (QuantLinear, QuantConv2d) that way, with qlab's own codes and qparams. The
# initializers keep the module's buffer names, so "conv1.act_scale" in the file is model.conv1.act_scale:
#
#     <name>.weight_q      int8 codes (N, K); (O, C, kh, kw) for a convolution (the same codes, unflattened)
#     <name>.weight_scale  (N,) per channel, or () per tensor:  W = DequantizeLinear(weight_q, weight_scale, axis=0)
#     <name>.bias, <name>.input_scale (SmoothQuant's 1/s, which multiplies x before it is quantized)
#     static:   <name>.act_scale, <name>.act_zero_point (int8 for symmetric codes, uint8 for asymmetric ones):
#               x -> QuantizeLinear -> [Clip] -> DequantizeLinear -> Gemm / MatMul / Conv with W
#     dynamic:  the scale (and zero point) are computed in the graph from each input, by qlab's rule:
#               Flatten x to (M, K); per token (one scale per row) or per tensor; ReduceMax(|x|) / qmax for
#               symmetric codes, or min / max widened to include 0 for asymmetric uint8 codes; a scale of 0 becomes
#               1 (as ql.choose_qparams does); then QuantizeLinear / DequantizeLinear along axis 0 with that
#               runtime scale. (ONNX's DynamicQuantizeLinear is per tensor, uint8 and asymmetric only: it is what
#               ONNX Runtime's quantize_dynamic uses, and it is not qlab's per-token rule.)
#
# [Clip]: qlab's symmetric codes use the restricted range [-qmax, qmax] (int8: [-127, 127]) and reduce_range's
# 7-bit codes [-63, 63] or [0, 127], where QuantizeLinear saturates to the whole int8 / uint8 range; a Clip on the
# codes keeps qlab's range exactly. So the file computes qlab's codes; only the float sums after them may round
# differently (a runtime adds the products in its own order).
#
# What ONNX Runtime makes of it: a qlab W8A8 layer returns floats (the next layer quantizes its own input), so
# there is no DQ -> op -> Q group, and ORT has no kernel for per-token activation scales. It runs the float Conv /
# MatMul on the dequantized operands (and dequantizes the weights at every call, since it cannot prepack a
# computed weight): the same accuracy as qlab, at float speed or below. ORT's own quantize_static adds a Q after
# every quantized op (the outputs are requantized) and gets its integer kernels; onnx_comparison measures both.
#
# The graph comes from torch's TorchScript-based exporter (torch.onnx.export(..., dynamo=False)): each quantized
# layer is swapped, in a copy of the model, for a module whose quantize steps are autograd Functions with an ONNX
# `symbolic`, which writes exactly the nodes above. The exporter is deprecated in torch 2.13 but exports in a
# fraction of a second and prints nothing; its replacement (dynamo=True) would take torch.library custom ops with a
# custom_translation_table, several seconds per export.

ONNX_OPSETS = (18, 19, 20)  # ReduceMax takes its axes as an input from opset 18; the TorchScript exporter stops at 20
ORT_CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
_ORT_COMPUTE_OPS = ("Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger", "Gemm", "FusedGemm", "QGemm",
                    "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                    "DynamicQuantizeMatMul")


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ImportError("ONNX export and ONNX Runtime need: pip install onnx==1.23.2 onnxruntime==1.32.0") from err
    return onnx, onnxruntime


# ----------------------------------------------------------------------------- 7) QDQ steps as ONNX nodes
def _code_range(signed: bool, bits: int) -> tuple[int, int]:
    """The codes ql.quantize allows: signed (symmetric) codes use the restricted range [-qmax, qmax]."""
    qt = make_qtype(bits, signed=signed)
    return (-qt.qmax, qt.qmax) if signed else (qt.qmin, qt.qmax)


def _constant(g, value, dtype: torch.dtype):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _clip_codes(g, q, signed: bool, bits: int):
    """Clip QuantizeLinear's codes to qlab's range where it is narrower than the int8 / uint8 type's."""
    lo, hi = _code_range(signed, bits)
    code = torch.int8 if signed else torch.uint8
    if (lo, hi) == (torch.iinfo(code).min, torch.iinfo(code).max):
        return q
    return g.op("Clip", q, _constant(g, lo, code), _constant(g, hi, code))


class _StaticQDQ(torch.autograd.Function):
    """x -> codes clamp(round(x / scale) + zero_point, lo, hi) -> (codes - zero_point) * scale, per tensor."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, signed: bool, bits: int):
        lo, hi = _code_range(signed, bits)
        z = zero_point.float()
        return ((torch.round(x / scale) + z).clamp(lo, hi) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, signed, bits):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", _clip_codes(g, q, signed, bits), scale, zero_point)


class _DynamicQDQ(torch.autograd.Function):
    """x -> qlab's dynamic activation codes (scale per token or per tensor of x as (M, K)) -> back to floats."""

    @staticmethod
    def forward(ctx, x, signed: bool, bits: int, per_token: bool):
        act = ActQuant(make_qtype(bits, signed=signed), PerToken() if per_token else PerTensor())
        q, scale, zero_point = quantize_activations(x.reshape(-1, x.shape[-1]), act)  # (M, K) and () or (M, 1)
        return ((q.float() - zero_point) * scale).reshape(x.shape)

    @staticmethod
    def symbolic(g, x, signed, bits, per_token):
        onnx, _ = _import_onnx()
        qt = make_qtype(bits, signed=signed)

        def f32(v):
            return _constant(g, v, torch.float32)

        def reduce(op, v):  # over each row (per token) or everything (per tensor); keepdims=0: (M,) or ()
            return g.op(op, v, _constant(g, [1], torch.int64), keepdims_i=0) if per_token else g.op(op, v, keepdims_i=0)

        x2 = g.op("Flatten", x, axis_i=-1)  # (M, K)
        if signed:  # 1) symmetric: scale = max |x| / qmax, zero point 0
            scale = g.op("Div", reduce("ReduceMax", g.op("Abs", x2)), f32(float(qt.qmax)))
        else:  # 1) asymmetric: the range [min, max], widened to include 0, spread over qmin..qmax
            lo = g.op("Min", reduce("ReduceMin", x2), f32(0.0))
            hi = g.op("Max", reduce("ReduceMax", x2), f32(0.0))
            scale = g.op("Div", g.op("Sub", hi, lo), f32(float(qt.qmax - qt.qmin)))
        tiny = torch.finfo(torch.float32).tiny
        scale = g.op("Where", g.op("Greater", scale, f32(tiny)), scale, f32(1.0))  # 2) an all-zero row gets scale 1
        if signed:  # 3) the zero point: zeros shaped like the scale, or round(qmin - lo / scale) clamped
            zero_point = g.op("ConstantOfShape", g.op("Shape", scale), value_t=torch.tensor([0], dtype=torch.int8))
        else:
            zero_point = g.op("Round", g.op("Sub", f32(float(qt.qmin)), g.op("Div", lo, scale)))
            zero_point = g.op("Clip", zero_point, f32(float(qt.qmin)), f32(float(qt.qmax)))
            zero_point = g.op("Cast", zero_point, to_i=onnx.TensorProto.UINT8)
        q = g.op("QuantizeLinear", x2, scale, zero_point, axis_i=0)  # 4) codes, one scale per row (or one)
        x2 = g.op("DequantizeLinear", _clip_codes(g, q, signed, bits), scale, zero_point, axis_i=0)
        return g.op("Reshape", x2, g.op("Shape", x))


class _DequantizeWeight(torch.autograd.Function):
    """int8 weight codes (N, ...) times one scale per output channel (or one scale): DequantizeLinear."""

    @staticmethod
    def forward(ctx, weight_q, weight_scale, per_channel: bool):
        scale = weight_scale.reshape(-1, *[1] * (weight_q.dim() - 1)) if per_channel else weight_scale
        return weight_q.float() * scale

    @staticmethod
    def symbolic(g, weight_q, weight_scale, per_channel):
        if per_channel:
            return g.op("DequantizeLinear", weight_q, weight_scale, axis_i=0)
        return g.op("DequantizeLinear", weight_q, weight_scale)


class _OnnxW8A8(nn.Module):
    """A QuantLinear or QuantConv2d as torch ops that export to ONNX's QDQ nodes: same buffer names, same values."""

    def __init__(self, layer: QuantLinear | QuantConv2d) -> None:
        super().__init__()
        self.conv = isinstance(layer, QuantConv2d)
        shape = (layer.out_channels, layer.in_channels, *layer.kernel_size) if self.conv else tuple(layer.weight_q.shape)
        self.signed, self.bits = layer.act_qtype.signed, layer.act_qtype.bits
        self.per_token = layer.act_granularity == PerToken()
        code = torch.int8 if self.signed else torch.uint8
        self.register_buffer("weight_q", layer.weight_q.reshape(shape).clone())  # (N, K) or (O, C, kh, kw)
        self.register_buffer("weight_scale", layer.weight_scale.clone())  # (N,) or ()
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())
        input_scale = getattr(layer, "input_scale", None)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.clone())
        static = layer.static
        self.register_buffer("act_scale", layer.act_scale.clone() if static else None)
        self.register_buffer("act_zero_point", layer.act_zero_point.to(code) if static else None)
        self.conv_args = (layer.stride, layer.padding, layer.dilation) if self.conv else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.act_scale is not None:
            x = _StaticQDQ.apply(x, self.act_scale, self.act_zero_point, self.signed, self.bits)
        else:
            x = _DynamicQDQ.apply(x, self.signed, self.bits, self.per_token)
        w = _DequantizeWeight.apply(self.weight_q, self.weight_scale, self.weight_scale.dim() == 1)
        return F.conv2d(x, w, self.bias, *self.conv_args) if self.conv else F.linear(x, w, self.bias)


def _dequantized_float(layer: QuantLinear | QuantConv2d) -> nn.Module:
    """The float nn.Linear / nn.Conv2d that holds a W8A8 layer's dequantized weight (input_scale folded in)."""
    w = layer.dequantize_weight()  # (N, K)
    if getattr(layer, "input_scale", None) is not None:
        w = w * layer.input_scale  # (x * s) @ W^T = x @ (W * s)^T
    if isinstance(layer, QuantConv2d):
        out = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, bias=layer.bias is not None)
        w = w.reshape(out.weight.shape)  # (O, C, kh, kw)
    else:
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    out.weight.data.copy_(w)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias)
    return out.eval()


def _exportable(model: nn.Module, qdq: bool) -> nn.Module:
    """A copy of model, in eval mode, whose W8A8 layers are QDQ modules (qdq=True) or dequantized float layers."""
    model = copy.deepcopy(model).eval()
    swaps: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            if qdq and isinstance(m, QuantConv2d) and not m.static:
                raise ValueError(
                    f"{name or 'the model'!r} is a QuantConv2d with dynamic activations: qlab quantizes its im2col "
                    "patches, a range ONNX's Conv input does not have. Quantize the CNN with ql.Int8StaticConfig "
                    "(calibrated per-tensor scales), or export it with qdq=False (dequantized float weights)")
            swaps[name] = _OnnxW8A8(m) if qdq else _dequantized_float(m)
        elif type(m).__module__.startswith("qlab.") and not type(m).__module__.startswith("qlab.models."):
            kind = f"{type(m).__module__}.{type(m).__name__}"
            raise ValueError(
                f"{name or 'the model'!r} is a {kind}, which to_onnx cannot write: ONNX's QuantizeLinear / "
                "DequantizeLinear hold int8/uint8 codes with one scale per tensor or per channel, and to_onnx knows "
                "qlab's W8A8 layers (QuantLinear, QuantConv2d from ql.Int8StaticConfig or ql.Int8DynamicConfig). "
                "Quantize this layer with one of those, leave it out of quantize_ (exclude=...), or replace it by an "
                "nn.Linear holding its dequantized weight (a QAT model: ql.convert_ it first)")
    if qdq and not swaps:
        raise ValueError(f"{type(model).__name__} has no QuantLinear or QuantConv2d layer to write as QDQ nodes: "
                         "quantize it with ql.Int8StaticConfig or ql.Int8DynamicConfig first, or export it as it is "
                         "with qdq=False")
    if "" in swaps:  # the model is itself one W8A8 layer
        return swaps[""]
    for name, new in swaps.items():
        model.set_submodule(name, new)
    return model


# ----------------------------------------------------------------------------- 8) export, run, inspect
def to_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor | tuple[torch.Tensor, ...], *,
            qdq: bool = True, opset: int = 18, dynamic_dims: tuple[int, ...] = (0,)) -> Path:
    """Write a qlab model as an ONNX file; returns the path.

    qdq=True: every QuantLinear / QuantConv2d becomes QuantizeLinear / DequantizeLinear nodes around a float
    Gemm / MatMul / Conv, holding qlab's own int8 weight codes, per-channel weight scales and activation scales
    and zero points (calibrated ones for static layers; for dynamic layers a small subgraph computes them from
    each input by qlab's per-token or per-tensor rule). The ONNX section's comment above lists the nodes.
    qdq=False: the float model, with each W8A8 layer's dequantized weight (an FP32 model is written as it is).

    Args:
        model: a module mapping example_input to one tensor (the digits CNN, the tiny GPT, ...).
        example_input: one input tensor, or a tuple of them (named "input" or "input_0", "input_1", ...).
        opset: the ONNX opset, one of ONNX_OPSETS.
        dynamic_dims: the dimensions of every input that may change size (default: the batch); (0, 1) lets a
            language model take any batch size and sequence length.

    Raises:
        ValueError: a qlab module that ONNX's Q/DQ nodes cannot express (named, with what to do instead), a
            dynamic QuantConv2d, or qdq=True on a model without W8A8 layers.
    """
    onnx, _ = _import_onnx()
    if opset not in ONNX_OPSETS:
        raise ValueError(f"opset={opset} is not supported: use one of {ONNX_OPSETS} (ReduceMax takes its axes as an "
                         "input from 18; torch's TorchScript exporter writes at most 20)")
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    for name, x in zip(names, inputs):
        bad = [d for d in dynamic_dims if not -x.dim() <= d < x.dim()]
        if bad:
            raise ValueError(f"dynamic_dims {bad} are not dimensions of {name} (shape {tuple(x.shape)})")
    dynamic_axes = {n: {d % x.dim(): f"{n}_dim{d % x.dim()}" for d in dynamic_dims} for n, x in zip(names, inputs)}
    exportable = _exportable(model, qdq)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the exporter's deprecation notice and tracer warnings (Python ifs on shapes)
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning))
        torch.onnx.export(exportable, inputs, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["output"], dynamic_axes=dynamic_axes, do_constant_folding=True)
    _undo_shared_initializers(onnx, path)
    onnx.checker.check_model(str(path))
    return path


def _undo_shared_initializers(onnx, path: Path) -> None:
    """Give every layer its own named initializers again.

    The exporter stores equal tensors once and renames the copies through Identity nodes (every act_zero_point of 0
    becomes "conv1.act_zero_point" -> Identity -> "conv2.act_zero_point"), so a reader would not find conv2's zero
    point among the initializers. Each Identity of an initializer becomes a copy of it, under the copy's name."""
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    copies = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    for node in copies:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(initializers[node.input[0]])
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    if copies:
        onnx.save(model, str(path))


def onnx_session(path: str | Path, *, threads: int | None = None, optimized_path: str | Path | None = None) -> Any:
    """An onnxruntime.InferenceSession on the CPU, with all graph optimizations (ORT's default).

    threads: intra-op threads, default torch.get_num_threads() so that ONNX Runtime and torch are timed on the
    same number of cores. optimized_path: where ORT saves the graph it actually runs (after its fusions)."""
    _, ort = _import_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only (saving an optimized graph warns that it is machine-specific)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(model: str | Path | Any, inputs: torch.Tensor | tuple[torch.Tensor, ...]
             ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run an ONNX file (a path) or an onnx_session on torch inputs; the output(s) as torch tensors."""
    session = model if hasattr(model, "run") else onnx_session(model)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"the ONNX model takes {len(names)} input(s) {names}, got {len(inputs)}")
    feed = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)}
    outputs = tuple(torch.from_numpy(y) for y in session.run(None, feed))
    return outputs[0] if len(outputs) == 1 else outputs


def onnx_ops(path: str | Path, *, optimized: bool = False) -> dict[str, int]:
    """How many nodes of each op type the file holds, or (optimized=True) the graph ONNX Runtime runs for it
    after its fusions: e.g. QLinearConv or MatMulInteger where it found an integer kernel, Conv where not."""
    onnx, _ = _import_onnx()
    if optimized:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            onnx_session(path, optimized_path=Path(tmp) / "optimized.onnx")
            graph = onnx.load(str(Path(tmp) / "optimized.onnx")).graph
    else:
        graph = onnx.load(str(path)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ----------------------------------------------------------------------------- 9) ONNX Runtime's own quantizers
def onnx_nodes_of(path: str | Path, module_names, op_types=("Conv", "Gemm", "MatMul")) -> list[str]:
    """Names of the nodes of op_types that to_onnx wrote for the given modules (their scope is the module path).

    Use it to have ONNX Runtime quantize the same layers as qlab: ort_quantize(..., nodes=onnx_nodes_of(...))."""
    onnx, _ = _import_onnx()
    prefixes = tuple("." + name + "." for name in module_names)
    return [n.name for n in onnx.load(str(path)).graph.node
            if n.op_type in op_types and n.name.replace("/", ".").startswith(prefixes)]


def ort_quantize(fp32_path: str | Path, out_path: str | Path, *, mode: str = "static",
                 calibrate_method: str = "MinMax", calib_data=None, per_channel: bool = True,
                 nodes: list[str] | None = None) -> Path:
    """Quantize an FP32 ONNX file with ONNX Runtime's own quantizer; returns out_path.

    First ORT's recommended pre-processing (onnxruntime.quantization.quant_pre_process: shape inference and ORT's
    basic graph optimizations), then:
    mode="static": quantize_static in QDQ format: int8 weights (symmetric, per channel if per_channel) and int8
    activations (asymmetric, per tensor) on the inputs and outputs of each quantized node, whose ranges come
    from running calib_data through the model and calibrate_method: "MinMax" (the observed range), "Entropy" (the
    range whose quantized histogram is closest in KL divergence, TensorRT's method) or "Percentile" (the
    99.999th percentile of |x|).
    mode="dynamic": quantize_dynamic: int8 weights; the activations are quantized per tensor at run time by
    DynamicQuantizeLinear (uint8, asymmetric) feeding MatMulInteger / ConvInteger. No calibration.
    ORT's progress messages are kept out of stdout.

    Note: ORT 1.32's quantize_static builds its Entropy histograms with 128 bins and searches thresholds with 128
    quantized bins, so the search has a single candidate, the whole range: "Entropy" gives MinMax's scales
    unless a tensor's histogram grew while calibrating (TensorRT's method uses 2048 bins for 128 levels).

    Args:
        calib_data: static only: an iterable of input batches (a tensor, or a tuple of tensors, per batch).
        nodes: quantize only these nodes (e.g. onnx_nodes_of(fp32_path, names), to quantize the layers qlab
            did); only their op types are calibrated. None: every node ORT can quantize.
    """
    onnx, _ = _import_onnx()
    import contextlib
    import io
    import tempfile

    from onnxruntime import quantization as oq
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in ("static", "dynamic"):
        raise ValueError(f"mode={mode!r} must be 'static' (calibrated activation ranges) or 'dynamic'")
    if mode == "dynamic" and calib_data is not None:
        raise ValueError("dynamic quantization takes its activation ranges from each input: pass no calib_data "
                         "(or use mode='static')")
    if mode == "static" and calibrate_method not in ORT_CALIBRATION_METHODS:
        raise ValueError(f"calibrate_method={calibrate_method!r} must be one of {ORT_CALIBRATION_METHODS}")
    if mode == "static" and calib_data is None:
        raise ValueError("static quantization needs calib_data: a list of input batches to calibrate the "
                         "activation ranges on (e.g. ql.data.digits_calibration_batches())")
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        model_path = str(Path(tmp) / "preprocessed.onnx")
        quant_pre_process(str(fp32_path), model_path)
        graph = onnx.load(model_path).graph
        op_types = None
        if nodes is not None:
            kinds = {n.name: n.op_type for n in graph.node}
            missing = [n for n in nodes if n not in kinds]
            if missing or not nodes:
                raise ValueError(f"nodes {missing or nodes} are not in {fp32_path} (after ORT's pre-processing): "
                                 "take the names from ql.export.onnx_nodes_of(fp32_path, module_names)")
            op_types = sorted({kinds[n] for n in nodes})
        if mode == "dynamic":
            oq.quantize_dynamic(model_path, str(out_path), op_types_to_quantize=op_types, per_channel=per_channel,
                                weight_type=oq.QuantType.QInt8, nodes_to_quantize=nodes)
            return Path(out_path)
        names = [i.name for i in graph.input]

        class Batches(oq.CalibrationDataReader):
            """Feeds calib_data to ORT's calibrator, one {input name: array} per batch."""

            def __init__(self) -> None:
                self.batches = iter(calib_data)

            def get_next(self) -> dict | None:
                batch = next(self.batches, None)
                if batch is None:
                    return None
                batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
                return {n: x.detach().cpu().numpy() for n, x in zip(names, batch)}

        oq.quantize_static(model_path, str(out_path), Batches(), quant_format=oq.QuantFormat.QDQ,
                           op_types_to_quantize=op_types, per_channel=per_channel,
                           activation_type=oq.QuantType.QInt8, weight_type=oq.QuantType.QInt8,
                           calibrate_method=getattr(oq.CalibrationMethod, calibrate_method), nodes_to_quantize=nodes)
    return Path(out_path)


# ----------------------------------------------------------------------------- 10) side by side (chapter 10, bench)
class OnnxCase(NamedTuple):
    """One model of onnx_comparison: its FP32 and qlab W8A8 versions, data, and how to score a forward function."""

    label: str  # "digits CNN"
    fp32: nn.Module
    w8a8: nn.Module  # quantized by qlab
    recipe: str  # how w8a8 was made
    calib: list[torch.Tensor]  # calibration batches (for ORT's quantize_static; qlab's static model used them too)
    example: torch.Tensor  # a small input to export with
    dynamic_dims: tuple[int, ...]
    batch: torch.Tensor  # the batch that is timed and on which top-1 agreement with FP32 is counted
    batch_label: str
    metric_name: str
    metric: Callable[[Callable[[torch.Tensor], torch.Tensor]], float]  # forward function -> score


def _digits_cnn_case(eval_tokens: int) -> OnnxCase:
    """Static W8A8 on the BN-folded digits CNN, scored on the whole test split (eval_tokens is the GPT's)."""
    from .api import Int8StaticConfig, quantize_
    from .bn_folding import fold_batchnorm_
    from .data import digits_calibration_batches, digits_split
    from .eval import accuracy
    from .models import digits_cnn

    fp32 = digits_cnn(pretrained=True)
    fold_batchnorm_(fp32)  # what both quantizers start from (ORT would fold BatchNorm itself)
    calib = digits_calibration_batches(8, 32)
    w8a8 = quantize_(copy.deepcopy(fp32), Int8StaticConfig(), calib_data=calib)
    x_test, y_test = digits_split("test")
    return OnnxCase("digits CNN", fp32, w8a8, "ql.Int8StaticConfig() (MinMax, per-tensor int8 activations)", calib,
                    x_test[:1], (0,), x_test[:64], "64 images", "test accuracy",
                    lambda fn: accuracy(fn, x_test, y_test))


def _tiny_gpt_case(eval_tokens: int) -> OnnxCase:
    """Dynamic per-token W8A8 on the tiny GPT (LM head in FP32), scored in bits/byte on eval_tokens val bytes."""
    from .api import Int8DynamicConfig, quantize_
    from .data import lm_calibration_batches, pydoc_corpus
    from .eval import perplexity
    from .models import tiny_gpt

    fp32 = tiny_gpt(pretrained=True)
    w8a8 = quantize_(copy.deepcopy(fp32), Int8DynamicConfig(exclude="lm_head"))
    val = pydoc_corpus("val")
    T = fp32.config.block_size
    return OnnxCase("tiny GPT", fp32, w8a8, 'ql.Int8DynamicConfig(exclude="lm_head") (per-token int8 activations)',
                    lm_calibration_batches(4, batch_size=8, seq_len=T), torch.zeros(1, 8, dtype=torch.long), (0, 1),
                    val[: 4 * T].reshape(4, T).long(), f"4 x {T} bytes", f"bits/byte ({eval_tokens} val bytes)",
                    lambda fn: perplexity(fn, val, seq_len=T, max_tokens=eval_tokens, progress=False)["bits_per_token"])


ONNX_CASES: dict[str, Callable[[int], OnnxCase]] = {"digits_cnn": _digits_cnn_case, "tiny_gpt": _tiny_gpt_case}


def _ort_kernels(path: Path) -> str:
    """The compute ops of the graph ONNX Runtime runs, e.g. "QLinearConv x3, QGemm"."""
    ops = onnx_ops(path, optimized=True)
    return ", ".join(f"{op} x{ops[op]}" if ops[op] > 1 else op for op in _ORT_COMPUTE_OPS if op in ops)


def _torch_kernels(model: nn.Module, batch: torch.Tensor) -> str:
    """The qlab kernels one forward runs (ql.kernels.trace), or aten for a float model."""
    from . import kernels

    ran = kernels.kernels_run(model, batch)
    if not ran:
        return "aten (float)"
    return ", ".join(f"{name} x{ran.count(name)}" for name in dict.fromkeys(ran))


def onnx_comparison(case: str = "digits_cnn", *, workdir: str | Path | None = None, repeats: int = 10,
                    eval_tokens: int = 4096) -> list[dict[str, Any]]:
    """One model, every route to int8 on the CPU, measured side by side in this run: a list of table rows.

    Routes: FP32 and qlab's W8A8 model in torch; the FP32 export, qlab's QDQ export (to_onnx) and ONNX Runtime's
    own quantizers (quantize_static with MinMax, Entropy and Percentile calibration, quantize_dynamic) in ONNX
    Runtime. ORT quantizes the same layers as qlab (onnx_nodes_of) and calibrates on the same batches.

    Each row: "model", "variant", "runtime", "kernels" (qlab's kernels traced in torch; for ORT the compute
    ops of the graph it runs after its fusions: QLinearConv / QLinearMatMul / DynamicQuantizeMatMul are
    integer kernels, Conv / FusedConv / MatMul / FusedMatMul are float), "metric" (its name) and "value"
    (test accuracy for the digits CNN, bits/byte on the first eval_tokens validation bytes for the tiny GPT),
    "agreement" (top-1 agreement with FP32 torch on the timed batch), "ms" (median milliseconds for the timed
    batch, described in "batch"), "bytes" (the ONNX file, or ql.eval.model_nbytes in torch).
    ONNX Runtime uses torch.get_num_threads() threads, as torch does.

    Args:
        case: a key of ONNX_CASES: "digits_cnn" (static W8A8; ~15 s on 2 cores) or "tiny_gpt" (dynamic W8A8).
        workdir: where the ONNX files are written (default: a temporary directory, deleted afterwards).
    """
    import os
    import tempfile

    from .eval import median_ms, model_nbytes

    if case not in ONNX_CASES:
        raise ValueError(f"case={case!r} is not one of {sorted(ONNX_CASES)}")
    c = ONNX_CASES[case](eval_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir or tmp)
        fp32_path = to_onnx(c.fp32, folder / f"{case}_fp32.onnx", c.example, qdq=False, dynamic_dims=c.dynamic_dims)
        qdq_path = to_onnx(c.w8a8, folder / f"{case}_qlab_qdq.onnx", c.example, dynamic_dims=c.dynamic_dims)
        quantized = [n for n, m in c.w8a8.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
        nodes = onnx_nodes_of(fp32_path, quantized)
        ort_files = {f"ORT quantize_static {m}": ort_quantize(fp32_path, folder / f"{case}_ort_{m.lower()}.onnx",
                                                              calibrate_method=m, calib_data=c.calib, nodes=nodes)
                     for m in ORT_CALIBRATION_METHODS}
        ort_files["ORT quantize_dynamic"] = ort_quantize(fp32_path, folder / f"{case}_ort_dynamic.onnx",
                                                         mode="dynamic", nodes=nodes)
        routes: list[tuple[str, str, Callable, str, int]] = [
            ("FP32", "torch", c.fp32, _torch_kernels(c.fp32, c.batch), model_nbytes(c.fp32)),
            (f"qlab W8A8: {c.recipe}", "torch", c.w8a8, _torch_kernels(c.w8a8, c.batch), model_nbytes(c.w8a8)),
        ]
        for variant, path in [("FP32 export", fp32_path), ("qlab W8A8, QDQ export (to_onnx)", qdq_path),
                              *ort_files.items()]:
            session = onnx_session(path)
            routes.append((variant, f"ONNX Runtime {_ort_version()}", lambda x, s=session: run_onnx(s, x),
                           _ort_kernels(path), os.path.getsize(path)))
        with torch.inference_mode():
            reference = c.fp32(c.batch).argmax(-1)
            rows = []
            for variant, runtime, fn, kernels_used, nbytes in routes:
                rows.append({"model": c.label, "variant": variant, "runtime": runtime, "kernels": kernels_used,
                             "metric": c.metric_name, "value": c.metric(fn),
                             "agreement": float((fn(c.batch).argmax(-1) == reference).float().mean()),
                             "ms": median_ms(fn, c.batch, warmup=2, repeats=repeats), "batch": c.batch_label,
                             "bytes": nbytes})
    return rows


def _ort_version() -> str:
    """The installed ONNX Runtime version."""
    _, ort = _import_onnx()
    return ort.__version__


def onnx_comparison_table(rows: list[dict[str, Any]]) -> str:
    """onnx_comparison's rows as one Markdown table (ql.viz.show_markdown displays it)."""
    from .viz import markdown_table

    header = ["model", "variant", "runtime", "kernels", "metric", "value", "top-1 = FP32", "ms / batch", "batch",
              "bytes"]
    cells = [[r["model"], r["variant"], r["runtime"], r["kernels"], r["metric"],
              f"{r['value']:.4f}", f"{100 * r['agreement']:.1f} %", f"{r['ms']:.2f}", r["batch"], f"{r['bytes']:,}"]
             for r in rows]
    return markdown_table(header, cells)


__all__ += ["ONNX_OPSETS", "ORT_CALIBRATION_METHODS", "to_onnx", "onnx_session", "run_onnx", "onnx_ops", "onnx_nodes_of",
            "ort_quantize", "OnnxCase", "ONNX_CASES", "onnx_comparison", "onnx_comparison_table"]
