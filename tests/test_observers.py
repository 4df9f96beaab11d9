"""qlab.observers against torch.ao's observers, numpy.percentile, a naive entropy search, and qlab's own MSE."""

import math

import numpy as np
import pytest
import torch
import torch.ao.quantization.observer as tao
from hypothesis import given, settings
from hypothesis import strategies as st

import qlab as ql
from qlab.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    entropy_threshold_bin,
    kl_divergence,
    percentile,
    qparams_from_range,
)

QTYPES = [ql.int8, ql.uint8, ql.int4, ql.uint4]


def batches(n=4, shape=(16, 3, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (i + 1) + 0.3 * i for i in range(n)]


def fq_mse(x, scale, zp, qtype, g=ql.PerTensor(), dim=None):
    x_hat = ql.dequantize(ql.quantize(x, scale, zp, qtype, g), scale, zp, g)
    err = (x.double() - x_hat.double()) ** 2
    return err.mean() if dim is None else err.mean(dim=dim)


# ------------------------------------------------------------------ qparams_from_range is choose_qparams
@settings(max_examples=40, deadline=None)
@given(st.sampled_from(QTYPES), st.booleans(), st.integers(0, 2**31 - 1), st.sampled_from([0, 1]))
def test_qparams_from_range_equals_choose_qparams(qtype, symmetric, seed, axis):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 7, generator=g) * torch.rand(1, generator=g) * 10 + torch.randn(1, generator=g)
    if not qtype.signed and symmetric:
        x = x.abs()  # unsigned symmetric has no negative codes: both functions refuse negative data (test_bad_data)
    for gran, lo, hi in [
        (ql.PerTensor(), x.min(), x.max()),
        (ql.PerChannel(axis), x.amin(dim=1 - axis), x.amax(dim=1 - axis)),
    ]:
        s_ref, z_ref = ql.choose_qparams(x, qtype, gran, symmetric)
        s, z = qparams_from_range(lo, hi, qtype, symmetric)
        assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
        assert s.dtype == torch.float32 and z.dtype == torch.int32


def test_qparams_from_range_errors():
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        qparams_from_range(1.0, -1.0)
    with pytest.raises(ValueError, match="finite"):
        qparams_from_range(math.inf, -math.inf)
    with pytest.raises(ValueError, match="same|match"):
        qparams_from_range(torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="ql.QType"):
        qparams_from_range(0.0, 1.0, qtype="int8")


# ------------------------------------------------------------------ torch.ao oracle: the same numbers
@pytest.mark.parametrize(
    "torch_dtype, qtype", [(torch.quint8, ql.uint8), (torch.qint8, ql.int8)], ids=["quint8", "qint8"]
)
def test_minmax_matches_torch_ao_per_tensor_affine(torch_dtype, qtype):
    ref = tao.MinMaxObserver(dtype=torch_dtype, qscheme=torch.per_tensor_affine)
    ours = MinMaxObserver(qtype=qtype, symmetric=False)
    for x in batches():
        ref(x), ours(x)
    s_ref, z_ref = ref.calculate_qparams()
    s, z = ours.calculate_qparams()
    assert float(ours.min_val) == float(ref.min_val) and float(ours.max_val) == float(ref.max_val)
    assert float(s) == float(s_ref) and int(z) == int(z_ref)


def test_minmax_per_channel_matches_torch_ao():
    ref = tao.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.quint8, qscheme=torch.per_channel_affine)
    ours = MinMaxObserver(qtype=ql.uint8, granularity=ql.PerChannel(axis=1), symmetric=False)
    for x in batches():
        ref(x), ours(x)
    s_ref, z_ref = ref.calculate_qparams()
    s, z = ours.calculate_qparams()
    assert s.shape == (3,) and torch.equal(s, s_ref) and torch.equal(z, z_ref.to(torch.int32))


@pytest.mark.parametrize("c", [0.01, 0.3, 1.0])
def test_moving_average_matches_torch_ao(c):
    ref = tao.MovingAverageMinMaxObserver(averaging_constant=c, dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    ref_ch = tao.MovingAveragePerChannelMinMaxObserver(
        averaging_constant=c, ch_axis=1, dtype=torch.quint8, qscheme=torch.per_channel_affine
    )
    ours = MovingAverageMinMaxObserver(averaging_constant=c, qtype=ql.uint8, symmetric=False)
    ours_ch = MovingAverageMinMaxObserver(c, qtype=ql.uint8, granularity=ql.PerChannel(1), symmetric=False)
    for x in batches(6):
        ref(x), ref_ch(x), ours(x), ours_ch(x)
    assert float(ours.min_val) == float(ref.min_val) and float(ours.max_val) == float(ref.max_val)
    assert torch.equal(ours.calculate_qparams()[0], ref.calculate_qparams()[0].reshape(()))
    assert int(ours.calculate_qparams()[1]) == int(ref.calculate_qparams()[1])
    s_ref, z_ref = ref_ch.calculate_qparams()
    assert torch.equal(ours_ch.calculate_qparams()[0], s_ref)
    assert torch.equal(ours_ch.calculate_qparams()[1], z_ref.to(torch.int32))


def test_symmetric_int8_maps_to_torch_ao_full_range():
    """torch's symmetric qint8 divides absmax by 127.5 (codes [-128, 127]); qlab's by 127 (codes [-127, 127])."""
    ref = tao.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    ours = MinMaxObserver(qtype=ql.int8, symmetric=True)
    for x in batches():
        ref(x), ours(x)
    (s_ref, z_ref), (s, z) = ref.calculate_qparams(), ours.calculate_qparams()
    absmax = max(-float(ref.min_val), float(ref.max_val))
    assert float(s_ref) == pytest.approx(absmax / 127.5, rel=1e-6)
    assert float(s) == pytest.approx(absmax / 127, rel=1e-6)
    assert float(s) * 127 == pytest.approx(float(s_ref) * 127.5, rel=1e-6)
    assert int(z_ref) == 0 and int(z) == 0


def test_tiny_ranges_torch_clamps_to_eps_qlab_keeps_them():
    eps = torch.finfo(torch.float32).eps
    x = torch.linspace(0, 2.55e-7, 11)  # range / 255 = 1e-9, far below eps
    ref = tao.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    ours = MinMaxObserver(qtype=ql.uint8, symmetric=False)
    ref(x), ours(x)
    assert float(ref.calculate_qparams()[0]) == pytest.approx(eps)
    assert float(ours.calculate_qparams()[0]) == pytest.approx(1e-9, rel=1e-6)
    # an all-zero tensor: torch gives scale eps, qlab scale 1; both represent 0 exactly
    ref, ours = tao.MinMaxObserver(dtype=torch.quint8), MinMaxObserver(qtype=ql.uint8, symmetric=False)
    ref(torch.zeros(5)), ours(torch.zeros(5))
    assert float(ref.calculate_qparams()[0]) == pytest.approx(eps) and float(ours.calculate_qparams()[0]) == 1.0
    assert int(ref.calculate_qparams()[1]) == int(ours.calculate_qparams()[1]) == 0


# ------------------------------------------------------------------ behaviour shared by all observers
ALL = [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, HistogramObserver, MSEObserver]


@pytest.mark.parametrize("cls", ALL)
def test_observer_returns_input_and_sits_in_forward(cls):
    x = torch.randn(4, 8)
    obs = cls()
    assert obs(x) is x
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), cls())
    assert torch.equal(model(x), model[0](x))
    scale, zp = model[1].calculate_qparams()
    assert scale.shape == () and zp.dtype == torch.int32 and float(scale) > 0


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver])
def test_per_channel_qparams_shape(cls):
    obs = cls(qtype=ql.uint8, granularity=ql.PerChannel(axis=1), symmetric=False)
    for x in batches(2):
        obs(x)
    scale, zp = obs.calculate_qparams()
    assert scale.shape == zp.shape == (3,)
    assert str(obs).startswith(cls.__name__) and "PerChannel(axis=1)" in str(obs)


def test_observer_errors():
    with pytest.raises(ValueError, match="per-token"):
        MinMaxObserver(granularity=ql.PerToken())
    with pytest.raises(ValueError, match="seen no data"):
        MinMaxObserver().calculate_qparams()
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=0.0)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=40)
    with pytest.raises(ValueError, match="symmetric=True"):
        HistogramObserver(symmetric=False)
    with pytest.raises(ValueError, match="PerTensor"):
        HistogramObserver(granularity=ql.PerChannel(0))
    with pytest.raises(ValueError, match="bins"):
        HistogramObserver(bins=100)
    with pytest.raises(ValueError, match="num_candidates"):
        MSEObserver(num_candidates=1)
    with pytest.raises(ValueError, match="floating-point"):
        MinMaxObserver()(torch.arange(4))
    obs = MinMaxObserver(granularity=ql.PerChannel(0))
    obs(torch.randn(3, 4))
    with pytest.raises(ValueError, match="3 channels before and 5 now"):
        obs(torch.randn(5, 4))


# ------------------------------------------------------------------ percentile: numpy oracle
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.floats(0.0, 100.0), st.integers(0, 2**31 - 1))
def test_percentile_matches_numpy(n, p, seed):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed))
    ref = np.percentile(x.double().numpy(), p, axis=-1)
    assert np.allclose(percentile(x, p).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_percentile_observer_averages_batch_percentiles():
    xs = batches(3, shape=(1000,))
    sym, asym = PercentileObserver(99.0), PercentileObserver(99.0, qtype=ql.uint8, symmetric=False)
    for x in xs:
        sym(x), asym(x)
    t = np.mean([np.percentile(x.abs().numpy(), 99.0) for x in xs])
    lo = np.mean([np.percentile(x.numpy(), 1.0) for x in xs])
    hi = np.mean([np.percentile(x.numpy(), 99.0) for x in xs])
    assert float(sym.calculate_qparams()[0]) == pytest.approx(t / 127, rel=1e-5)
    s_ref, z_ref = qparams_from_range(float(lo), float(hi), ql.uint8, symmetric=False)
    s, z = asym.calculate_qparams()
    assert float(s) == pytest.approx(float(s_ref), rel=1e-5) and abs(int(z) - int(z_ref)) <= 1


# ------------------------------------------------------------------ histogram / entropy: a naive oracle
def naive_entropy_threshold_bin(hist: list[float], nq: int, start: int) -> int:
    """The GTC 2017 pseudo-code, one Python loop per step."""
    n, best, best_kl = len(hist), None, math.inf
    for i in range(start, n + 1):
        p = list(hist[:i])
        p[i - 1] += sum(hist[i:])
        q = [0.0] * i
        for level in range(nq):
            members = [j for j in range(i) if j * nq // i == level]
            nonempty = [j for j in members if hist[j] > 0]
            for j in nonempty:
                q[j] = sum(hist[j] for j in members) / len(nonempty)
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl = math.inf if qj == 0 else kl + pj / sp * math.log((pj / sp) / (qj / sq))
        if kl <= best_kl:
            best, best_kl = i, kl
    return best


@pytest.mark.parametrize("seed", range(6))
def test_entropy_threshold_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    hist = torch.poisson(torch.exp(-torch.linspace(0, 4, 64)) * 50, generator=g)  # decaying, with empty bins
    hist[torch.randint(40, 64, (2,), generator=g)] += 3  # a few outliers
    assert entropy_threshold_bin(hist, num_quantized_bins=8, start_bin=8) == naive_entropy_threshold_bin(
        hist.tolist(), 8, 8
    )


def test_kl_divergence_basics():
    assert kl_divergence([1, 1], [2, 2]) == 0.0
    assert kl_divergence([1, 1], [1, 0]) == math.inf
    assert kl_divergence([1, 0], [1, 1]) == pytest.approx(math.log(2))
    assert kl_divergence([0, 3], [0, 0]) == math.inf  # Q has no mass at all


def gaussian_with_outliers(n=50_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:20] = 40.0 * torch.sign(torch.randn(20, generator=g))
    return x


def test_histogram_clips_outliers_and_beats_minmax_on_the_bulk():
    x = gaussian_with_outliers()
    hist_obs, mm = HistogramObserver(), MinMaxObserver()
    for chunk in x.chunk(4):
        hist_obs(chunk), mm(chunk)
    s_h, z_h = hist_obs.calculate_qparams()
    s_m, z_m = mm.calculate_qparams()
    assert float(s_h) * 127 < 0.25 * 40  # the threshold sits far below the absmax
    assert float(s_h) * 127 > 3.0  # ... but keeps the Gaussian's bulk
    bulk = x[20:]
    assert fq_mse(bulk, s_h, z_h, ql.int8) < 0.1 * fq_mse(bulk, s_m, z_m, ql.int8)


def test_histogram_rebinning_is_exact():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5000, generator=g), 5 * torch.randn(5000, generator=g)  # x2 grows the range ~4x
    obs = HistogramObserver(bins=256, qtype=ql.int4)
    obs(x1), obs(x2)
    a = torch.cat([x1, x2]).abs().double()
    r = float(x1.abs().max()) * 2 ** math.ceil(math.log2(float(x2.abs().max()) / float(x1.abs().max())))
    assert float(obs.hist_max) == pytest.approx(r)
    ref = torch.bincount((a / r * 256).floor().long().clamp(max=255), minlength=256).double()
    assert obs.hist.sum() == ref.sum() == 10_000
    assert (obs.hist - ref).abs().sum() <= 2  # only x1's maximum (closed last bin) may move by one bin


def test_histogram_ignores_exact_zeros_and_handles_all_zero():
    relu_out = torch.relu(torch.randn(10_000, generator=torch.Generator().manual_seed(0)))
    obs = HistogramObserver(qtype=ql.uint8)
    obs(relu_out)
    assert obs.hist.sum() == (relu_out > 0).sum()
    assert obs.num_quantized_bins == 256
    zeros = HistogramObserver()
    zeros(torch.zeros(10))
    assert float(zeros.calculate_qparams()[0]) == 1.0


# ------------------------------------------------------------------ MSE observer: never worse than MinMax
DISTRIBUTIONS = ["normal", "outliers", "uniform", "laplace"]


def sample(kind, n, g):
    if kind == "normal":
        return torch.randn(n, generator=g)
    if kind == "uniform":
        return torch.rand(n, generator=g) * 4 - 1
    if kind == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -u.sign() * torch.log1p(-2 * u.abs())
    x = torch.randn(n, generator=g)
    x[:3] *= 30
    return x


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(DISTRIBUTIONS), st.sampled_from(QTYPES), st.booleans(), st.integers(0, 2**31 - 1))
def test_mse_observer_never_worse_than_minmax(kind, qtype, symmetric, seed):
    x = sample(kind, 2000, torch.Generator().manual_seed(seed))
    if not qtype.signed and symmetric:
        x = x.abs()  # unsigned symmetric has no negative codes: negative data is refused (test_bad_data)
    obs = MSEObserver(qtype=qtype, symmetric=symmetric, num_candidates=50)
    obs(x)
    s, z = obs.calculate_qparams()
    s_m, z_m = ql.choose_qparams(x, qtype, symmetric=symmetric)
    assert fq_mse(x, s, z, qtype) <= fq_mse(x, s_m, z_m, qtype) * (1 + 1e-6)


def test_mse_observer_per_channel_never_worse_than_minmax_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 500, generator=g) * torch.logspace(-1, 1, 6).unsqueeze(1)
    x[2, :2] = 25.0
    gran = ql.PerChannel(axis=0)
    obs = MSEObserver(qtype=ql.int4, granularity=gran)
    obs(x)
    s, z = obs.calculate_qparams()
    s_m, z_m = ql.choose_qparams(x, ql.int4, gran)
    ours, minmax = fq_mse(x, s, z, ql.int4, gran, dim=1), fq_mse(x, s_m, z_m, ql.int4, gran, dim=1)
    assert (ours <= minmax * (1 + 1e-6)).all() and ours.sum() < 0.9 * minmax.sum()


def test_mse_observer_bounded_memory_still_tracks_exact_range():
    obs = MSEObserver(max_samples=1000)
    xs = batches(3, shape=(5000,))
    for x in xs:
        obs(x)
    assert sum(s.numel() for s in obs.samples) == 3000
    assert float(obs.max_val) == max(float(x.max()) for x in xs)
    assert float(obs.calculate_qparams()[0]) <= max(float(x.abs().max()) for x in xs) / 127 + 1e-9


@pytest.mark.parametrize("make", [lambda: ql.MinMaxObserver(granularity=ql.PerChannel(0)), lambda: ql.HistogramObserver(),
                                  lambda: ql.PercentileObserver(percentile=99.0), lambda: ql.MovingAverageMinMaxObserver()])
def test_a_calibrated_observer_round_trips_through_state_dict(make):
    torch.manual_seed(0)
    obs = make()
    for _ in range(3):
        obs(torch.randn(4, 64) * 3)
    fresh = make()
    fresh.load_state_dict(obs.state_dict())
    assert int(fresh.num_batches) == 3
    for a, b in zip(obs.calculate_qparams(), fresh.calculate_qparams()):
        assert torch.equal(a, b)
    x = torch.randn(4, 64)  # and it keeps observing where the original left off
    obs(x), fresh(x)
    assert torch.equal(obs.calculate_qparams()[0], fresh.calculate_qparams()[0])
