"""Checkpoints other tools load: a weight-only quantized Tiny GPT as an AutoGPTQ 0.7.1 checkpoint, and back.

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
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from .core.granularity import PerChannel, PerGroup
from .core.qtensor import QTensor, from_codes
from .core.qtypes import qtype as make_qtype
from .models.tiny_gpt import HF_GPT2_CONV1D, TinyGPT, config_from_hf_gpt2, hf_gpt2_config, hf_gpt2_name
from .nn import Int4WeightOnlyLinear, WeightOnlyLinear

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


__all__ = ["pack_gptq", "unpack_gptq", "autogptq_zero_points", "qtensor_to_autogptq", "qtensor_from_autogptq", "save_autogptq", "load_autogptq"]
