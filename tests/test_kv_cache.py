"""KV caches: incremental decoding equals full recomputation; KIVI's quantized cache (oracle: the equations by
hand for the group quantizer, the full-precision cache for the model)."""

import math

import pytest
import torch

import qlab as ql
from qlab import kv_cache as kvc


@pytest.fixture(scope="module")
def gpt():
    return ql.models.tiny_gpt().eval()


@pytest.fixture(scope="module")
def text():
    val = ql.data.pydoc_corpus("val")
    return torch.stack([val[i * 128:(i + 1) * 128] for i in range(4)]).long()  # (4, 128)


def bits_per_byte(logits, x):
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) / math.log(2))


def test_incremental_decoding_equals_full_recomputation(gpt, text):
    with torch.no_grad():
        full = gpt(text)
        cache = kvc.KVCache(len(gpt.blocks))
        prefill = gpt(text[:, :40], cache=cache)  # a prompt in one go, then one token at a time
        rest = kvc.decode_logits(gpt, text[:, 40:], cache)
    assert cache.length == 128 and cache.k[0].shape == (4, 4, 128, 64)
    assert torch.allclose(torch.cat([prefill, rest], dim=1), full, atol=1e-4)
    assert cache.nbytes == 2 * 4 * 4 * 128 * 256 * 4  # k and v, 4 layers, batch 4, 128 tokens, 256 floats of 4 bytes


def test_generate_with_a_cache_gives_the_same_bytes(gpt):
    from qlab.models.tiny_gpt import encode

    prompt = encode("The for statement ")
    plain = gpt.generate(prompt, 60, temperature=0)
    cached = gpt.generate(prompt, 60, temperature=0, cache=kvc.KVCache(len(gpt.blocks)))
    assert torch.equal(plain, cached)
    with pytest.raises(ValueError, match="a cache holds at most block_size=128 tokens"):
        gpt.generate(prompt, 200, temperature=0, cache=kvc.KVCache(len(gpt.blocks)))


def test_group_quantizer_by_hand():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 1.0, 0.5, 0.0]).reshape(1, 1, 2, 4)  # (B, nh, T=2, hs=4)
    codes, scale, lo, shape = kvc.quantize_groups(x, 2, "token", 4)  # one group of 4 channels per token
    assert lo.flatten().tolist() == [0.0, -1.0]
    assert torch.allclose(scale.float().flatten(), torch.tensor([1.0, 2 / 3]), atol=1e-3)  # (max - min) / 3, fp16
    x_hat = kvc.dequantize_groups(codes, scale, lo, shape, 2, "token")
    assert x_hat[0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # exact on its own grid
    per_channel = kvc.dequantize_groups(*kvc.quantize_groups(x, 2, "channel", 4), 2, "channel")
    assert per_channel.shape == x.shape and torch.allclose(per_channel, x, atol=1e-3)  # 2 tokens: min and max, fp16 scale


def test_kivi_window_and_update_rule():
    cache = kvc.QuantizedKVCache(1, head_dim=8, k_bits=2, v_bits=2, group_size=4, residual_length=4)
    g = torch.Generator().manual_seed(0)
    for t in range(10):
        k, v = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
        cache.update(0, k, v)
    keys, values = cache.ks[0], cache.vs[0]
    assert cache.length == 10
    assert len(keys.chunks) == 2 and keys.window.shape[2] == 2  # keys: blocks of 4 tokens, per channel
    assert len(values.chunks) == 6 and values.window.shape[2] == 4  # values: one token at a time leaves the window


def test_quantized_cache_on_the_tiny_gpt(gpt, text):
    with torch.no_grad():
        full = gpt(text)
    fp32 = bits_per_byte(full, text)
    results = {}
    for bits in (2, 4):
        for value_axis in ("token", "channel"):
            cache = kvc.QuantizedKVCache(len(gpt.blocks), 64, bits, bits, 32, 32, "channel", value_axis)
            results[(bits, value_axis)] = (bits_per_byte(kvc.decode_logits(gpt, text, cache), text), cache.nbytes)
    assert abs(results[(4, "token")][0] - fp32) < 0.005  # 4 bits, KIVI's axes: as good as FP32
    assert results[(2, "token")][0] < results[(2, "channel")][0]  # values per token, as KIVI found
    assert results[(2, "token")][1] < 0.3 * 2 * 4 * 4 * 128 * 256 * 4  # the 2-bit cache is a fraction of FP32's


def test_cache_errors_teach(gpt):
    with pytest.raises(ValueError, match=r"group_size=48 must divide head_dim=64.*try one of"):
        kvc.QuantizedKVCache(4, 64, group_size=48)
    with pytest.raises(ValueError, match="k_bits=3"):
        kvc.QuantizedKVCache(4, 64, k_bits=3)
    with pytest.raises(ValueError, match="key_axis='row'"):
        kvc.QuantizedKVCache(4, 64, key_axis="row")
    cache = kvc.KVCache(len(gpt.blocks))
    with torch.no_grad():
        gpt(torch.zeros(1, 100, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="exceeds block_size=128.*already holds 100 tokens"):
            gpt(torch.zeros(1, 30, dtype=torch.long), cache=cache)
