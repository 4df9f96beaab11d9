"""qlab.deploy: roofline points and decode profiles (oracles: the FLOP and byte counts by hand, the kernel
registry's own trace, the tiny GPT's context limit)."""

import pytest
import torch

import qlab as ql
from qlab import deploy


def test_roofline_is_the_minimum_of_the_two_roofs():
    roof = deploy.Roofline(bandwidth_gbps=20.0, peak_gflops=100.0)
    assert roof.ridge == 5.0
    assert roof.attainable(1.0) == 20.0 and roof.attainable(5.0) == 100.0 and roof.attainable(50.0) == 100.0


def test_linear_points_count_flops_bytes_and_name_the_kernel():
    rows = deploy.linear_points({"fp32": None, "w8a8": ql.Int8DynamicConfig()}, 256, 128, tokens=(1, 8), repeats=1)
    assert [(r["label"], r["tokens"]) for r in rows] == [("fp32", 1), ("fp32", 8), ("w8a8", 1), ("w8a8", 8)]
    fp32 = rows[1]
    assert fp32["weight_bytes"] == 256 * 128 * 4 and fp32["bits_per_weight"] == 32
    assert fp32["intensity"] == pytest.approx(2 * 8 * 256 * 128 / (256 * 128 * 4 + 4 * 8 * (256 + 128)))
    assert fp32["gflops"] == pytest.approx(2 * 8 * 256 * 128 / (fp32["ms"] / 1e3) / 1e9)
    assert fp32["kernel"] == "torch F.linear"
    w8a8 = rows[2]
    assert 8 <= w8a8["bits_per_weight"] < 8.5  # int8 codes + one fp32 scale per output row
    layer = ql.quantize_(torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False)), ql.Int8DynamicConfig())
    with torch.inference_mode(), ql.kernels.trace() as ran:
        layer(torch.randn(1, 256))
    assert w8a8["kernel"] == " + ".join(dict.fromkeys(ran))


def test_decode_profile_and_its_errors():
    gpt = ql.models.tiny_gpt().eval()
    out = deploy.decode_profile(gpt, batch=2, prompt_len=8, new_tokens=4, repeats=1)
    assert out["tokens_per_s"] == pytest.approx(2 * 1e3 / out["ms_per_token"])
    assert out["model_bytes"] == ql.eval.model_nbytes(gpt)
    assert out["kernel"] == "torch F.linear"  # no qlab op in the FP32 model
    w8a8 = ql.quantize_(ql.models.tiny_gpt().eval(), ql.Int8DynamicConfig())
    step = ql.kernels.kernels_run(w8a8, torch.zeros(1, 1, dtype=torch.long))
    assert step and deploy.decode_profile(w8a8, prompt_len=4, new_tokens=2, repeats=1)["kernel"] == " + ".join(
        dict.fromkeys(step))
    with pytest.raises(ValueError, match="exceeds the model's context block_size=128"):
        deploy.decode_profile(gpt, prompt_len=100, new_tokens=40)
    with pytest.raises(ValueError, match="must be positive"):
        deploy.decode_profile(gpt, batch=0)
