"""Quantization-aware training: train through the rounding with the straight-through estimator, or LSQ.

Fake quantization keeps every tensor in float but snaps it to the quantization grid in the forward pass:

    x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s

round() has zero gradient almost everywhere, so training uses a surrogate:

  STE (Bengio et al. 2013, https://arxiv.org/abs/1308.3432): pretend round() is the identity, so
      dx_hat/dx = 1 where the code was not clamped, 0 where it was            (torch.fake_quantize_* agree)

  LSQ, Learned Step Size Quantization (Esser et al. 2020, https://arxiv.org/abs/1902.08153): the step size s
  is a parameter too, with
      dx_hat/ds = round(x/s) - x/s   inside the range,   (qmin - z) / (qmax - z) where clamped low / high
  and its gradient multiplied by g = 1 / sqrt(N * Qp) (N elements share s, Qp = qmax) so that s learns at
  the same relative pace as the weights.

Workflow (the book's QAT chapter):

    ql.quantize_(model, ql.FakeQuantConfig(weight_qtype=ql.int4, act_qtype=ql.uint4), calib_data=batches)   # PTQ start point
    for step, (x, y) in enumerate(loader):                                                    # train as usual
        ql.qat_schedule_(model, step, freeze_observers_at=200, freeze_bn_at=300)
        ...
    ql.convert_(model)        # FakeQuantLinear / FakeQuantConv2d -> QuantLinear / QuantConv2d (integer GEMM)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .core.granularity import Granularity, PerChannel, PerTensor, expand, slices
from .core.qtypes import QType, qtype
from .nn import QuantConv2d, QuantLinear
from .observers import qparams_from_range


def code_range(zero_point: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, int]:
    """Lowest and highest code: symmetric signed codes (zero_point 0) use the restricted [-qmax, qmax]."""
    if qtype.signed:
        return torch.where(zero_point == 0, -qtype.qmax, qtype.qmin), qtype.qmax
    return torch.full_like(zero_point, qtype.qmin), qtype.qmax


# ----------------------------------------------------------------------------- 1) the straight-through estimator
class FakeQuantizeSTE(torch.autograd.Function):
    """x -> (clamp(round(x/s) + z, qmin, qmax) - z) * s, with gradient 1 where the code was not clamped."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qtype: QType, granularity: Granularity):
        s = expand(scale, x, granularity)  # broadcasts against x
        z = expand(zero_point, x, granularity)
        lowest, highest = code_range(z, qtype)
        code = torch.round(x / s) + z  # unclamped code
        inside = (code >= lowest) & (code <= highest)  # where round() is "the identity"
        ctx.save_for_backward(inside)
        return ((torch.maximum(code, lowest.to(code.dtype)).clamp(max=highest) - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize_ste(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qtype: QType, granularity: Granularity = PerTensor()
) -> torch.Tensor:
    """Fake-quantize x with given qparams; the gradient is the straight-through estimator."""
    return FakeQuantizeSTE.apply(x, scale, zero_point, qtype, granularity)


# ----------------------------------------------------------------------------- 2) LSQ: a learnable step size
class LSQFakeQuantize(torch.autograd.Function):
    """LSQ fake quantization: gradients for x (STE) and for the step size s (Esser et al. 2020, eq. 3)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qtype: QType, granularity: Granularity, grad_scale: float):
        s = expand(scale, x, granularity)
        z = expand(zero_point, x, granularity)
        lowest, highest = code_range(z, qtype)
        v = x / s  # (..) the value in units of the step
        lo, hi = lowest - z, highest - z  # the clamping range of round(v): [-Qn, Qp] in the paper
        v_bar = torch.minimum(torch.maximum(torch.round(v), lo.to(v.dtype)), hi.to(v.dtype))
        ctx.save_for_backward(v, lo, hi)
        ctx.granularity, ctx.grad_scale, ctx.scale_shape = granularity, grad_scale, scale.shape
        return (v_bar * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        v, lo, hi = ctx.saved_tensors
        below, above = v <= lo, v >= hi  # clamped elements (paper: v <= -Qn, v >= Qp)
        inside = ~(below | above)
        grad_x = grad * inside  # STE through round, zero where clamped
        dv_ds = torch.where(below, lo.to(v.dtype), torch.where(above, hi.to(v.dtype), torch.round(v) - v))
        grad_s = slices(grad * dv_ds, ctx.granularity).sum(-1) * ctx.grad_scale  # summed over each slice, times g
        return grad_x, grad_s.reshape(ctx.scale_shape), None, None, None, None


def lsq_grad_scale(n_elements: int, qtype: QType) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Qp)."""
    return 1.0 / math.sqrt(n_elements * qtype.qmax)


def lsq_init_scale(x: torch.Tensor, qtype: QType, granularity: Granularity = PerTensor()) -> torch.Tensor:
    """LSQ's initial step size s = 2 * mean(|x|) / sqrt(Qp), per slice."""
    return 2 * slices(x.detach().float().abs(), granularity).mean(-1) / math.sqrt(qtype.qmax)


# ----------------------------------------------------------------------------- 3) the module that holds qparams
class FakeQuantize(nn.Module):
    """Observe a range, then fake-quantize: the quantizer a QAT layer puts on its weight and its input.

    It observes in training mode only (and until `qat_schedule_` freezes it); in eval mode the qparams are fixed.

    Args:
        qtype, granularity, symmetric: the grid (weights: ql.int8, PerChannel(0), True;
            activations: ql.uint8, PerTensor(), False).
        qparam_shape: shape of scale / zero_point (ql.qparam_shape(x, granularity)).
        averaging_constant: range update min <- min + c * (batch_min - min). 1.0 tracks the current tensor
            (weights); 0.01 is a moving average over batches (activations, as torch.ao does).
        learnable: LSQ: the scale becomes an nn.Parameter, set from the first tensor seen and then trained.
        lsq_n: N in LSQ's gradient scale 1 / sqrt(N * Qp): the elements sharing one step size (weights);
            None means the features of one example, x[0].numel() (activations, as in the paper).
    """

    def __init__(
        self,
        qtype: QType,
        granularity: Granularity = PerTensor(),
        symmetric: bool = True,
        qparam_shape: tuple[int, ...] = (),
        averaging_constant: float = 0.01,
        learnable: bool = False,
        lsq_n: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(granularity, (PerTensor, PerChannel)):
            raise ValueError(f"QAT quantizers are per tensor or per channel, got {granularity}")
        if learnable and not symmetric and qtype.signed:
            raise ValueError("LSQ with symmetric=False needs an unsigned qtype (e.g. ql.uint4 for ReLU outputs)")
        self.qtype, self.granularity, self.symmetric = qtype, granularity, symmetric
        self.averaging_constant, self.learnable, self.lsq_n = averaging_constant, learnable, lsq_n
        self.register_buffer("min_val", torch.zeros(qparam_shape))
        self.register_buffer("max_val", torch.zeros(qparam_shape))
        self.register_buffer("zero_point", torch.zeros(qparam_shape, dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("observer_enabled", torch.tensor(True))
        if learnable:
            self.scale = nn.Parameter(torch.ones(qparam_shape))
        else:
            self.register_buffer("scale", torch.ones(qparam_shape))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the range from x and recompute (scale, zero_point); LSQ sets its scale only once."""
        s = slices(x.detach().float(), self.granularity)  # (..., n): one row per qparam pair
        lo, hi = s.amin(-1), s.amax(-1)
        c = 1.0 if not bool(self.initialized) else self.averaging_constant
        self.min_val.add_(c * (lo - self.min_val))
        self.max_val.add_(c * (hi - self.max_val))
        scale, zero_point = qparams_from_range(self.min_val, self.max_val, self.qtype, self.symmetric)
        if self.learnable:
            if not bool(self.initialized):  # paper init, zero point fixed from the first range (LSQ+ learns it)
                self.scale.copy_(lsq_init_scale(x, self.qtype, self.granularity).clamp(min=1e-8))
                self.zero_point.copy_(zero_point if not self.symmetric else torch.zeros_like(zero_point))
        else:
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and bool(self.observer_enabled)) or not bool(self.initialized):
            self.observe(x)  # ranges move only in training mode: evaluating never changes the qparams
        if self.learnable:
            g = lsq_grad_scale(self.lsq_n or x[0].numel(), self.qtype)
            return LSQFakeQuantize.apply(x, self.scale, self.zero_point, self.qtype, self.granularity, g)
        return fake_quantize_ste(x, self.scale, self.zero_point, self.qtype, self.granularity)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current (scale, zero_point), detached."""
        return self.scale.detach().clone(), self.zero_point.clone()

    def extra_repr(self) -> str:
        return f"{self.qtype!r}, {self.granularity}, symmetric={self.symmetric}, learnable={self.learnable}"


def weight_fake_quant(weight: torch.Tensor, bits: int, granularity: Granularity, learnable: bool = False) -> FakeQuantize:
    """Symmetric signed quantizer for a weight, tracking the current weight (averaging_constant=1)."""
    per_slice = slices(weight, granularity)  # (n_scales, elements per scale) or (elements,)
    fq = FakeQuantize(qtype(bits, signed=True), granularity, True, tuple(per_slice.shape[:-1]), 1.0, learnable,
                      lsq_n=per_slice.shape[-1])
    fq.observe(weight)
    return fq


def act_fake_quant(bits: int, symmetric: bool, learnable: bool = False) -> FakeQuantize:
    """Per-tensor quantizer for a layer's input: signed symmetric, or unsigned with a zero point."""
    return FakeQuantize(qtype(bits, signed=symmetric), PerTensor(), symmetric, (), 0.01, learnable)


# ----------------------------------------------------------------------------- 4) QAT layers
class FakeQuantLinear(nn.Linear):
    """nn.Linear that fake-quantizes its input and its weight on every forward (it shares the float weight)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_fq: FakeQuantize, act_fq: FakeQuantize | None) -> FakeQuantLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: optimizers keep working
        new.weight_fake_quant, new.act_fake_quant = weight_fq, act_fq
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.act_fake_quant is None else self.act_fake_quant(x)  # the input the integer layer will see
        w = self.weight_fake_quant(self.weight)  # (N, K) on the grid
        return F.linear(x, w, self.bias)


class FakeQuantConv2d(nn.Conv2d):
    """nn.Conv2d that fake-quantizes its input and its weight on every forward (it shares the float weight)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_fq: FakeQuantize, act_fq: FakeQuantize | None) -> FakeQuantConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight, new.bias = conv.weight, conv.bias
        new.weight_fake_quant, new.act_fake_quant = weight_fq, act_fq
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.act_fake_quant is None else self.act_fake_quant(x)
        w = self.weight_fake_quant(self.weight)  # (O, C, kh, kw) on the grid
        return self._conv_forward(x, w, self.bias)


# ----------------------------------------------------------------------------- 5) schedule and conversion
def qat_schedule_(
    model: nn.Module, step: int, freeze_observers_at: int | None = None, freeze_bn_at: int | None = None
) -> nn.Module:
    """Apply the QAT schedule at training step `step` (call it every step, after model.train()).

    From `freeze_observers_at` on, ranges stop moving (scales and zero points are final); from
    `freeze_bn_at` on, BatchNorm layers use and keep their running statistics (eval mode).
    """
    for m in model.modules():
        if isinstance(m, FakeQuantize):
            m.observer_enabled.fill_(freeze_observers_at is None or step < freeze_observers_at)
        if freeze_bn_at is not None and step >= freeze_bn_at and isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _to_integer(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        if bool(m.weight_fake_quant.observer_enabled):
            m.weight_fake_quant.observe(m.weight)  # the weight moved since the last forward
    wq = m.weight_fake_quant
    act = m.act_fake_quant
    if act is None:
        raise ValueError("convert_ needs activation fake quantization (act_qtype) to build an integer layer; "
                         "for weight-only QAT run ql.quantize_(model, ql.Int8WeightOnlyConfig()) or "
                         "ql.Int4WeightOnlyConfig() after training instead")
    kwargs = dict(weight_qtype=wq.qtype, weight_granularity=wq.granularity, weight_qparams=wq.qparams(),
                  act_qtype=act.qtype, act_granularity=PerTensor(), act_qparams=act.qparams())
    quant = QuantConv2d if isinstance(m, FakeQuantConv2d) else QuantLinear
    return quant.from_float(m, **kwargs)


def convert_(model: nn.Module) -> nn.Module:
    """Swap every FakeQuantLinear / FakeQuantConv2d for its integer twin (QuantLinear / QuantConv2d), in place.

    The integer layer uses exactly the codes the fake quantizers produced, so its outputs equal the QAT
    model's up to float rounding. BatchNorm stays in float (fold it first with qlab's BN folding if wanted).
    """
    model.eval()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantConv2d))]
    for name, m in targets:
        model.set_submodule(name, _to_integer(m))
    return model
