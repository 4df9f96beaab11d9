"""ql.export's ONNX files: qlab's W8A8 layers as QuantizeLinear / DequantizeLinear nodes, run by ONNX Runtime.

Oracles:
- ONNX Runtime 1.32 itself runs every exported file (onnx.checker accepts it first);
- hand-computed codes: an identity-weight layer outputs its dequantized input, so ORT's output is qlab's
  activation rule written out by hand (round half to even, the restricted symmetric range [-127, 127], a zero
  point, 7-bit codes, per-token scales absmax / 127);
- qlab's integer model: one layer at a time, ORT equals qlab's exact reference kernel to float rounding (1e-5
  relative), which rules out a single differing activation code (one code moves an output by s_x |w|, about 1e-3
  relative here). A whole model can differ by a few codes: ORT adds the float products of one layer in another
  order, an output that lands within 1e-7 of a rounding boundary of the next layer's quantizer takes the other
  code, and that difference travels on. Measured: digits CNN logits max 0.05 (of 10), 359 / 359 same argmax;
  tiny GPT logits max 0.2 (of 24), top-1 100 % against the reference kernel, 99.6 % against fbgemm (which realises
  per-token scales on its per-tensor uint8 kernel, ql.kernels.cpu), bits/byte within 0.0004;
- torch's FP32 model: the FP32 export equals it to 1e-5 of the output's largest magnitude;
- ONNX Runtime's quantize_static (MinMax, Entropy, Percentile) and quantize_dynamic: accuracy within 2 points of FP32.
"""

import copy

import numpy as np
import pytest
import torch

import qlab as ql
from qlab import kernels
from qlab.core.qtensor import from_codes
from qlab.export import onnx_nodes_of, onnx_ops, onnx_session, ort_quantize, run_onnx, to_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

LAYERS = ["conv1", "conv2", "conv3", "fc"]  # the digits CNN's W8A8 layers


def reference_kernel():
    """qlab's exact integer rule (the reference kernel), the one the QDQ nodes write down."""
    return kernels.disable(*kernels.fast_only("linear_w8a8"))


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def digits():
    fp32 = ql.models.digits_cnn(pretrained=True)
    ql.fold_batchnorm_(fp32)
    w8a8 = ql.quantize_(copy.deepcopy(fp32), ql.Int8StaticConfig(), calib_data=ql.data.digits_calibration_batches(8, 32))
    x, y = ql.data.digits_split("test")
    return fp32, w8a8, x, y


@pytest.fixture(scope="module")
def digits_files(digits, tmp_path_factory):
    fp32, w8a8, x, _ = digits
    folder = tmp_path_factory.mktemp("onnx")
    return to_onnx(fp32, folder / "fp32.onnx", x[:1], qdq=False), to_onnx(w8a8, folder / "qdq.onnx", x[:1])


# ----------------------------------------------------------------------------- the file holds qlab's qparams
def test_qdq_nodes_hold_qlabs_codes_and_qparams(digits, digits_files):
    _, w8a8, _, _ = digits
    path = digits_files[1]
    graph = onnx.load(str(path)).graph
    init = initializers(path)
    for name in LAYERS:
        layer = w8a8.get_submodule(name)
        assert np.array_equal(init[f"{name}.weight_q"].reshape(layer.weight_q.shape), layer.weight_q.numpy())
        assert init[f"{name}.weight_q"].dtype == np.int8
        assert np.array_equal(init[f"{name}.weight_scale"], layer.weight_scale.numpy())
        assert np.array_equal(init[f"{name}.bias"], layer.bias.numpy())
        assert init[f"{name}.act_scale"] == layer.act_scale.item()
        assert init[f"{name}.act_zero_point"].dtype == np.int8 and init[f"{name}.act_zero_point"] == 0
        q = [n for n in graph.node if n.op_type == "QuantizeLinear" and list(n.input[1:]) ==
             [f"{name}.act_scale", f"{name}.act_zero_point"]]
        dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and list(n.input) ==
              [f"{name}.weight_q", f"{name}.weight_scale"]]
        assert len(q) == 1 and len(dq) == 1
        assert [(a.name, a.i) for a in dq[0].attribute] == [("axis", 0)]  # per output channel
        op = [n for n in graph.node if dq[0].output[0] in n.input]  # the Conv / Gemm that takes the weight
        assert [n.op_type for n in op] == (["Gemm"] if name == "fc" else ["Conv"])
    ops = onnx_ops(path)
    assert ops["QuantizeLinear"] == 4 and ops["DequantizeLinear"] == 8 and ops["Clip"] == 4  # Clip: [-127, 127]
    assert "Identity" not in ops  # every layer has its own initializers


# ----------------------------------------------------------------------------- hand-computed codes
def identity_layer(**act) -> ql.QuantLinear:
    """A QuantLinear with weight I (codes 1, scale 1): its output is its dequantized input, exactly."""
    n = 5
    qt = from_codes(torch.eye(n, dtype=torch.int8), torch.ones(n), None, ql.int8, ql.PerChannel(0), True)
    return ql.QuantLinear(qt, None, **act)


@pytest.mark.parametrize("act,x,expected", [
    # int8 symmetric, scale 0.5: -200 and 140 clamp to qlab's [-127, 127] (QuantizeLinear alone would give -128),
    # 2.5 -> 2 and 3.5 -> 4 and -1.5 -> -2 (round half to even)
    (dict(act_qtype=ql.int8, act_granularity=ql.PerTensor(), act_qparams=(torch.tensor(0.5), torch.tensor(0))),
     [-100.0, 1.25, 1.75, -0.75, 70.0], [-63.5, 1.0, 2.0, -1.0, 63.5]),
    # uint8 with zero point 10: codes round(x / 0.5) + 10 in [0, 255]
    (dict(act_qtype=ql.uint8, act_granularity=ql.PerTensor(), act_qparams=(torch.tensor(0.5), torch.tensor(10))),
     [-10.0, 1.25, 200.0, -4.75, 0.0], [-5.0, 1.0, 122.5, -5.0, 0.0]),
    # reduce_range's 7-bit signed codes: [-63, 63]
    (dict(act_qtype=ql.qtype(7, signed=True), act_granularity=ql.PerTensor(),
          act_qparams=(torch.tensor(0.5), torch.tensor(0))),
     [-100.0, 1.25, 31.0, 32.0, 70.0], [-31.5, 1.0, 31.0, 31.5, 31.5]),
])
def test_static_activation_codes_by_hand(tmp_path, act, x, expected):
    layer = identity_layer(**act)
    path = to_onnx(layer, tmp_path / "layer.onnx", torch.zeros(1, 5))
    got = run_onnx(path, torch.tensor([x]))
    assert got.tolist() == [expected]


def test_dynamic_per_token_codes_by_hand(tmp_path):
    layer = identity_layer(act_qtype=ql.int8, act_granularity=ql.PerToken())
    # the first token's absmax is 127/64, so its scale absmax / 127 is 1/64 exactly: x / scale = 127, -3.5, 2.5, 0, 19.2
    x = torch.tensor([[[127 / 64, -3.5 / 64, 2.5 / 64, 0.0, 0.3]], [[0.0, 0.0, 0.0, 0.0, 0.0]]])  # (2, 1, 5)
    s = np.float32(1 / 64)
    codes = np.array([127, -4, 2, 0, 19], dtype=np.float32)  # -3.5 -> -4 and 2.5 -> 2: round half to even
    path = to_onnx(layer, tmp_path / "layer.onnx", torch.zeros(1, 1, 5), dynamic_dims=(0, 1))
    got = run_onnx(path, x).numpy()
    assert np.array_equal(got[0, 0], codes * s)
    assert np.array_equal(got[1, 0], np.zeros(5, np.float32))  # an all-zero token: scale 1, codes 0


# ----------------------------------------------------------------------------- one layer: ORT = qlab's integer rule
LAYER_CASES = {
    "dynamic per-token int8": dict(),
    "dynamic per-tensor uint8": dict(act_granularity=ql.PerTensor(), act_symmetric=False),
    "dynamic 7-bit": dict(act_qtype=ql.qtype(7, signed=True)),
    "per-tensor weight": dict(weight_granularity=ql.PerTensor()),
    "static int8": dict(act_qparams=(torch.tensor(0.02), torch.tensor(0))),
    "static uint8": dict(act_qparams=(torch.tensor(0.03), torch.tensor(131)), act_symmetric=False),
    "static 7-bit": dict(act_qparams=(torch.tensor(0.05), torch.tensor(0)), act_qtype=ql.qtype(7, signed=True)),
}


def relative_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_linear_layer_equals_qlab_reference(tmp_path, case):
    torch.manual_seed(0)
    layer = ql.QuantLinear.from_float(torch.nn.Linear(96, 40), **LAYER_CASES[case])
    x = 1.5 * torch.randn(3, 7, 96)  # static cases: some inputs beyond the range (clamped codes)
    path = to_onnx(layer, tmp_path / "layer.onnx", x[:1, :2], dynamic_dims=(0, 1))
    with torch.no_grad(), reference_kernel():
        expected = layer(x)
    assert relative_max_error(run_onnx(path, x), expected) < 1e-5  # float rounding only: the same codes


def test_smoothed_linear_keeps_input_scale(tmp_path):
    torch.manual_seed(1)
    smoothed = ql.smoothquant.SmoothedLinear.from_linear(torch.nn.Linear(32, 8))
    smoothed.input_scale.uniform_(0.5, 2.0)
    layer = ql.QuantLinear.from_float(smoothed, act_qparams=(torch.tensor(0.05), torch.tensor(0)))
    x = torch.randn(4, 32)
    path = to_onnx(layer, tmp_path / "smoothed.onnx", x)
    assert np.array_equal(initializers(path)["input_scale"], layer.input_scale.numpy())
    with torch.no_grad(), reference_kernel():
        assert relative_max_error(run_onnx(path, x), layer(x)) < 1e-5
    # qdq=False: the dequantized weight with input_scale folded in, float activations
    dequantized = torch.nn.functional.linear(x * layer.input_scale, layer.dequantize_weight(), layer.bias)
    float_path = to_onnx(layer, tmp_path / "float.onnx", x, qdq=False)
    assert relative_max_error(run_onnx(float_path, x), dequantized) < 1e-5


def test_conv_layer_equals_qlab_reference(tmp_path):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=2)
    layer = ql.QuantConv2d.from_float(conv, act_qparams=(torch.tensor(0.02), torch.tensor(0)))
    x = torch.randn(2, 3, 11, 11)
    path = to_onnx(layer, tmp_path / "conv.onnx", x[:1])
    with torch.no_grad(), reference_kernel():
        assert relative_max_error(run_onnx(path, x), layer(x)) < 1e-5


# ----------------------------------------------------------------------------- whole models
def test_digits_cnn_in_ort_agrees_with_qlab(digits, digits_files):
    fp32, w8a8, x, y = digits
    fp32_path, qdq_path = digits_files
    with torch.no_grad():
        expected, float_logits = w8a8(x), fp32(x)  # qlab's integer model, on the kernel the registry picks
    got = run_onnx(qdq_path, x)
    assert float((got - expected).abs().max()) < 0.1  # a few flipped codes at most (module docstring); logits ~10
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.99
    assert abs(float((got.argmax(-1) == y).float().mean()) - ql.eval.accuracy(w8a8, x, y)) <= 2 / len(y)
    fp32_out = run_onnx(fp32_path, x)
    assert float((fp32_out - float_logits).abs().max()) <= 1e-5 * float(float_logits.abs().max())


def test_tiny_gpt_dynamic_in_ort_agrees_with_qlab(tmp_path):
    gpt = ql.models.tiny_gpt(pretrained=True)
    w8a8 = ql.quantize_(copy.deepcopy(gpt), ql.Int8DynamicConfig(exclude="lm_head"))
    x = ql.data.pydoc_corpus("val")[: 2 * 128].reshape(2, 128).long()
    qdq = to_onnx(w8a8, tmp_path / "gpt_qdq.onnx", x[:1, :8], dynamic_dims=(0, 1))
    ops = onnx_ops(qdq)
    assert ops["QuantizeLinear"] == 16 and ops["DequantizeLinear"] == 32 and ops["ReduceMax"] == 16  # per token
    init = initializers(qdq)
    c_fc = w8a8.blocks[0].mlp.c_fc
    assert np.array_equal(init["blocks.0.mlp.c_fc.weight_q"], c_fc.weight_q.numpy())
    assert np.array_equal(init["blocks.0.mlp.c_fc.weight_scale"], c_fc.weight_scale.numpy())
    got = run_onnx(qdq, x)
    with torch.no_grad():
        with reference_kernel():
            exact = w8a8(x)
        fast = w8a8(x)
    assert float((got - exact).abs().max()) < 0.5  # logits ~24; a few flipped codes travel on (docstring)
    assert float((got.argmax(-1) == exact.argmax(-1)).float().mean()) >= 0.99
    assert float((got.argmax(-1) == fast.argmax(-1)).float().mean()) >= 0.98
    nll = torch.nn.functional.cross_entropy
    assert abs(float(nll(got[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1)))
               - float(nll(exact[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1)))) < 0.002
    fp32 = to_onnx(gpt, tmp_path / "gpt_fp32.onnx", x[:1, :8], qdq=False, dynamic_dims=(0, 1))
    with torch.no_grad():
        float_logits = gpt(x)
    assert float((run_onnx(fp32, x) - float_logits).abs().max()) <= 1e-5 * float(float_logits.abs().max())


# ----------------------------------------------------------------------------- ONNX Runtime's own quantizers
def test_ort_quantizers_run_and_keep_accuracy(digits, digits_files, tmp_path):
    fp32, _, x, y = digits
    fp32_path = digits_files[0]
    base = ql.eval.accuracy(fp32, x, y)
    nodes = onnx_nodes_of(fp32_path, LAYERS)
    assert nodes == ["/conv1/Conv", "/conv2/Conv", "/conv3/Conv", "/fc/Gemm"]
    calib = ql.data.digits_calibration_batches(8, 32)
    for method in ql.export.ORT_CALIBRATION_METHODS:
        path = ort_quantize(fp32_path, tmp_path / f"{method}.onnx", calibrate_method=method, calib_data=calib,
                            nodes=nodes)
        assert onnx_ops(path)["QuantizeLinear"] >= 4
        assert {"QLinearConv", "QGemm"} <= set(onnx_ops(path, optimized=True))  # ORT runs integer kernels
        assert float((run_onnx(path, x).argmax(-1) == y).float().mean()) >= base - 0.02
    path = ort_quantize(fp32_path, tmp_path / "dynamic.onnx", mode="dynamic", nodes=nodes)
    assert onnx_ops(path)["DynamicQuantizeLinear"] == 3 and onnx_ops(path)["ConvInteger"] == 3
    session = onnx_session(path, threads=1)
    assert float((run_onnx(session, x).argmax(-1) == y).float().mean()) >= base - 0.02


def test_onnx_comparison_rows():
    rows = ql.export.onnx_comparison("digits_cnn", repeats=1)
    assert [r["runtime"] for r in rows][:2] == ["torch", "torch"] and len(rows) == 8
    for r in rows:
        assert r["value"] > 0.97 and r["agreement"] > 0.97 and r["ms"] > 0 and r["bytes"] > 0
    assert rows[0]["kernels"] == "aten (float)" and "QLinearConv x3" in rows[4]["kernels"]
    assert ql.export.onnx_comparison_table(rows).count("\n") == len(rows) + 1


# ----------------------------------------------------------------------------- errors
def test_unsupported_modules_are_named(tmp_path):
    model = torch.nn.Sequential(ql.NF4Linear.from_float(torch.nn.Linear(64, 8)))
    with pytest.raises(ValueError, match=r"'0' is a qlab.nf4.NF4Linear, which to_onnx cannot write"):
        to_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 64))
    with pytest.raises(ValueError, match="no QuantLinear or QuantConv2d layer"):
        to_onnx(torch.nn.Linear(4, 2), tmp_path / "m.onnx", torch.zeros(1, 4))
    conv = ql.QuantConv2d.from_float(torch.nn.Conv2d(1, 2, 3))  # dynamic activations
    with pytest.raises(ValueError, match="QuantConv2d with dynamic activations"):
        to_onnx(conv, tmp_path / "m.onnx", torch.zeros(1, 1, 5, 5))


def test_bad_arguments(tmp_path, digits_files):
    layer = identity_layer()
    with pytest.raises(ValueError, match=r"opset=17 is not supported: use one of \(18, 19, 20\)"):
        to_onnx(layer, tmp_path / "m.onnx", torch.zeros(1, 5), opset=17)
    with pytest.raises(ValueError, match=r"dynamic_dims \[2\] are not dimensions of input"):
        to_onnx(layer, tmp_path / "m.onnx", torch.zeros(1, 5), dynamic_dims=(0, 2))
    fp32_path = digits_files[0]
    with pytest.raises(ValueError, match="takes 1 input"):
        run_onnx(fp32_path, (torch.zeros(1, 1, 8, 8), torch.zeros(1)))
    with pytest.raises(ValueError, match="mode='int4' must be 'static'"):
        ort_quantize(fp32_path, tmp_path / "q.onnx", mode="int4")
    with pytest.raises(ValueError, match="calibrate_method='KL' must be one of"):
        ort_quantize(fp32_path, tmp_path / "q.onnx", calibrate_method="KL", calib_data=[torch.zeros(1, 1, 8, 8)])
    with pytest.raises(ValueError, match="static quantization needs calib_data"):
        ort_quantize(fp32_path, tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="dynamic quantization takes its activation ranges from each input"):
        ort_quantize(fp32_path, tmp_path / "q.onnx", mode="dynamic", calib_data=[torch.zeros(1, 1, 8, 8)])
    with pytest.raises(ValueError, match=r"nodes \['/conv9/Conv'\] are not in"):
        ort_quantize(fp32_path, tmp_path / "q.onnx", mode="dynamic", nodes=["/conv9/Conv"])
    with pytest.raises(ValueError, match="case='resnet' is not one of"):
        ql.export.onnx_comparison("resnet")
