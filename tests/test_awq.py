"""AWQ: the quantizer on hand cases, the scale and clip searches against brute force over the same grids
(written here from llm-awq's stated rules), exactness of applying the scales, and the model walker."""

import copy

import pytest
import torch
from torch import nn

import qlab as ql
from qlab import awq


def spec_pseudo_quantize(w, bits, gs):
    """llm-awq's pseudo_quantize_tensor as its docs state it, element by element per group."""
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for n in range(w.shape[0]):
        for g0 in range(0, w.shape[1], gs):
            g = w[n, g0:g0 + gs]
            s = max(float(g.max() - g.min()), 1e-5) / maxq
            z = min(max(-round(float(g.min()) / s), 0), maxq)
            q = torch.clamp(torch.round(g / s) + z, 0, maxq)
            out[n, g0:g0 + gs] = (q - z) * s
    return out


def test_pseudo_quantize_hand_cases():
    # an all-positive group keeps min = 1 (no widening to 0): zero clamps to 0 and 2.0 clips to 15 * (1/15)
    w = torch.tensor([[1.0, 2.0]])
    assert torch.allclose(awq.pseudo_quantize(w, 4, 2), torch.tensor([[1.0, 1.0]]))
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])  # [-1, 2]: scale 0.2, zero 5; 0.6 / 0.2 = 3
    codes, scale, zero = awq.quantize_codes(w, 4, 4)
    assert torch.allclose(scale, torch.tensor([[0.2]])) and zero.item() == 5
    assert codes.tolist() == [[0.0, 5.0, 8.0, 15.0]]


def test_pseudo_quantize_matches_spec_loop():
    w = torch.randn(8, 64)
    for bits, gs in ((4, 16), (3, 32)):
        assert torch.allclose(awq.pseudo_quantize(w, bits, gs), spec_pseudo_quantize(w, bits, gs), atol=1e-6)
    qt = awq.to_qtensor(w, 4, 16)
    assert torch.allclose(qt.dequantize(), awq.pseudo_quantize(w, 4, 16), atol=1e-6)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _salient_inputs(n=256, K=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, K, generator=g)
    x[:, [2, 9]] *= 25  # two salient input channels
    return x


def test_scale_search_equals_brute_force_over_the_same_grid():
    torch.manual_seed(0)
    block = TwoLayer()
    x = _salient_inputs()
    s = awq.search_scales(block, x, [block.fc1], qtype=3, group_size=16, n_grid=20)
    # brute force: every r in {0, 0.05, ..., 0.95}, the block's output MSE with Q(W s)/s, computed from scratch
    ref_out = block(x).detach()
    x_mean = x.abs().mean(dim=0)
    best = None
    for i in range(20):
        r = i / 20
        sc = x_mean.pow(r).clamp(min=1e-4)
        sc = sc / torch.sqrt(sc.max() * sc.min())
        b = copy.deepcopy(block)
        with torch.no_grad():
            b.fc1.weight.copy_(spec_pseudo_quantize(block.fc1.weight * sc, 3, 16) / sc)
        loss = float((b(x).detach() - ref_out).pow(2).mean())
        if best is None or loss < best[0]:
            best = (loss, sc)
    assert torch.allclose(s, best[1], rtol=1e-5)
    assert not torch.allclose(s, torch.ones_like(s))  # salient channels: r > 0 wins
    assert s[2] > 2 * s.median() and s[9] > 2 * s.median()
    losses = awq.scale_grid_losses(block, x, [block.fc1], 3, 16, 20)
    assert [r for r, _ in losses] == [i / 20 for i in range(20)]  # r = 1.0 is not in the grid
    assert torch.allclose(block(x), ref_out)  # and the weights were restored


def test_duo_scaling_is_autoawq_formula():
    lin = nn.Linear(32, 8)
    x_mean = torch.rand(32) + 0.1
    w_mean = awq._weight_mean([lin], 16)
    W = lin.weight.detach().abs().reshape(8, 2, 16)
    ref_w = (W / (W.amax(dim=-1, keepdim=True) + 1e-6)).reshape(8, 32).mean(dim=0)
    assert torch.allclose(w_mean, ref_w)
    s = awq.scales_for_ratio(x_mean, 0.5, w_mean)
    ref = (x_mean.pow(0.5) / (ref_w.pow(0.5) + 1e-4)).clamp(min=1e-4)
    assert torch.allclose(s, ref / torch.sqrt(ref.max() * ref.min()))


def test_clip_search_equals_brute_force():
    torch.manual_seed(1)
    lin = nn.Linear(32, 64)
    x = torch.randn(300, 32)
    best = awq.search_clip(lin, x, qtype=3, group_size=16, n_grid=20, max_shrink=0.5)
    assert best.shape == (64, 2)
    xs = x[:: max(1, 300 // 512)]
    W = lin.weight.detach()
    for n in (0, 17, 63):
        for g in (0, 1):
            w, xg = W[n, g * 16:(g + 1) * 16], xs[:, g * 16:(g + 1) * 16]
            errs = []
            for i in range(10):
                m = w.abs().max() * (1 - i / 20)
                wq = spec_pseudo_quantize(torch.clamp(w, -m, m)[None], 3, 16)[0]
                errs.append((float((xg @ wq - xg @ w).pow(2).mean()), float(m)))
            expected = min(errs, key=lambda e: e[0])[1]  # first minimum, as a strict < keeps it
            assert abs(float(best[n, g]) - expected) < 1e-6 * max(1.0, expected)
    with pytest.raises(ValueError, match="must divide in_features=32"):
        awq.search_clip(lin, x, group_size=12)


def test_applying_scales_leaves_the_float_model_unchanged():
    model = ql.models.tiny_gpt()
    calib = ql.data.lm_calibration_batches(n_batches=1, batch_size=2, seq_len=128, seed=0)
    x = calib[0]
    with torch.no_grad():
        ref = model(x)
    report = awq.apply(model, ql.AWQConfig(qtype=3, clip=False, quantize_weights=False, record_losses=True),
                       calib, progress=False)
    assert isinstance(model.blocks[0].mlp.act, awq.ScaledActivation)  # GELU -> c_proj scaled through the act
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-4 * ref.abs().max().item())
    assert len(report.losses) == 16 and all(len(c) == 20 for c in report.losses.values())
    assert any(r > 0 for r in report.ratios.values())


@pytest.fixture(scope="module")
def calib():
    return ql.data.lm_calibration_batches(n_batches=2, batch_size=4, seq_len=128, seed=0)


def test_awq_model_swaps_and_clips(calib):
    model = ql.models.tiny_gpt()
    report = awq.apply(model, ql.AWQConfig(qtype=4, group_size=128), calib, progress=False)
    assert "blocks.0.attn.c_attn" not in report.clipped  # fused q|k|v: the clip search skips it
    assert "blocks.0.mlp.c_fc" in report.clipped and "blocks.3.attn.c_proj" in report.clipped
    lin = model.blocks[1].mlp.c_fc
    assert isinstance(lin, ql.Int4WeightOnlyLinear) and not lin.symmetric


def test_awq_recovers_injected_salient_channels():
    """A function-preserving outlier (input channel x 30, its weight column / 30): RTN's groups crush the small
    column; AWQ's scale search puts it back."""
    torch.manual_seed(0)
    ln, fc = nn.LayerNorm(64), nn.Linear(64, 64)
    with torch.no_grad():
        ln.weight[5] *= 30
        fc.weight[:, 5] /= 30
    block = nn.Sequential(ln, fc)
    x = torch.randn(512, 64)
    h = ln(x).detach()
    ref = fc(h)

    def err(weight):
        return float((h @ weight.t() + fc.bias - ref).detach().pow(2).mean())

    e_rtn = err(awq.pseudo_quantize(fc.weight.detach(), 3, 32))
    s = awq.search_scales(fc, h, [fc], qtype=3, group_size=32)
    W = fc.weight.detach()
    e_awq = err(awq.pseudo_quantize(W * s, 3, 32) / s)
    assert s[5] > 3 * s.median()
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    del block


def test_student_scales_are_checked(calib):
    def bad(block, x, linears, **kw):
        return -torch.ones(x.shape[-1])

    with pytest.raises(ValueError, match="finite positive scales"):
        awq.apply(ql.models.tiny_gpt(), ql.AWQConfig(), calib[:1], search_scales_fn=bad, progress=False)
    calls = []

    def student(block, x, linears, **kw):
        calls.append(kw)
        return awq.search_scales(block, x, linears, **kw)

    awq.apply(ql.models.tiny_gpt(), ql.AWQConfig(clip=False), calib[:1], search_scales_fn=student, progress=False)
    assert len(calls) == 16 and calls[0]["group_size"] == 128


def test_awq_config_errors():
    with pytest.raises(ValueError, match="max_shrink"):
        ql.AWQConfig(max_shrink=1.5)
    with pytest.raises(ValueError, match="awq_mappings"):
        awq.apply(TwoLayer(), ql.AWQConfig(), [torch.randn(2, 32)], progress=False)
    with pytest.raises(ValueError, match="needs calib_data"):
        ql.quantize_(ql.models.tiny_gpt(), ql.AWQConfig())
