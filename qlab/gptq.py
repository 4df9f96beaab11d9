"""GPTQ: quantize a layer's weights one column at a time, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer-wise objective.

E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh. "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023, https://arxiv.org/abs/2210.17323.

For a linear layer with weight W (N, K) and calibration inputs X (n, K), GPTQ minimises the layer-wise
objective ||W X^T - W_hat X^T||^2 whose Hessian with respect to each row of W is H = 2/n X^T X (K, K), the
same for every row. Quantizing column j to q_j and compensating with the remaining columns (the OBS
update) gives, with d_j = [H^-1]_jj computed on the columns still free,

    err = (w_j - q_j) / d_j            W[:, j:] -= err (x) [H^-1]_{j, j:}        (one row of the Cholesky factor)

Conventions (those of IST-DASLab/gptq and AutoGPTQ 0.7.1, so the codes match them exactly; the oracle tests
in tests/test_gptq.py and tests/interop/ check this):
- The quantizer (`find_params`) widens each range to include 0: xmin = min(x, 0), xmax = max(x, 0); a row or
  group of zeros gets [-1, 1]; scale = (xmax - xmin) / maxq, maxq = 2^bits - 1, zero = round(-xmin / scale).
  Symmetric: xmax = max(|xmin|, xmax), xmin = -xmax (only where xmin < 0) and zero = (maxq + 1) / 2, so the
  4-bit grid is -8..7 steps of 2 absmax / 15 (qlab returns these symmetric codes as signed int{bits}
  codes, q - zero, with no zero points stored).
- Dead columns (H[i, i] = 0: an input channel that is always 0) get H[i, i] = 1 and W[:, i] = 0.
- Damping: damp * mean(diag H) is added to the diagonal (damp = 0.01 is AutoGPTQ's damp_percent).
- The column updates use the upper Cholesky factor of H^-1 (numerically stable, computed once).
- act_order: columns are processed in decreasing diag(H); groups are consecutive in that order, and
  g_idx[k] (as AutoGPTQ writes it) says which group column k belongs to. static_groups computes every
  group's (scale, zero) first, on the original column order, so g_idx stays k // group_size.
- Groups (group_size != -1, not static) take their (scale, zero) from the weights as they stand when
  their first column comes up, updated by every earlier lazy block update but not by the updates inside
  the current block of `block_size` columns (what the reference reads). group_size = -1: one (scale,
  zero) per row, from the weights before anything else happens.
- Lazy batch updates: inside a block of block_size columns the error is applied to the block only; the
  rest of W is updated once per block (W[:, i2:] -= Err Hinv[i1:i2, i2:]).

Math first (`hessian`, `find_params`, `quantize_weight`, `rtn`), then the model walker (`apply`: one
transformer block at a time, each block's Hessians from the outputs of the already-quantized blocks
before it), then `GPTQConfig` and `RTNConfig` for `ql.quantize_`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .api import QuantConfig, register_handler, select_modules, swap_modules
from .calibration import forward_hooks, recording, run_batch
from .core.granularity import PerGroup
from .core.qtensor import QTensor, from_codes
from .core.qtypes import QType, qtype as make_qtype
from .nn import Int4WeightOnlyLinear, WeightOnlyLinear, _group_divisors


# ----------------------------------------------------------------------------- 1) the math
class HessianAccumulator:
    """Accumulator for calibration.record: the running H = 2/n sum x x^T over the rows of every input.

    Follows the reference's update (add_batch): n counts sequences (the leading dimension of a 3-D input,
    1 for a 2-D one), and H is rescaled by n / (n + b) before each new batch is added, so H stays an
    average. The overall scale does not matter to GPTQ (damping is relative to mean(diag H)).
    """

    def __init__(self) -> None:
        self.H: torch.Tensor | None = None
        self.n = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.dim() == 2:
            x = x.unsqueeze(0)  # (1, tokens, K)
        b = x.shape[0]
        x = x.reshape(-1, x.shape[-1]).t().float()  # (K, tokens)
        if self.H is None:
            self.H = torch.zeros(x.shape[0], x.shape[0], device=x.device)
        self.H *= self.n / (self.n + b)
        self.n += b
        x = math.sqrt(2 / self.n) * x
        self.H += x @ x.t()  # (K, K)


def hessian(inputs: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """H = 2/n sum x x^T (K, K), float32, over the input rows x (K,) of one layer.

    Args:
        inputs: a (tokens, K) or (batch, T, K) tensor, or an iterable of them (each added as one batch).
    """
    acc = HessianAccumulator()
    for x in [inputs] if isinstance(inputs, torch.Tensor) else inputs:
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            raise ValueError(f"hessian takes (tokens, K) or (batch, T, K) tensors, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        acc(x)
    if acc.H is None:
        raise ValueError("hessian got no inputs: pass the (tokens, K) activations the layer reads")
    return acc.H


def find_params(x: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's quantizer: (scale, zero) per row of x (N, g), both (N,) float32; zero is always representable.

    Codes are q = clamp(round(w / scale) + zero, 0, maxq), maxq = 2^bits - 1 (module docstring)."""
    maxq = 2**bits - 1
    xmin = x.min(dim=1).values.clamp(max=0)  # (N,) the range always contains 0
    xmax = x.max(dim=1).values.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)  # float codes in [0, maxq]


def _check_weight(W: torch.Tensor, group_size: int, name: str) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{name}: W must be a float (out_features, in_features) matrix, got "
                         f"{(tuple(W.shape), W.dtype) if isinstance(W, torch.Tensor) else type(W).__name__}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name}: W has NaN or Inf entries")
    K = W.shape[1]
    if group_size != -1 and (not isinstance(group_size, int) or group_size < 1 or K % group_size):
        raise ValueError(f"{name}: group_size={group_size} must divide in_features={K} (or be -1 for one group "
                         f"per row); try one of {_group_divisors(K)}")


def _check_weight_and_hessian(W: torch.Tensor, H: torch.Tensor, group_size: int, name: str) -> None:
    _check_weight(W, group_size, name)
    K = W.shape[1]
    if not isinstance(H, torch.Tensor) or H.shape != (K, K):
        raise ValueError(f"{name}: H must be ({K}, {K}) for a weight with in_features={K}, got "
                         f"{tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__}; "
                         "build it with ql.gptq.hessian(inputs)")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{name}: H has NaN or Inf entries: the calibration activations overflowed; run the "
                         "model in float32 for calibration")
    if not bool((H.diagonal() > 0).any()):
        raise ValueError(f"{name}: H is all zero: this layer never saw a non-zero input. Check that the calibration "
                         "batches reach it (and are not all padding)")


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01, name: str = "layer") -> tuple[torch.Tensor, float]:
    """(upper Cholesky factor of (H + damp * mean(diag H) I)^-1, the damp used).

    If H + damping is not positive definite (numerically), damp is multiplied by 10 (up to 1, i.e. the
    mean of diag H) and the factorisation retried, with a warning that names the layer and the damp
    used; it never returns NaN."""
    mean_diag = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    d = damp
    while True:
        Hd = H.clone()
        Hd[idx, idx] += d * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                if d != damp:
                    warnings.warn(f"GPTQ {name}: H + {damp:g} * mean(diag H) is not positive definite; used damp={d:g} "
                                  "instead (more or longer calibration sequences give a better-conditioned H)",
                                  stacklevel=3)
                return U, d
        if d * 10 > 1 + 1e-9:
            raise ValueError(f"GPTQ {name}: H is not positive definite even with damp={d:g} (damping by the mean of "
                             "diag H): it is not the Hessian of real inputs, or they are degenerate. Build H with "
                             "ql.gptq.hessian from more calibration data")
        d *= 10


@torch.no_grad()
def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    qtype: QType | int = 4,
    group_size: int = 128,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    symmetric: bool = False,
    name: str = "layer",
) -> QTensor:
    """GPTQ on one weight matrix: a QTensor of codes, scales, zero points and (with act_order) g_idx.

    Args:
        W: (N, K) weight (out_features, in_features); not modified.
        H: (K, K) Hessian of the layer's inputs (`hessian`); not modified.
        qtype: only its bits are used (2..8): symmetric codes come back as signed int{bits} (q - 2^(bits-1)),
            asymmetric ones as uint{bits} with a zero point per group. An int is taken as the bits.
        group_size: inputs per (scale, zero); -1 for one pair per output row.
        block_size: columns per lazy batch update (speed only; the result does not depend on it beyond
            float rounding, except where groups start inside a block, see the module docstring).
        damp: fraction of mean(diag H) added to the diagonal.
        act_order: process columns in decreasing diag(H) (AutoGPTQ's desc_act).
        static_groups: compute every group's (scale, zero) before any error feedback.
        name: the layer's name, for warnings and errors.
    Returns:
        QTensor of shape (N, K), granularity PerGroup(group_size) (PerGroup(K) for -1), g_idx set only when
        act_order without static_groups makes the groups non-contiguous.
    """
    bits = qtype if isinstance(qtype, int) else qtype.bits
    if not 2 <= bits <= 8:
        raise ValueError(f"GPTQ quantizes to 2..8 bits, got {bits}")
    _check_weight_and_hessian(W, H, group_size, name)
    N, K = W.shape
    maxq = 2**bits - 1
    W = W.detach().clone().float()
    H = H.detach().clone().float().to(W.device)

    # 1) per-row (scale, zero) for group_size = -1, from the weights as they are
    scale_row, zero_row = find_params(W, bits, symmetric)
    # 2) dead input channels: nothing to compensate with, nothing to lose
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = K if group_size == -1 else group_size
    # 3) static groups: every group's (scale, zero) on the original columns, before any update
    static = [find_params(W[:, g:g + gs], bits, symmetric) for g in range(0, K, gs)] if static_groups else None
    # 4) act order: the columns with the largest diag(H) first
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # 5) damp, 6) upper Cholesky factor of H^-1
    Hinv, _ = inverse_hessian_factor(H, damp, name)

    Q = torch.zeros_like(W)  # float codes in [0, maxq], permuted order
    scales, zeros = [], []
    scale, zero = scale_row, zero_row
    # 7) column by column inside blocks of block_size columns
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # (N, B) the block, updated column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1:
                if static is not None:
                    scale, zero = static[(int(perm[col]) if perm is not None else col) // gs]
                elif col % gs == 0:  # a new group: its qparams from W (lazy-updated up to this block)
                    scale, zero = find_params(W[:, col:col + gs], bits, symmetric)
                    scales.append(scale), zeros.append(zero)
            w, d = W1[:, i], Hinv1[i, i]
            q_code = _codes(w, scale, zero, maxq)
            q = scale * (q_code - zero)
            Q[:, col] = q_code
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))  # the OBS update inside the block
            Err1[:, i] = err
        # 8) lazy batch update of every column after the block
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    # 9) qparams per group, g_idx, and the original column order
    if group_size == -1:
        scales, zeros = [scale_row], [zero_row]
    elif static is not None:
        scales, zeros = [s for s, _ in static], [z for _, z in static]
    scale_t = torch.stack(scales, dim=1)  # (N, G)
    zero_t = torch.stack(zeros, dim=1)
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        if static is None and group_size != -1:
            g_idx = (torch.arange(K, device=W.device) // gs)[invperm].to(torch.int32)  # AutoGPTQ's g_idx
    codes = Q.to(torch.int32)
    if symmetric:  # zero = 2^(bits-1) everywhere: signed codes, nothing to store
        return from_codes(codes - (maxq + 1) // 2, scale_t, None, make_qtype(bits, signed=True), PerGroup(gs),
                          symmetric=True, g_idx=g_idx)
    return from_codes(codes, scale_t, zero_t.to(torch.int32), make_qtype(bits, signed=False), PerGroup(gs),
                      symmetric=False, g_idx=g_idx)


def rtn(W: torch.Tensor, qtype: QType | int = 4, group_size: int = 128, symmetric: bool = False) -> QTensor:
    """Round-to-nearest with GPTQ's quantizer (the paper's RTN baseline): no Hessian, no error feedback."""
    bits = qtype if isinstance(qtype, int) else qtype.bits
    K = W.shape[1]
    gs = K if group_size == -1 else group_size
    _check_weight(W, group_size, "rtn")
    maxq = 2**bits - 1
    W = W.detach().float()
    scale, zero = find_params(W.reshape(-1, gs), bits, symmetric)  # (N * G,): one pair per group
    codes = _codes(W.reshape(-1, gs), scale[:, None], zero[:, None], maxq).reshape(W.shape).to(torch.int32)
    G = K // gs
    scale, zero = scale.reshape(-1, G), zero.reshape(-1, G)
    if symmetric:
        return from_codes(codes - (maxq + 1) // 2, scale, None, make_qtype(bits, True), PerGroup(gs), True)
    return from_codes(codes, scale, zero.to(torch.int32), make_qtype(bits, False), PerGroup(gs), False)


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """The layer-wise objective per output row: tr((W - W_hat) H (W - W_hat)^T) / N (= ||(W - W_hat) X^T||^2 * 2/(nN))."""
    D = (W.float() - W_hat.float())  # (N, K)
    return float(torch.einsum("nk,kl,nl->", D, H.float(), D) / W.shape[0])


def storage(model: nn.Module) -> dict[str, float]:
    """Real storage of the model's weight-only layers: their weight count, the bytes qlab holds (packed
    codes, float32 scales, int32 zero points, g_idx) and the bytes of the same layers in an AutoGPTQ
    checkpoint (qweight, qzeros packed at the code width, fp16 scales, int32 g_idx), with bits per weight."""
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    if not layers:
        raise ValueError("the model has no weight-only layers; quantize it first (ql.GPTQConfig, ql.RTNConfig, ...)")
    weights = sum(m.in_features * m.out_features for m in layers)
    ours = sum(m.packed_nbytes for m in layers)
    theirs = 0
    for m in layers:
        bits, (N, G) = m.weight_qtype.bits, m.weight_scale.shape
        theirs += m.in_features * N * bits / 8 + G * N * bits / 8 + G * N * 2 + m.in_features * 4
    return {"weights": weights, "qlab_bytes": ours, "autogptq_bytes": theirs,
            "qlab_bits_per_weight": 8 * ours / weights, "autogptq_bits_per_weight": 8 * theirs / weights}


# ----------------------------------------------------------------------------- 2) the model walker
class _StopForward(Exception):
    pass


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks) of the model's stack of transformer blocks.

    A model may say where they are with `transformer_blocks_name()` (qlab's models do); otherwise the
    nn.ModuleList holding the most parameters is taken (GPT-2's `transformer.h`, LLaMA's `model.layers`)."""
    if hasattr(model, "transformer_blocks_name"):
        name = model.transformer_blocks_name()
        return name, model.get_submodule(name)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks; GPTQ walks a transformer block by "
                         "block. Quantize single layers with ql.gptq.quantize_weight(W, H)")
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, calib_data: Sequence) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives for every calibration batch (the rest of the model is not run)."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calib_data:
            try:
                run_batch(model, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("calib_data is empty: pass a few token batches, e.g. ql.data.lm_calibration_batches()")
    return captured


def _check_calibration_length(model: nn.Module, calib_data: Sequence) -> None:
    context = getattr(getattr(model, "config", None), "block_size", None)
    if not isinstance(context, int):
        return
    for batch in calib_data:
        x = batch if isinstance(batch, torch.Tensor) else batch[0] if isinstance(batch, (tuple, list)) else None
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] < context:
            raise ValueError(f"a calibration batch has {x.shape[1]} tokens but the model's context is {context}: the "
                             "Hessians would never see the later positions. Use full-length sequences, e.g. "
                             f"ql.data.lm_calibration_batches(seq_len={context})")


def _as_qtensor(result, name: str, shape: torch.Size) -> QTensor:
    """What a quantize_weight_fn returned, as a QTensor: a QTensor, or (codes, scale, zero, g_idx) in GPTQ's
    unsigned convention (codes in [0, maxq], scale and zero (N, G))."""
    if isinstance(result, QTensor):
        qt = result
    elif isinstance(result, (tuple, list)) and len(result) == 4:
        codes, scale, zero, g_idx = result
        K = shape[1]
        G = scale.shape[1] if scale.dim() == 2 else 1
        maxq = int(codes.max())
        bits = max(2, math.ceil(math.log2(maxq + 1)))
        qt = from_codes(codes.to(torch.int32), scale.reshape(shape[0], G).float(),
                        zero.reshape(shape[0], G).round().to(torch.int32), make_qtype(bits, False), PerGroup(K // G),
                        symmetric=False, g_idx=None if g_idx is None else g_idx.to(torch.int32))
    else:
        raise ValueError(f"quantize_weight_fn for {name!r} must return a QTensor or (codes, scale, zero, g_idx), got "
                         f"{type(result).__name__}")
    if tuple(qt.shape) != tuple(shape):
        raise ValueError(f"quantize_weight_fn for {name!r} returned a {tuple(qt.shape)} weight, expected {tuple(shape)}")
    if not bool(torch.isfinite(qt.dequantize()).all()):
        raise ValueError(f"quantize_weight_fn for {name!r} returned NaN or Inf weights")
    return qt


@dataclass
class LayerReport:
    """What GPTQ did to one linear: the layer-wise objective before/after (RTN vs GPTQ), its time, the damp used."""

    name: str
    error: float
    rtn_error: float
    seconds: float
    damp: float = 0.0


@dataclass
class GPTQReport:
    """Per-layer results of `apply`, in the order the layers were quantized."""

    layers: list[LayerReport] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.layers)

    def rows(self) -> list[dict]:
        return [{"layer": r.name, "GPTQ error": r.error, "RTN error": r.rtn_error, "seconds": r.seconds}
                for r in self.layers]


@torch.no_grad()
def apply(model: nn.Module, config: GPTQConfig, calib_data: Iterable,
          quantize_weight_fn: Callable[..., QTensor] | None = None, progress: bool = True) -> GPTQReport:
    """Quantize every selected linear inside the model's transformer blocks with GPTQ, in place.

    One block at a time: (1) the block's inputs are the outputs of the already-quantized blocks before it;
    (2) with true_sequential, each linear (in registration order, e.g. c_attn, c_proj, c_fc, c_proj)
    gets its Hessian from inputs produced by the already-quantized linears before it in the block;
    otherwise all of a block's linears get theirs from one pass; (3) quantize_weight_fn(W, H, **options)
    (default `quantize_weight`; the lab passes a student's) gives the codes; (4) the block's outputs,
    recomputed with its quantized weights, feed the next block. Finally each linear is swapped for a
    WeightOnlyLinear built from its QTensor. Returns a GPTQReport (error and time per layer).
    """
    fn = quantize_weight_fn or quantize_weight
    calib_data = list(calib_data)
    _check_calibration_length(model, calib_data)
    was_training = model.training
    model.eval()
    try:
        blocks_name, blocks = transformer_blocks(model)
        chosen = {n for n, _ in select_modules(model, config)}
        inputs = _block_inputs(model, blocks, calib_data)
        report, qtensors = GPTQReport(), {}
        bar = tqdm(range(len(blocks)), desc="GPTQ", unit="block", disable=not progress)
        for b in bar:
            block, prefix = blocks[b], f"{blocks_name}.{b}."
            names = [n for n, m in block.named_modules() if prefix + n in chosen]
            steps = [[n] for n in names] if config.true_sequential else [names]
            for step in steps:
                with recording(block, step, HessianAccumulator) as stats:  # 1) Hessians of this step's inputs
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                for n in step:  # 2) quantize, and leave the fake-quantized weight for the next steps
                    lin, H = block.get_submodule(n), stats[n].input.H
                    W = lin.weight.detach().float()
                    t0 = time.perf_counter()
                    qt = _as_qtensor(fn(W, H, qtype=config.bits, group_size=config.group_size,
                                        block_size=config.block_size, damp=config.damp, act_order=config.act_order,
                                        static_groups=config.static_groups, symmetric=config.symmetric),
                                     prefix + n, W.shape)
                    seconds = time.perf_counter() - t0
                    W_hat = qt.dequantize()
                    base = rtn(W, config.bits, config.group_size, config.symmetric).dequantize()
                    report.layers.append(LayerReport(prefix + n, layer_error(W, W_hat, H), layer_error(W, base, H),
                                                     seconds, config.damp))
                    lin.weight.copy_(W_hat.to(lin.weight.dtype))
                    qtensors[prefix + n] = qt
            outs = []  # 3) the quantized block's outputs are the next block's inputs
            for args, kwargs in inputs:
                y = block(*args, **kwargs)
                y = y[0] if isinstance(y, (tuple, list)) else y
                outs.append(((y,) + tuple(args[1:]), kwargs))
            inputs = outs
            bar.set_postfix(layers=len(report.layers))
        if not qtensors:
            raise ValueError(f"GPTQ found no selected linear inside {blocks_name!r}; check include/exclude")
    finally:
        model.train(was_training)

    def make(name: str, lin: nn.Module) -> nn.Module:
        cls = Int4WeightOnlyLinear if config.bits == 4 else WeightOnlyLinear
        return cls.from_qtensor(qtensors[name], lin.bias)

    swap_modules(model, QuantConfig(include=tuple(qtensors), targets=config.targets), make)  # exactly those
    return report


# ----------------------------------------------------------------------------- 3) the configs
def _bits_of(qtype: QType | int) -> int:
    bits = qtype if isinstance(qtype, int) else getattr(qtype, "bits", None)
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"qtype={qtype!r}: weight-only LLM quantization uses 2..8-bit codes, e.g. ql.uint4 or "
                         "ql.qtype(3, signed=False)")
    return bits


@dataclass(frozen=True)
class _GroupedWeightConfig(QuantConfig):
    """What RTN, GPTQ and AWQ configs share: the code width (qtype: only its bits count) and the group size."""

    qtype: QType | int = 4
    group_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        _bits_of(self.qtype)
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer (e.g. 128) or -1 (one group per row)")

    @property
    def bits(self) -> int:
        return _bits_of(self.qtype)


@dataclass(frozen=True)
class GPTQConfig(_GroupedWeightConfig):
    """GPTQ on every nn.Linear inside the model's transformer blocks (`ql.quantize_(model, cfg, calib_data=...)`).

    qtype: only its bits count (symmetric decides signed/unsigned codes). Defaults are AutoGPTQ's
    quantize_config except group_size=128 (its default is -1) and act_order=False (desc_act): the
    reference's asymmetric quantizer, damp 0.01, block_size 128, true_sequential.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    symmetric: bool = False
    true_sequential: bool = True
    progress: bool = True  # a tqdm bar per block (False in the book's pages)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive integer (128 is the reference's)")
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1):
            raise ValueError(f"damp={self.damp!r} must be in (0, 1): a fraction of mean(diag H), 0.01 by default, "
                             "0.1 if Cholesky fails")

    @property
    def needs_calib_data(self) -> bool:
        return True


@register_handler(GPTQConfig)
def _gptq(model: nn.Module, config: GPTQConfig, calib_data) -> nn.Module:
    apply(model, config, calib_data, progress=config.progress)
    return model


@dataclass(frozen=True)
class RTNConfig(_GroupedWeightConfig):
    """Round-to-nearest weight-only quantization with GPTQ's quantizer, any 2..8 bits (the baseline).

    Like GPTQConfig it quantizes the linears inside the transformer blocks only (embeddings and the LM
    head stay float), so the two are compared on the same layers; a model without blocks gets every
    selected linear.

    For 4 bits it gives the same codes as `ql.Int4WeightOnlyConfig`'s asymmetric scheme up to how the
    symmetric grid is laid out (GPTQ's -8..7 with zero 8 here, qlab's restricted [-7, 7] there)."""

    symmetric: bool = False


def _block_linear_names(model: nn.Module, config: QuantConfig) -> tuple[str, ...] | None:
    """Names of the selected linears inside the transformer blocks (None if the model has no blocks)."""
    try:
        blocks_name, _ = transformer_blocks(model)
    except ValueError:
        return None
    return tuple(n for n, _ in select_modules(model, config) if n.startswith(blocks_name + "."))


@register_handler(RTNConfig)
def _rtn(model: nn.Module, config: RTNConfig, calib_data) -> nn.Module:
    """The layers GPTQ and AWQ quantize (those inside the transformer blocks: embeddings and LM head stay
    float), so the baseline is comparable; every selected linear for a model without blocks."""
    names = _block_linear_names(model, config)
    selector = QuantConfig(include=names, targets=config.targets) if names else config

    def make(name: str, lin: nn.Module) -> nn.Module:
        qt = rtn(lin.weight.detach().float(), config.bits, config.group_size, config.symmetric)
        cls = Int4WeightOnlyLinear if config.bits == 4 else WeightOnlyLinear
        return cls.from_qtensor(qt, lin.bias)

    swap_modules(model, selector, make)
    return model


__all__ = ["HessianAccumulator", "hessian", "find_params", "inverse_hessian_factor", "quantize_weight", "rtn",
           "layer_error", "storage", "transformer_blocks", "apply", "LayerReport", "GPTQReport", "GPTQConfig", "RTNConfig"]
