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
    return float((a - b).detach().norm() / b.detach().norm())


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


# ----------------------------------------------------------------------------- post-LN: explicit smoothing (MiniLM)
EVAL_SENTENCES = [
    "The cat sat on the mat.", "A cat was sitting on the rug.", "Stock markets fell sharply on Monday.",
    "Share prices dropped steeply at the start of the week.", "How do I bake sourdough bread?",
    "What is a good recipe for sourdough?", "The train to Paris leaves at noon.", "Our Paris train departs at 12.",
]


@pytest.fixture(scope="module")
def mini():
    model = ql.models.minilm()
    calib = [dict(model.tokenize(ql.data.sentences(16)))]  # calibration text is not the evaluation text
    batch = dict(model.tokenize(EVAL_SENTENCES))
    with torch.no_grad():
        ref = model(**batch)
    return model, calib, batch, ref


def cosine(model, batch, ref):
    with torch.no_grad():
        return ql.eval.embedding_fidelity(ref, model(**batch))["cosine_mean"]


def test_explicit_smoothing_is_exact_on_post_ln_minilm(mini):
    model, calib, batch, ref = mini
    smoothed = copy.deepcopy(model)
    scales = smoothquant.smooth_(smoothed, calib, alpha=0.5)
    assert len(scales) == 2 * 6
    q = smoothed.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, smoothquant.SmoothedLinear)
    # the three projections share one input, so one s: their input_scale is the same 1/s
    k = smoothed.bert.encoder.layer[0].attention.self.key
    torch.testing.assert_close(q.input_scale, k.input_scale)
    torch.testing.assert_close(q.input_scale, 1 / scales["bert.encoder.layer.0.attention.self.query"])
    with torch.no_grad():
        assert rel(smoothed(**batch), ref) <= 1e-5
    # the LayerNorms are untouched (post-LN: their output is also the residual)
    torch.testing.assert_close(smoothed.bert.embeddings.LayerNorm.weight, model.bert.embeddings.LayerNorm.weight)


def test_smoothquant_improves_w8a8_on_minilm_static_and_dynamic(mini):
    model, calib, batch, ref = mini
    for config in (ql.Int8StaticConfig(), ql.Int8DynamicConfig(act_granularity=ql.PerTensor()), ql.Int8DynamicConfig()):
        naive = ql.quantize_(copy.deepcopy(model), config, calib_data=calib)
        smooth = ql.quantize_(copy.deepcopy(model), [ql.SmoothQuantConfig(alpha=0.5), config], calib_data=calib)
        q = smooth.bert.encoder.layer[2].intermediate.dense
        assert isinstance(q, ql.QuantLinear) and q.input_scale is not None  # the 1/s went into the W8A8 layer
        # SmoothQuant's claim: 1 - cosine (the error) shrinks
        assert 1 - cosine(smooth, batch, ref) < 0.8 * (1 - cosine(naive, batch, ref)), config


def test_static_calibration_observes_the_scaled_input():
    """Oracle by hand: a smoothed linear's static act scale is max|x * input_scale| / 127, not max|x| / 127."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(lin)
    x = torch.tensor([[8.0, 1.0, -1.0, 0.5], [4.0, -2.0, 1.0, 0.25]])
    s = torch.tensor([8.0, 1.0, 1.0, 0.5])
    smoothquant.apply_explicit_smoothing_(model, ["0"], s)
    assert isinstance(model[0], smoothquant.SmoothedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lin(x))  # exact in float
    q = ql.quantize_(copy.deepcopy(model), ql.Int8StaticConfig(), calib_data=[x])[0]
    # x / s = [[1, 1, -1, 1], [0.5, -2, 1, 0.5]]: max |.| = 2
    torch.testing.assert_close(q.act_scale, torch.tensor(2.0 / 127))
    torch.testing.assert_close(q.state_dict()["input_scale"], 1 / s)  # saved with the layer
    with torch.no_grad():
        assert rel(q(x), lin(x)) < 0.02


def test_explicitly_smoothed_layers_refuse_configs_that_would_drop_the_scale(mini):
    model, calib, _, _ = mini
    smoothed = ql.quantize_(copy.deepcopy(model), ql.SmoothQuantConfig(), calib_data=calib)
    before = {k: v.clone() for k, v in smoothed.state_dict().items()}
    for config in (ql.Int8WeightOnlyConfig(), ql.LLMInt8Config()):
        with pytest.raises(ValueError, match="smoothed explicitly by SmoothQuant"):
            ql.quantize_(smoothed, config)
    after = smoothed.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # nothing lost


def test_bad_mappings_and_scales_are_clear_errors(mini):
    model, calib, _, _ = mini
    p = "bert.encoder.layer.0"
    with pytest.raises(ValueError, match="read one input but have in_features"):
        smoothquant.smooth_(copy.deepcopy(model), calib, mappings=[(None, (f"{p}.attention.self.query", f"{p}.output.dense"))])
    with pytest.raises(ValueError, match="names no linear"):
        smoothquant.smooth_(copy.deepcopy(model), calib, mappings=[(None, ())])
    with pytest.raises(ValueError, match="finite positive factors"):
        smoothquant.smooth_(copy.deepcopy(model), calib, mappings=[(None, (f"{p}.intermediate.dense",))],
                            scales_fn=lambda a, w, alpha: a * 0)
    with pytest.raises(ValueError, match="alpha=-0.1 must be in"):
        ql.SmoothQuantConfig(alpha=-0.1)
