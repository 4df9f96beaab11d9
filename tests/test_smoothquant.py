"""SmoothQuant: the paper's scales by hand, exactness of the float model after smoothing, and the collapse of
naive W8A8 on outlier channels that smoothing repairs, measured on the tiny GPT."""

import copy

import pytest
import torch

import qlab as ql
from qlab import smoothquant


def test_smoothing_scales_by_hand():
    act, w = torch.tensor([16.0, 1.0, 0.0]), torch.tensor([0.25, 1.0, 4.0])
    s = smoothquant.smoothing_scales(act, w, alpha=0.5)
    # sqrt(16) / sqrt(0.25) = 8; sqrt(1) / sqrt(1) = 1; an all-zero channel: sqrt(1e-5) / sqrt(4), finite
    torch.testing.assert_close(s, torch.tensor([8.0, 1.0, (1e-5) ** 0.5 / 2.0]))
    torch.testing.assert_close(smoothquant.smoothing_scales(act, w, alpha=1.0), torch.tensor([16.0, 1.0, 1e-5]))
    torch.testing.assert_close(smoothquant.smoothing_scales(act, w, alpha=0.0), torch.tensor([4.0, 1.0, 0.25]))
    with pytest.raises(ValueError, match="alpha=1.5 must be in"):
        smoothquant.smoothing_scales(act, w, alpha=1.5)
    with pytest.raises(ValueError, match="must both be"):
        smoothquant.smoothing_scales(act, w[:2])


def gpt_and_data():
    torch.manual_seed(0)
    model = ql.models.tiny_gpt(pretrained=True).eval()
    calib = ql.data.lm_calibration_batches(2, batch_size=4, seq_len=64)
    tokens = ql.data.lm_calibration_batches(1, batch_size=4, seq_len=64, seed=1)[0]
    return model, calib, tokens


def inject_outliers_(model, channels=(7, 100, 200), factor=40.0):
    """Scale a few channels of every norm output and undo it in the linears they feed: the float model is
    unchanged, but its activations now have the 10-100x outlier channels of large LLMs."""
    with torch.no_grad():
        for norm, linears in model.smoothquant_mappings():
            ln = model.get_submodule(norm)
            ln.weight[list(channels)] *= factor
            ln.bias[list(channels)] *= factor
            for name in linears:
                model.get_submodule(name).weight[:, list(channels)] /= factor


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_smoothing_leaves_the_float_model_unchanged():
    model, calib, tokens = gpt_and_data()
    with torch.no_grad():
        ref = model(tokens)
        smoothed = copy.deepcopy(model)
        scales = smoothquant.smooth_(smoothed, calib, alpha=0.5)
        assert rel(smoothed(tokens), ref) <= 1e-5
    assert len(scales) == 2 * len(model.blocks) and all(torch.isfinite(s).all() and (s > 0).all() for s in scales.values())


def test_smoothquant_repairs_w8a8_on_outlier_channels():
    model, calib, tokens = gpt_and_data()
    inject_outliers_(model)
    with torch.no_grad():
        ref = model(tokens)
        naive = ql.quantize_(copy.deepcopy(model), ql.Int8StaticConfig(exclude="lm_head"), calib_data=calib)
        smooth = ql.quantize_(copy.deepcopy(model), [ql.SmoothQuantConfig(alpha=0.5),
                                                     ql.Int8StaticConfig(exclude="lm_head")], calib_data=calib)
        err_naive, err_smooth = rel(naive(tokens), ref), rel(smooth(tokens), ref)
    assert err_smooth < err_naive / 2, (err_naive, err_smooth)
    sweep = smoothquant.alpha_sweep(model, calib, [0.0, 0.5], lambda m: rel(m(tokens), ref),
                                    ql.Int8StaticConfig(exclude="lm_head"))
    assert [a for a, _ in sweep] == [0.0, 0.5]
    assert sweep[1][1] == pytest.approx(err_smooth, rel=1e-4)  # the sweep's alpha=0.5 is the recipe above
    assert all(err < err_naive for _, err in sweep)


def test_mappings_must_name_real_modules():
    model, calib, _ = gpt_and_data()
    with pytest.raises(ValueError, match="does not have; its modules are"):
        smoothquant.smooth_(model, calib, mappings=[("blocks.0.ln_9", ("blocks.0.attn.c_attn",))])
    with pytest.raises(ValueError, match="has no smoothquant_mappings"):
        smoothquant.smooth_(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)), [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="in_features=8 cannot read a norm of 4"):
        smoothquant.apply_smoothing_(torch.nn.LayerNorm(4), [torch.nn.Linear(8, 2)], torch.ones(4))
    with pytest.raises(ValueError, match="needs calib_data"):
        ql.quantize_(model, ql.SmoothQuantConfig())
