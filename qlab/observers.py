"""Observers: watch activations during calibration, then choose their (scale, zero_point).

Static quantization fixes an activation's qparams before deployment, from a few calibration batches.
An observer sits on one tensor, accumulates a statistic over every batch it sees, and turns it into
qparams at the end:

    obs = MinMaxObserver()                      # ql.int8, per tensor, symmetric
    for x in batches:
        obs(x)                                  # accumulates; returns x unchanged
    scale, zero_point = obs.calculate_qparams()

The five observers differ only in the range [min_val, max_val] they hand to `qparams_from_range`:

    MinMaxObserver               the running min and max: never clips, but one outlier stretches the grid
    MovingAverageMinMaxObserver  an exponential moving average of each batch's min and max
    PercentileObserver           the p-th percentile of each batch (p = 99.99 clips the top 0.01 %), averaged
    HistogramObserver            TensorRT's entropy calibration: the threshold whose int8 histogram is closest
                                 (in KL divergence) to the float one
    MSEObserver                  the clipping ratio of the min/max range with the least quantization MSE

Qparams follow qlab's conventions (see `qlab.core.primitives`): `qparams_from_range(x.min(), x.max(), ...)`
equals `ql.choose_qparams(x, ...)`. Observers support `ql.PerTensor()` and `ql.PerChannel(axis)` (e.g. axis=1
for conv activations (B, C, H, W)); per-token and per-group scales depend on the token, so they are chosen
at run time (dynamic quantization) with `ql.choose_qparams`, not calibrated.

Relation to `torch.ao.quantization.observer`: MinMax / MovingAverage / PerChannel asymmetric qparams are the
same numbers. Two documented differences:
  * torch's symmetric qint8 uses the full range [-128, 127] with scale = absmax / 127.5; qlab's symmetric
    int8 uses the restricted range [-127, 127] with scale = absmax / 127 (so 0 sits exactly in the middle).
  * torch clamps scale to at least float32 eps (1.19e-7); qlab keeps tiny ranges exact and only falls back
    to scale = 1 when the range is (numerically) zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from .core.checks import check_finite
from .core.granularity import Granularity, PerChannel, PerTensor, PerToken, slices
from .core.primitives import _check_float, _check_qtype, choose_qparams, dequantize, quantize
from .core.qtypes import QType, int8


def qparams_from_range(
    min_val: torch.Tensor | float,
    max_val: torch.Tensor | float,
    qtype: QType = int8,
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) whose grid covers [min_val, max_val], with `ql.choose_qparams`'s conventions.

    symmetric:  zero_point = 0, scale = max(|min_val|, |max_val|) / qmax
    asymmetric: widen to [min(min_val, 0), max(max_val, 0)], scale = (max - min) / (qmax - qmin),
                zero_point = clamp(round(qmin - min / scale), qmin, qmax)
    A (numerically) zero range gets scale = 1.

    Args:
        min_val, max_val: floats or tensors of one shape (one entry per channel), min_val <= max_val.
    Returns:
        scale (float32) and zero_point (int32), shaped like min_val.
    """
    _check_qtype(qtype)
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32, device=lo.device)
    if lo.shape != hi.shape:
        raise ValueError(f"min_val has shape {tuple(lo.shape)} but max_val has shape {tuple(hi.shape)}; they must match")
    hint = ("a range must be finite; NaN or Inf here comes from NaN or Inf in the observed data (clean or mask it) "
            "or from a corrupted state_dict")
    check_finite(lo, "min_val", hint)
    check_finite(hi, "max_val", hint)
    if bool((lo > hi).any()):
        raise ValueError("min_val must be <= max_val everywhere; pass (min, max) in that order")
    # choose_qparams on the two-element slice [lo, hi] applies exactly its conventions, slice by slice
    return choose_qparams(torch.stack([lo, hi], dim=-1), qtype, PerToken(), symmetric)


class Observer(nn.Module):
    """Base class: validates the settings, views each input as slices, and turns a range into qparams.

    A subclass implements `_observe(s)`, where `s` is `x` viewed so that each slice sharing one qparam pair
    lies along the last axis ((N,) per tensor, (C, N) per channel), and `_range() -> (min_val, max_val)`.
    """

    granularities: tuple[type, ...] = (PerTensor, PerChannel)

    def __init__(self, qtype: QType = int8, granularity: Granularity = PerTensor(), symmetric: bool = True) -> None:
        super().__init__()
        _check_qtype(qtype)
        if not isinstance(granularity, self.granularities):
            allowed = " or ".join(f"ql.{g.__name__}()" for g in self.granularities)
            raise ValueError(
                f"{type(self).__name__} supports {allowed}, got {granularity!r}; per-token and per-group "
                f"activation scales depend on the input, so choose them at run time with ql.choose_qparams"
            )
        self.qtype, self.granularity, self.symmetric = qtype, granularity, bool(symmetric)
        # statistics are buffers from the start, so a calibrated observer round-trips through state_dict
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("min_val", None)  # () or (C,), set by the first batch (range observers)
        self.register_buffer("max_val", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name, current in list(self._buffers.items()):  # take the saved shapes: (C,) is known only after data
            saved = state_dict.get(prefix + name)
            if saved is not None and (current is None or current.shape != saved.shape):
                self._buffers[name] = saved.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Accumulate statistics of `x`; return `x` unchanged (so an observer can sit inside a forward)."""
        _check_float(x)
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__} got an empty tensor of shape {tuple(x.shape)}")
        check_finite(x, f"{type(self).__name__}'s input",
                     "clean or mask the data (one NaN would make the whole range NaN, one Inf the scale Inf)")
        s = slices(x.detach().float(), self.granularity)  # (N,) per tensor, (C, N) per channel
        if self.num_batches and self.min_val is not None and s.shape[:-1] != self.min_val.shape:
            raise ValueError(
                f"{type(self).__name__} saw {self.min_val.shape[0] if self.min_val.dim() else 1} channels before and {s.shape[0]} now; "
                f"one observer watches one tensor (check {self.granularity!r} and the input's shape)"
            )
        self._observe(s)
        self.num_batches += 1
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int32) of shape () per tensor or (C,) per channel."""
        if self.num_batches == 0:
            raise ValueError(f"{type(self).__name__} has seen no data; call it on calibration batches first: obs(x)")
        min_val, max_val = self._range()
        return qparams_from_range(min_val, max_val, self.qtype, self.symmetric)

    def _observe(self, s: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"qtype={self.qtype!r}, granularity={self.granularity!r}, symmetric={self.symmetric}"


class MinMaxObserver(Observer):
    """The running minimum and maximum over all batches (torch.ao's MinMaxObserver / PerChannelMinMaxObserver)."""

    def _observe(self, s: torch.Tensor) -> None:
        lo, hi = s.amin(dim=-1), s.amax(dim=-1)  # () or (C,)
        if self.num_batches:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.register_buffer("min_val", lo)
        self.register_buffer("max_val", hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """An exponential moving average of each batch's min and max (torch.ao's MovingAverageMinMaxObserver).

        min_val <- min_val + c * (batch_min - min_val)       c = averaging_constant; the first batch sets it

    Used during QAT, where the network (and its ranges) changes as it trains; a small c forgets slowly.
    """

    def __init__(self, averaging_constant: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(
                f"averaging_constant={averaging_constant} must be in (0, 1]: 0.01 averages over ~100 batches, "
                f"1 keeps only the latest batch"
            )
        self.averaging_constant = float(averaging_constant)

    def _observe(self, s: torch.Tensor) -> None:
        lo, hi = s.amin(dim=-1), s.amax(dim=-1)  # () or (C,)
        if self.num_batches:
            c = self.averaging_constant
            lo = self.min_val + c * (lo - self.min_val)
            hi = self.max_val + c * (hi - self.max_val)
        self.register_buffer("min_val", lo)
        self.register_buffer("max_val", hi)


def percentile(s: torch.Tensor, p: float) -> torch.Tensor:
    """The p-th percentile (0..100) along the last axis, interpolated linearly like numpy.percentile.

    Uses torch.kthvalue, so it works on tensors of any size (torch.quantile stops at 16M elements).
    """
    n = s.shape[-1]
    pos = p / 100.0 * (n - 1)  # fractional rank, 0-based
    k = math.floor(pos)
    below = torch.kthvalue(s, k + 1, dim=-1).values
    above = torch.kthvalue(s, min(k + 2, n), dim=-1).values
    return below + (pos - k) * (above - below)


class PercentileObserver(Observer):
    """Clip at the p-th percentile of each batch, averaged over batches.

    symmetric:  range [-t, t] with t = percentile(|x|, p)
    asymmetric: range [percentile(x, 100 - p), percentile(x, p)]
    percentile=99.99 ignores the largest 0.01 % of values, which is where a MinMax range is decided.
    """

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile} must be in (50, 100], e.g. 99.99 (100 is MinMax)")
        self.percentile = float(percentile)

    def _observe(self, s: torch.Tensor) -> None:
        if self.symmetric:
            hi = percentile(s.abs(), self.percentile)
            lo = -hi
        else:
            lo, hi = percentile(s, 100.0 - self.percentile), percentile(s, self.percentile)
        if self.num_batches:  # running mean of the per-batch percentiles
            n = int(self.num_batches)
            lo, hi = (self.min_val * n + lo) / (n + 1), (self.max_val * n + hi) / (n + 1)
        self.register_buffer("min_val", lo)
        self.register_buffer("max_val", hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


def kl_divergence(p, q) -> float:
    """KL(P || Q) = sum_i p_i log(p_i / q_i) over p_i > 0, of two histograms (normalised here).

    Infinite if Q is 0 somewhere P is not (Q cannot explain values that P has).
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    support = p > 0
    if (q[support] == 0).any():
        return math.inf
    p, q = p[support] / p.sum(), q[support] / q.sum()
    return float((p * np.log(p / q)).sum())


def entropy_threshold_bin(hist: torch.Tensor, num_quantized_bins: int = 128, start_bin: int | None = None) -> int:
    """TensorRT's entropy calibration: how many histogram bins of |x| to keep before clipping.

    Migacz, "8-bit Inference with TensorRT", GTC 2017,
    https://on-demand.gputechconf.com/gtc/2017/presentation/s7310-8-bit-inference-with-tensorrt.pdf

    For each candidate i in [start_bin, len(hist)] (threshold = the right edge of bin i - 1):
      1) P = hist[:i] with every clipped count (hist[i:]) folded into its last bin: the clipped float data.
      2) Q = hist[:i] merged into `num_quantized_bins` levels, each level's count spread evenly over its
         non-empty bins (empty bins stay empty): what the quantized data looks like at that resolution.
      3) KL(P || Q).
    Returns the i with the smallest divergence; ties go to the largest i, which clips least (as in NVIDIA's
    pytorch-quantization): on discrete data such as 8-bit images several thresholds reach KL = 0, and
    only the largest one keeps every value. The histogram is small (2048 bins), so the search runs on
    the CPU in NumPy.

    Args:
        hist: (bins,) non-negative counts of |x| over [0, range], not all zero.
        num_quantized_bins: codes on [0, threshold]: qmax + 1 (128 for int8, 256 for uint8).
        start_bin: smallest candidate (default num_quantized_bins: never fewer bins than levels).
    """
    h = np.asarray(torch.as_tensor(hist).detach().cpu(), dtype=np.float64)
    n = h.size
    start_bin = num_quantized_bins if start_bin is None else start_bin
    if h.ndim != 1 or not num_quantized_bins <= start_bin <= n:
        raise ValueError(
            f"need a 1-D histogram with num_quantized_bins={num_quantized_bins} <= start_bin={start_bin} <= "
            f"bins={n}; use more bins (e.g. 2048 for int8)"
        )
    if not h.sum() > 0:
        raise ValueError("the histogram is empty (all counts zero); observe some non-zero data first")
    kept = np.cumsum(h)  # kept[i - 1] = count in the first i bins
    best_i, best_kl = start_bin, math.inf
    for i in range(start_bin, n + 1):
        # 1) P: clip at bin i, outliers land in the last kept bin
        p = h[:i].copy()
        p[-1] += kept[-1] - kept[i - 1]
        # 2) Q: bin j goes to level floor(j * nq / i); spread each level's count over its non-empty bins
        level = np.arange(i) * num_quantized_bins // i  # (i,)
        nonempty = (h[:i] > 0).astype(np.float64)  # (i,)
        level_count = np.bincount(level, weights=h[:i], minlength=num_quantized_bins)  # (nq,)
        level_bins = np.bincount(level, weights=nonempty, minlength=num_quantized_bins)  # (nq,)
        q = nonempty * level_count[level] / np.maximum(level_bins[level], 1)  # (i,)
        # 3) divergence; on a tie keep the larger threshold
        kl = kl_divergence(p, q)
        if kl <= best_kl:
            best_i, best_kl = i, kl
    return best_i


class HistogramObserver(Observer):
    """Entropy (KL-divergence) calibration on a histogram of |x|, TensorRT style; symmetric, per tensor.

    Migacz, "8-bit Inference with TensorRT", GTC 2017,
    https://on-demand.gputechconf.com/gtc/2017/presentation/s7310-8-bit-inference-with-tensorrt.pdf

    Accumulates `bins` counts of |x| over [0, hist_max]. When a batch exceeds the range, the range doubles
    (as often as needed) and every two neighbouring bins merge into one: exact, no interpolation.
    `calculate_qparams` picks the threshold t with `entropy_threshold_bin` and returns scale = t / qmax.

    Exact zeros (ReLU outputs are often half zeros) are left out of the histogram: every scale represents
    0 exactly, and a spike in bin 0 would otherwise drag the threshold down (smaller thresholds put that
    spike in a narrower quantized bin 0, which KL rewards). TensorRT-style tools flatten bin 0 for the
    same reason.
    """

    granularities = (PerTensor,)

    def __init__(self, bins: int = 2048, **kwargs) -> None:
        super().__init__(**kwargs)
        if not self.symmetric:
            raise ValueError(
                "HistogramObserver searches a symmetric threshold on |x| (TensorRT's entropy calibration); "
                "use symmetric=True, or MSEObserver / MinMaxObserver for an asymmetric range"
            )
        self.num_quantized_bins = self.qtype.qmax + 1  # codes on [0, t]: 128 for int8
        if bins % 2 or bins < self.num_quantized_bins:
            raise ValueError(f"bins={bins} must be even and >= {self.num_quantized_bins} for {self.qtype!r}; try 2048")
        self.bins = bins
        self.register_buffer("hist", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("hist_max", torch.zeros((), dtype=torch.float64))

    def _observe(self, s: torch.Tensor) -> None:
        a = s.abs().double()  # (N,)
        a = a[a > 0]  # (N_nonzero,): zeros are exact at every scale
        if a.numel() == 0:
            return
        absmax = a.max()
        if self.hist_max == 0:
            self.hist_max = absmax  # the first non-zero batch sets the range
        while absmax > self.hist_max:  # double the range: bins (2j, 2j+1) -> j, upper half empty
            merged = self.hist.view(-1, 2).sum(dim=1)  # (bins/2,)
            self.hist = torch.cat([merged, torch.zeros_like(merged)])
            self.hist_max = self.hist_max * 2
        idx = (a / self.hist_max * self.bins).floor().long().clamp(max=self.bins - 1)  # (N_nonzero,)
        self.hist += torch.bincount(idx, minlength=self.bins).double()

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hist_max == 0:  # only zeros seen: any scale is exact
            return torch.zeros(()), torch.zeros(())
        i = entropy_threshold_bin(self.hist, self.num_quantized_bins)
        t = (self.hist_max * i / self.bins).float()
        return -t, t


class MSEObserver(MinMaxObserver):
    """Grid search over clipping ratios of the min/max range for the least quantization MSE.

    For each ratio r in linspace(min_ratio, 1, num_candidates), the range [r * min, r * max] is quantized
    and dequantized (ql.quantize / ql.dequantize); each slice (the tensor, or each channel) keeps the r with
    the smallest mean squared error. r = 1 is MinMax, so the result is never worse than MinMax on the data.

    The min/max are tracked exactly; the MSE is measured on at most `max_samples` values (a seeded random
    subset of every batch, then of their union), so memory and time stay bounded on big activations.
    """

    def __init__(
        self, num_candidates: int = 100, min_ratio: float = 0.01, max_samples: int = 2**15, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if num_candidates < 2 or not 0.0 < min_ratio < 1.0:
            raise ValueError(
                f"num_candidates={num_candidates} must be >= 2 and min_ratio={min_ratio} in (0, 1); "
                f"e.g. 100 ratios in [0.01, 1]"
            )
        if max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be a positive number of values to search the MSE on")
        self.ratios = torch.linspace(min_ratio, 1.0, num_candidates)
        self.max_samples = max_samples
        self.samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(0)

    def _observe(self, s: torch.Tensor) -> None:
        super()._observe(s)  # the exact running min / max
        self.samples.append(self._subsample(s).clone())

    def _subsample(self, s: torch.Tensor) -> torch.Tensor:
        """At most max_samples values in all: the same random columns of every slice."""
        keep = max(1, self.max_samples // s[..., 0].numel())  # values per slice
        if s.shape[-1] <= keep:
            return s
        cols = torch.randperm(s.shape[-1], generator=self._generator)[:keep].to(s.device)
        return s[..., cols]

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._subsample(torch.cat(self.samples, dim=-1))  # (N,) or (C, N)
        g = PerTensor() if s.dim() == 1 else PerChannel(axis=0)
        errors = []
        for r in self.ratios.tolist():
            scale, zp = qparams_from_range(r * self.min_val, r * self.max_val, self.qtype, self.symmetric)
            s_hat = dequantize(quantize(s, scale, zp, self.qtype, g), scale, zp, g)
            errors.append(((s - s_hat) ** 2).mean(dim=-1))  # () or (C,)
        best = self.ratios.to(s.device)[torch.stack(errors).argmin(dim=0)]  # () or (C,): first minimum
        return best * self.min_val, best * self.max_val
