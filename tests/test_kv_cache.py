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


def test_quantized_cache_runs_the_functions_it_is_given():
    """The hook a lab uses: QuantizedKVCache(quantize_fn=, dequantize_fn=) stores every chunk with the given
    functions (a student's, codes one per uint8), and gives bit for bit qlab's cache when they are the same math."""
    calls = []

    def by_hand_quantize(x, bits, axis, group_size):  # step 4 of the module doc, unpacked codes
        calls.append((axis, x.shape[2]))
        g = x.transpose(2, 3) if axis == "channel" else x.unflatten(-1, (-1, group_size))  # groups: the last dim
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale, lo = ((hi - lo) / (2**bits - 1)).half(), lo.half()
        q = ((g - lo.float()) / torch.where(scale == 0, 1.0, scale.float())).round().clamp(0, 2**bits - 1)
        return q.to(torch.uint8), scale, lo, tuple(q.shape)

    def by_hand_dequantize(codes, scale, lo, shape, bits, axis):
        x = codes.float() * scale.float() + lo.float()
        return x.transpose(2, 3) if axis == "channel" else x.flatten(-2)

    def make(**fns):
        return kvc.QuantizedKVCache(2, head_dim=8, k_bits=2, v_bits=4, group_size=2, residual_length=4, **fns)

    qlabs, hands = make(), make(quantize_fn=by_hand_quantize, dequantize_fn=by_hand_dequantize)
    g = torch.Generator().manual_seed(0)
    for t in range(10):
        for layer in range(2):
            k, v = torch.randn(3, 2, 1, 8, generator=g), torch.randn(3, 2, 1, 8, generator=g) * 5
            assert all(torch.equal(a, b) for a, b in zip(qlabs.update(layer, k, v), hands.update(layer, k, v)))
    # per layer: keys per channel, 2 full windows of 4 tokens, each cut into 2 groups of 2 tokens; values per token,
    # the 6 tokens that left the window one at a time
    assert sorted(set(calls)) == [("channel", 2), ("token", 1)]
    assert calls.count(("channel", 2)) == 2 * 4 and calls.count(("token", 1)) == 2 * 6
    assert hands.nbytes == qlabs.nbytes  # unpacked codes are counted packed, as qlab's packed ones

    identity = make(quantize_fn=lambda x, bits, axis, group_size: (x, x[..., :1], x[..., :1], tuple(x.shape)),
                    dequantize_fn=lambda codes, scale, lo, shape, bits, axis: codes)
    ks = torch.randn(1, 1, 9, 8, generator=g)
    for t in range(9):
        keys, values = identity.update(0, ks[:, :, t:t + 1], -ks[:, :, t:t + 1])
    assert torch.equal(keys, ks) and torch.equal(values, -ks)  # what attention reads comes from the given functions
    with pytest.raises(ValueError, match="only quantize_fn was given: pass quantize_fn and dequantize_fn together"):
        make(quantize_fn=by_hand_quantize)


@pytest.mark.parametrize("key_axis,value_axis", [("channel", "token"), ("token", "channel"), ("channel", "channel")])
@pytest.mark.parametrize("group_size,residual_length", [(16, 16), (16, 48), (32, 64)])
def test_quantized_nbytes_is_what_the_cache_holds(gpt, text, key_axis, value_axis, group_size, residual_length):
    """The formula the book extrapolates to a 7B model, against the bytes a real cache stores, at lengths that
    fall before, on and after window boundaries (prefill of T tokens, then single tokens)."""
    for T in (1, group_size - 1, residual_length, residual_length + 1, 100, 128):
        cache = kvc.QuantizedKVCache(4, 64, 2, 4, group_size, residual_length, key_axis, value_axis)
        with torch.no_grad():
            gpt(text[:2, :max(T - 3, 1)], cache=cache)
            for t in range(max(T - 3, 1), T):
                gpt(text[:2, t:t + 1], cache=cache)
        expected = kvc.quantized_nbytes(4, 256, T, 2, k_bits=2, v_bits=4, group_size=group_size,
                                        residual_length=residual_length, key_axis=key_axis, value_axis=value_axis,
                                        bytes_per_value=4)
        assert cache.length == T and cache.nbytes == expected, (T, cache.nbytes, expected)


def test_keys_per_channel_are_cut_into_groups_of_group_size_tokens():
    cache = kvc.QuantizedKVCache(1, head_dim=8, k_bits=2, v_bits=2, group_size=4, residual_length=12)
    cache.update(0, torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8))  # a full window: 3 groups of 4 tokens
    assert [shape for _, _, _, shape in cache.ks[0].chunks] == [(1, 1, 8, 4)] * 3  # (B, nh, hs, group of tokens)
    with pytest.raises(ValueError, match="residual_length=20 must be a multiple of group_size=8"):
        kvc.QuantizedKVCache(1, head_dim=8, group_size=8, residual_length=20)


def test_eight_bit_codes_are_stored_unpacked():
    x = torch.randn(2, 2, 5, 8)
    codes, scale, lo, shape = kvc.quantize_groups(x, 8, "token", 4)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel()
    assert torch.allclose(kvc.dequantize_groups(codes, scale, lo, shape, 8, "token"), x, atol=(x.max() - x.min()) / 255)
    cache = kvc.QuantizedKVCache(1, head_dim=8, k_bits=8, v_bits=8, group_size=4, residual_length=4)
    for _ in range(9):
        cache.update(0, torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    assert cache.nbytes == kvc.quantized_nbytes(1, 8, 9, k_bits=8, v_bits=8, group_size=4, residual_length=4,
                                                bytes_per_value=4)
