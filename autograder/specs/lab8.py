"""Grading spec of lab 8 (KIVI's group quantizer and cache, the quantizer in the tiny GPT's KV cache, llama.cpp's Q8_0
and Q4_0 blocks, the tiny GPT in GGUF, analysis): the checks of each test cell of labs/source/lab8/lab8.ipynb.

Each part makes the checks of the test cell with its grade_id, visible and hidden, on the same seeds and with the
same tolerances. The students' functions run in the sandbox through the notebook's locked helpers
(`quantize_groups_result`, `dequantize_groups_result`, `kivi_result`, `kivi_model_result`, `q8_0_result`,
`q4_0_result`, `gguf_model_result`); every expected value is computed here, in the grading process:

- KIVI (Parts 1 to 3) by qlab's `kv_cache`: codes (unpacked with `ql.unpack`), float16 scales and minimums and
  dequantized values bit for bit, and `QuantizedKVCache` fed one token at a time for the update rule; the tiny GPT's
  bits per byte through qlab's 2-bit cache and through the full-precision one, and their sizes;
- GGUF (Parts 4 and 5) by the `gguf` package 0.19.0 (gguf-py, llama.cpp's numpy port of its reference quantizers),
  the oracle the lab names: bytes bit for bit, and the tiny GPT built from its own Q8_0 and Q4_0 bytes.

The model references take a few seconds; `parts()` computes them at once (in `load_lab`, before the sandboxes
start), with one thread as in the sandbox.

Disabled: the functions the students write, `kv_cache.quantize_groups` and `kv_cache.dequantize_groups`, and every
qlab function that makes Q8_0 or Q4_0 bytes: `gguf.quantize`, the block quantizers behind it (`gguf._quantize_q8_0`,
`gguf._quantize_legacy`, which Q4_0 shares with Q4_1, Q5_0 and Q5_1) and `gguf.round_half_away`. The glue passes the
student's functions to `QuantizedKVCache(quantize_fn=, dequantize_fn=)`, so the cache never calls qlab's quantizer.
What stays on, and is forbidden by the notebook's rules only: the cache's update rule (a student could feed
`QuantizedKVCache` their own quantizer to answer Part 2: the Part 3 glue needs that class) and the `gguf` package,
the oracle itself (the glue uses its decoder; nothing in qlab reaches it, so `_disable` cannot switch it off).
"""

from __future__ import annotations

import copy
import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

import qlab as ql
from autograder.spec import Check, Outcome, Part, call, expect, labels, letter, number, returned, tensor

DISABLED = ql.labs.DISABLED["lab8"]  # qlab functions the lab switches off (qlab/labs.py)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18}

# The notebook also forbids the gguf package's quantizers in the students' cells: switched off like qlab's
# (gguf.quants.dequantize, the glue's decoder, stays on).
FOREIGN = ql.labs.FOREIGN["lab8"]


def hidden_labels():
    """hidden("constant groups") -> "hidden check 1 (constant groups)": the category of a hidden check's inputs."""
    count = labels("hidden check")
    return lambda category: f"{count()} ({category})"


def gguf_package():
    """The `gguf` package, the oracle of Parts 4 and 5 (requirements.lock pins 0.19.0)."""
    try:
        import gguf
        import gguf.quants
    except ImportError as error:
        raise ImportError("grading lab 8 compares with the gguf package: pip install gguf==0.19.0") from error
    return gguf


def gguf_bytes(x: torch.Tensor, qtype: str) -> torch.Tensor:
    gguf = gguf_package()
    return torch.from_numpy(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype]))


# -- Part 1: the group quantizer -------------------------------------------------------------------------------


def groups_answer(out: Outcome, expected_shape: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, lo) of a quantize_groups_result answer, after checking their types and shapes."""
    codes, scale, lo, shape = returned(out, 4, "quantize_groups")
    codes = tensor(codes, torch.uint8, expected_shape, "codes")
    group_shape = expected_shape[:-1] + (1,)
    scale = tensor(scale, torch.float16, group_shape, "scale")
    lo = tensor(lo, torch.float16, group_shape, "lo")
    expect(shape == expected_shape, "shape must be tuple(codes.shape)")
    return codes, scale, lo


def worked_groups_check(x, axis, group_size, expected_shape, codes_expected, scale_expected, lo_expected, label) -> Check:
    def judge(out):
        codes, scale, lo = groups_answer(out, expected_shape)
        expect(codes.tolist() == codes_expected, f"the worked example {label}: the codes differ")
        expect(scale.flatten().tolist() == scale_expected and lo.flatten().tolist() == lo_expected,
               f"the worked example {label}: the scales or the mins differ")

    return Check(call("quantize_groups_result", x, 2, axis, group_size), judge, f"the worked example {label}")


def random_groups_check(x: torch.Tensor, axis: str, bits: int, group_shape: tuple) -> Check:
    """The visible random tensor: codes span 0 .. 2^bits - 1 and every value decodes within 0.52 of a step."""
    g = x.transpose(2, 3) if axis == "channel" else x.reshape(group_shape)

    def judge(out):
        codes, scale, lo = groups_answer(out, group_shape)
        steps = ((codes.float() * scale.float() + lo.float() - g).abs() / scale.float()).max()
        expect(int(codes.max()) == 2**bits - 1 and int(codes.min()) == 0, f"{axis}, {bits} bits: codes span 0 .. 2^bits - 1")
        expect(bool(steps <= 0.52), f"{axis}, {bits} bits: every value must be within half a step of its level "
               "(plus float16's rounding)")

    return Check(call("quantize_groups_result", x, bits, axis, 32), judge, f"a random tensor, {axis}, {bits} bits")


def reference_groups_check(x: torch.Tensor, bits: int, axis: str, group_size: int, label: str) -> Check:
    ref_codes, ref_scale, ref_lo, ref_shape = ql.kv_cache.quantize_groups(x, bits, axis, group_size)
    ref_codes = ql.unpack(ref_codes, ref_shape, bits, signed=False)

    def judge(out):
        codes, scale, lo = groups_answer(out, ref_shape)
        expect(torch.equal(codes, ref_codes), f"axis={axis}: the codes differ from qlab's (round((x - min) / "
               "scale) with the float16 scale and min, half to even, clamped)")
        expect(torch.equal(scale, ref_scale) and torch.equal(lo, ref_lo), f"axis={axis}: the scales or the "
               "mins differ from qlab's ((max - min) / (2^bits - 1) in float32, then float16)")

    return Check(call("quantize_groups_result", x, bits, axis, group_size), judge, label)


def groups_cases(seed: int) -> list[tuple[torch.Tensor, int, int]]:
    """(x, bits, group_size) of the hidden checks, as the notebook's hidden test makes them."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(2, 4, 37, 64, generator=g) * 10 ** (torch.rand(64, generator=g) * 4 - 2)
    flat = torch.randn(1, 2, 6, 16, generator=g)
    flat[..., :8] = 0.7
    ties = torch.randint(-8, 8, (2, 2, 16, 32), generator=g) * 0.25
    return [(wide, 2, 32), (torch.randn(1, 2, 5, 16, generator=g), 4, 4), (torch.randn(3, 1, 64, 8, generator=g) * 3 + 1, 1, 8),
            (flat, 2, 8), (ties, 4, 16), (ties, 2, 32)]


GROUPS_KINDS = ("channels four powers of ten apart", "small groups", "one bit, values away from zero", "constant groups",
                "values on rounding ties", "values on rounding ties, large groups")  # the categories of groups_cases


def quantize_groups_part() -> Part:
    per_token = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 1.0, 0.5, 0.0]]).reshape(1, 1, 2, 4)
    keys = torch.tensor([[0.0, 10.0], [1.0, -10.0], [2.0, 0.0], [3.0, 5.0]]).reshape(1, 1, 4, 2)
    checks = [
        worked_groups_check(per_token, "token", 4, (1, 1, 2, 1, 4), [[[[[0, 1, 2, 3]], [[0, 3, 2, 2]]]]],
                            [1.0, 0.66650390625], [0.0, -1.0], "per token"),
        worked_groups_check(keys, "channel", 2, (1, 1, 2, 4), [[[[0, 1, 2, 3], [3, 0, 1, 2]]]], [1.0, 6.66796875],
                            [0.0, -10.0], "per channel"),
    ]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 40, 64, generator=g) * torch.linspace(0.1, 5.0, 64)
    for axis, group_shape in (("channel", (2, 4, 64, 40)), ("token", (2, 4, 40, 2, 32))):
        checks += [random_groups_check(x, axis, bits, group_shape) for bits in (2, 4)]
    hidden = hidden_labels()
    for (x, bits, group_size), kind in zip(groups_cases(801), GROUPS_KINDS):
        checks += [reference_groups_check(x, bits, axis, group_size, hidden(f"{kind}, per {axis}")) for axis in ("channel", "token")]
    return Part("test_quantize_groups", 15, tuple(checks))


def x_hat_answer(out: Outcome, shape: tuple) -> torch.Tensor:
    return tensor(returned(out, None, "dequantize_groups"), torch.float32, shape, "x_hat")


def dequantize_groups_part() -> Part:
    worked = [
        (torch.tensor([0, 1, 2, 3, 0, 3, 2, 2], dtype=torch.uint8).reshape(1, 1, 2, 1, 4),
         torch.tensor([1.0, 0.66650390625], dtype=torch.float16).reshape(1, 1, 2, 1, 1),
         torch.tensor([0.0, -1.0], dtype=torch.float16).reshape(1, 1, 2, 1, 1), "token",
         [[[[0.0, 1.0, 2.0, 3.0], [-1.0, 0.99951171875, 0.3330078125, 0.3330078125]]]], "per token"),
        (torch.tensor([[0, 1, 2, 3], [3, 0, 1, 2]], dtype=torch.uint8).reshape(1, 1, 2, 4),
         torch.tensor([1.0, 6.66796875], dtype=torch.float16).reshape(1, 1, 2, 1),
         torch.tensor([0.0, -10.0], dtype=torch.float16).reshape(1, 1, 2, 1), "channel",
         [[[[0.0, 10.00390625], [1.0, -10.0], [2.0, -3.33203125], [3.0, 3.3359375]]]], "per channel, back in (B, nh, T, hs)"),
    ]
    checks = []
    for codes, scale, lo, axis, expected, label in worked:
        def judge(out, expected=expected, label=label):
            x_hat = x_hat_answer(out, tuple(torch.tensor(expected).shape))
            expect(x_hat.tolist() == expected, f"the worked example {label}: the values differ")

        checks.append(Check(call("dequantize_groups_result", codes, scale, lo, 2, axis), judge, f"the worked example {label}"))
    g, hidden = torch.Generator().manual_seed(811), hidden_labels()
    for shape, bits, group_size, kind in [((2, 4, 37, 64), 2, 32, "an odd number of tokens"), ((1, 2, 5, 16), 4, 4, "small groups"),
                                          ((3, 1, 64, 8), 1, 8, "one bit")]:
        x = torch.randn(*shape, generator=g) * 10 ** (torch.rand(shape[-1], generator=g) * 2 - 1)
        for axis in ("channel", "token"):
            codes, scale, lo, ref_shape = ql.kv_cache.quantize_groups(x, bits, axis, group_size)
            expected = ql.kv_cache.dequantize_groups(codes, scale, lo, ref_shape, bits, axis)

            def judge(out, expected=expected, axis=axis):
                x_hat = x_hat_answer(out, tuple(expected.shape))
                expect(torch.equal(x_hat, expected), f"axis={axis}: x_hat differs from qlab's (codes * scale + min in "
                       "float32, back in (B, nh, T, hs))")

            probe = call("dequantize_groups_result", ql.unpack(codes, ref_shape, bits, signed=False), scale, lo, bits, axis)
            checks.append(Check(probe, judge, hidden(f"{kind}, per {axis}")))
    return Part("test_dequantize_groups", 5, tuple(checks))


# -- Part 2: the cache's update rule ------------------------------------------------------------------------------


def qlab_cache(k: torch.Tensor, v: torch.Tensor, bits: int, group_size: int, residual_length: int):
    """What qlab's QuantizedKVCache returns after the tokens of k and v were appended one at a time."""
    cache = ql.kv_cache.QuantizedKVCache(1, k.shape[-1], bits, bits, group_size, residual_length)
    for t in range(k.shape[2]):
        k_ref, v_ref = cache.update(0, k[:, :, t:t + 1], v[:, :, t:t + 1])
    return k_ref, v_ref


def own_chunk_probes(k: torch.Tensor, v: torch.Tensor, bits: int, group_size: int, residual_length: int) -> tuple:
    """Probes of the notebook's your_chunks (the student's own Part 1 functions) on every chunk the update rule
    quantizes: the keys of each group of group_size tokens of the full windows, then the values that left the window."""
    T, R = k.shape[2], residual_length
    n_k, n_v = T // R * R, max(T - R, 0)
    probes = [call("your_chunks", k[:, :, i:i + group_size], bits, "channel", group_size) for i in range(0, n_k, group_size)]
    if n_v:
        probes.append(call("your_chunks", v[:, :, :n_v], bits, "token", group_size))
    return tuple(probes)


def own_cache(outs, k: torch.Tensor, v: torch.Tensor, group_size: int, residual_length: int):
    """(k_hat, v_hat) that the update rule gives with the student's own quantizer, from own_chunk_probes' outcomes; None
    where one of them is unusable. Part 2 is judged with it as well as with qlab's cache, as the visible test does
    (a mistake in Part 1 is not counted again in Part 2)."""
    T, R = k.shape[2], residual_length
    n_k, n_v = T // R * R, max(T - R, 0)
    try:
        chunks = [tensor(returned(out, None, "your_chunks"), torch.float32, None, "a chunk") for out in outs]
        k_chunks, v_chunks = chunks[:n_k // group_size], chunks[n_k // group_size:]
        k_own = torch.cat(k_chunks + [k[:, :, n_k:]], dim=2)
        v_own = torch.cat(v_chunks + [v[:, :, n_v:]], dim=2)
    except Exception:
        return None
    return (k_own, v_own) if k_own.shape == k.shape and v_own.shape == v.shape else None


def kivi_answer(out: Outcome, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    k_hat, v_hat = returned(out, 2, "kivi_cache")
    return tensor(k_hat, torch.float32, shape, "k_hat"), tensor(v_hat, torch.float32, shape, "v_hat")


def kivi_cache_part() -> Part:
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    k10, v10 = qlab_cache(k, v, 2, 2, 4)  # group_size 2, R = 4

    def judge_worked(out, *own):
        k_hat, v_hat = kivi_answer(out, (2, 3, 10, 8))
        k_own, v_own = own_cache(own, k, v, 2, 4) or (k10, v10)
        expect(torch.equal(k_hat[:, :, 8:], k[:, :, 8:]), "the keys of tokens 8 and 9 wait in the window: unchanged")
        expect(torch.equal(v_hat[:, :, 6:], v[:, :, 6:]), "the values of tokens 6 to 9 are the window: unchanged")
        for start in (0, 2, 4, 6):
            chunk = k_hat[:, :, start:start + 2]
            expect(torch.equal(chunk, k_own[:, :, start:start + 2]) or torch.equal(chunk, k10[:, :, start:start + 2]),
                   f"the keys of tokens {start} and {start + 1} must be one group per channel, quantized on their own")
        expect(torch.equal(v_hat[:, :, :6], v_own[:, :, :6]) or torch.equal(v_hat[:, :, :6], v10[:, :, :6]),
               "the values of tokens 0 to 5 must be quantized per token")

    def judge_short(out):
        k_hat, v_hat = kivi_answer(out, (2, 3, 3, 8))
        expect(torch.equal(k_hat, k[:, :, :3]) and torch.equal(v_hat, v[:, :, :3]), "fewer tokens than R: nothing is "
               "quantized yet")

    k8_ref, _ = qlab_cache(k[:, :, :8], v[:, :, :8], 2, 2, 4)

    def judge_two_windows(out, *own):
        k_hat, v_hat = kivi_answer(out, (2, 3, 8, 8))
        k_own, _ = own_cache(own, k[:, :, :8], v[:, :, :8], 2, 4) or (k8_ref, None)
        expect(torch.equal(k_hat[:, :, 6:], k_own[:, :, 6:]) or torch.equal(k_hat[:, :, 6:], k8_ref[:, :, 6:]),
               "T = 2R: the second window of keys was quantized when its last token arrived (the keys' window is empty)")
        expect(torch.equal(v_hat[:, :, 4:], v[:, :, 4:8]), "T = 2R: the values of the last R tokens stay in full precision")

    checks = [Check(call("kivi_result", k, v, 2, 2, 4), judge_worked, "the worked example",
                    context=own_chunk_probes(k, v, 2, 2, 4)),
              Check(call("kivi_result", k[:, :, :3], v[:, :, :3], 2, 2, 4), judge_short, "fewer tokens than R"),
              Check(call("kivi_result", k[:, :, :8], v[:, :, :8], 2, 2, 4), judge_two_windows, "T = 2R",
                    context=own_chunk_probes(k[:, :, :8], v[:, :, :8], 2, 2, 4))]
    g, hidden = torch.Generator().manual_seed(802), hidden_labels()
    for B, nh, T, hs, bits, group_size, R, kind in [
            (1, 4, 37, 64, 2, 8, 16, "a window of two groups, partly filled at the end"),
            (2, 2, 32, 16, 4, 4, 16, "a window of four groups, an exact multiple of it"),
            (3, 1, 5, 8, 1, 4, 8, "fewer tokens than the window"),
            (1, 2, 20, 32, 2, 2, 2, "a window of one small group"),
            (2, 4, 64, 64, 2, 32, 32, "a window of one large group, an exact multiple of it"),
            (1, 1, 45, 16, 4, 4, 12, "a window of three groups, partly filled at the end")]:
        hk = torch.randn(B, nh, T, hs, generator=g) * (1 + 4 * torch.rand(hs, generator=g))  # new names: the judges
        hv = torch.randn(B, nh, T, hs, generator=g)  # above read k, v, k10, v10 when they run
        k_ref, v_ref = qlab_cache(hk, hv, bits, group_size, R)

        def judge(out, *own, hk=hk, hv=hv, group_size=group_size, R=R, k_ref=k_ref, v_ref=v_ref):
            k_hat, v_hat = kivi_answer(out, tuple(k_ref.shape))
            if torch.equal(k_hat, k_ref) and torch.equal(v_hat, v_ref):
                return
            k_own, v_own = own_cache(own, hk, hv, group_size, R) or (k_ref, v_ref)  # with your own Part 1 functions
            expect(torch.equal(k_hat, k_ref) or torch.equal(k_hat, k_own), "the keys differ from what the update rule "
                   "gives (every full window of R tokens quantized per channel in groups of group_size tokens, the rest "
                   "in the window)")
            expect(torch.equal(v_hat, v_ref) or torch.equal(v_hat, v_own), "the values differ from what the update rule "
                   "gives (all but the newest R tokens quantized per token)")

        checks.append(Check(call("kivi_result", hk, hv, bits, group_size, R), judge, hidden(kind),
                            context=own_chunk_probes(hk, hv, bits, group_size, R)))
    return Part("test_kivi_cache", 20, tuple(checks))


# -- Part 3: the quantizer in the tiny GPT's cache; Part 5's model: the references, computed once ----------------


@cache
def setup():
    """The tiny GPT, the validation bytes, and the 4 sequences of 128 bytes the KIVI glue decodes."""
    gpt, val = ql.models.tiny_gpt(), ql.data.pydoc_corpus("val")
    return gpt, val, torch.stack([val[i * 128:(i + 1) * 128] for i in range(4)]).long()


def one_thread(function):
    """function() with one torch thread, as in the sandbox."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function()
    finally:
        torch.set_num_threads(threads)


def cache_bits_per_byte(cache_) -> float:
    gpt, _, text = setup()
    logits = ql.kv_cache.decode_logits(gpt, text, cache_)
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), text[:, 1:].flatten()) / math.log(2))


@cache
def kivi_references() -> dict:
    """Bits per byte and bytes of the full-precision cache and of qlab's 2-bit KIVI cache (the glue's settings)."""
    gpt = setup()[0]
    n_layer, head_dim = gpt.config.n_layer, gpt.config.n_embd // gpt.config.n_head
    fp, kivi = ql.kv_cache.KVCache(n_layer), ql.kv_cache.QuantizedKVCache(n_layer, head_dim, 2, 2, 32, 32)
    fp_bpb, kivi_bpb = one_thread(lambda: (cache_bits_per_byte(fp), cache_bits_per_byte(kivi)))
    return {"fp": fp_bpb, "fp_bytes": fp.nbytes, "kivi": kivi_bpb, "kivi_bytes": kivi.nbytes}


def bits_per_byte(model: nn.Module) -> float:
    return ql.eval.perplexity(model, setup()[1], max_tokens=4096, batch_size=32, progress=False)["bits_per_token"]


def gguf_tiny_gpt(qtype: str) -> nn.Module:
    """The glue's model built from the gguf package's own bytes: its block linears decoded by gguf."""
    gguf = gguf_package()
    model = copy.deepcopy(setup()[0])
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            data = gguf_bytes(module.weight.detach(), qtype)
            weight = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[qtype])
            module.weight.data = torch.from_numpy(weight).reshape(module.weight.shape)
    return model


@cache
def gguf_references() -> dict:
    """Bits per byte of the FP32 tiny GPT and of its Q8_0 and Q4_0 models made from the gguf package's bytes."""
    return one_thread(lambda: {"fp32": bits_per_byte(setup()[0]), "Q8_0": bits_per_byte(gguf_tiny_gpt("Q8_0")),
                               "Q4_0": bits_per_byte(gguf_tiny_gpt("Q4_0"))})


def kivi_model_part() -> Part:
    ref = kivi_references()  # now, in load_lab, before the sandboxes need the CPUs

    def judge(out):
        bpb, nbytes = returned(out, 2, "kivi_model_result")
        expect(type(bpb) is float, "the bits per byte must be a float")
        nbytes = number(nbytes, "the cache's bytes", integer=True)
        expect(abs(bpb - ref["fp"]) <= 0.01, "the 2-bit KIVI cache must stay within 0.01 bits/byte of the full-precision cache")
        expect(nbytes < ref["fp_bytes"] / 4, "the 2-bit KIVI cache must take less than a quarter of the full-precision "
               "cache's bytes")
        expect(abs(bpb - ref["kivi"]) <= 1e-5, "the bits per byte differ from qlab's QuantizedKVCache with the same "
               "settings by more than 1e-5")
        expect(nbytes == ref["kivi_bytes"], "the cache's size differs from qlab's QuantizedKVCache's (one float16 scale "
               "and min per group)")

    return Part("test_kivi_model", 10, (Check(call("kivi_model_result"), judge, "your quantizer in the tiny GPT's cache"),))


# -- Parts 4 and 5: GGUF blocks ----------------------------------------------------------------------------------


def bytes_answer(out: Outcome, shape: tuple, name: str) -> torch.Tensor:
    return tensor(returned(out, None, name), torch.uint8, shape, "the bytes")


def gguf_cases(seed: int, qtype: str) -> list[torch.Tensor]:
    """The hidden tensors of Part 4 (Q8_0) or 5 (Q4_0), as the notebook's hidden tests make them."""
    g = torch.Generator().manual_seed(seed)
    if qtype == "Q8_0":
        ties = torch.randint(-254, 255, (4, 128), generator=g) / 2
        ties[:, ::32] = 127.0
        below = torch.randint(-100, 100, (2, 64), generator=g) + 0.49999997
        below[:, ::32] = -127.0
    else:
        ties = torch.randint(-16, 17, (4, 128), generator=g) / 2
        ties[:, ::32] = -8.0
        below = torch.randint(-7, 7, (2, 64), generator=g) + 0.4999999
        below[:, ::32] = -8.0
    both = torch.randn(8, 32, generator=g)
    both[:, 3], both[:, 7] = 3.0, -3.0
    if qtype == "Q4_0":
        both[4:, 3], both[4:, 7] = -3.0, 3.0
    return [torch.randn(3, 2, 256, generator=g), torch.randn(96, generator=g),
            (torch.randn(4, 8, 32, generator=g) * 10 ** (6 * torch.rand(4, 8, 1, generator=g) - 3)).reshape(4, 256),
            torch.zeros(2, 64), -torch.zeros(1, 32), ties, below, both, torch.randn(2, 3, 64, generator=g) * 0.02]


GGUF_KINDS = ("rows of several blocks, a 3-D tensor", "a 1-D tensor", "blocks of very different magnitudes",
              "all-zero blocks", "negative zeros", "values on exact rounding ties", "values a hair below rounding ties",
              "the largest |x| twice in a block, with both signs", "small values, a 3-D tensor")  # of gguf_cases


def reference_bytes_checks(seed: int, qtype: str, probe: str, rule: str) -> list[Check]:
    checks, hidden = [], hidden_labels()
    for x, kind in zip(gguf_cases(seed, qtype), GGUF_KINDS, strict=True):
        reference = gguf_bytes(x, qtype)

        def judge(out, reference=reference):
            data = bytes_answer(out, tuple(reference.shape), probe)
            expect(torch.equal(data, reference), f"the bytes differ from the gguf package's {qtype} ({rule})")

        checks.append(Check(call(probe, x), judge, hidden(kind)))
    return checks


def decoded(data: torch.Tensor, qtype: str, shape: tuple) -> torch.Tensor:
    gguf = gguf_package()
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[qtype])).reshape(shape)


def q8_0_part() -> Part:
    worked = torch.zeros(1, 32)
    worked[0, :6] = torch.tensor([127.0, -63.5, 0.5, -0.5, 2.5, 0.49999997])

    def judge_worked(out):
        data = bytes_answer(out, (1, 34), "quantize_q8_0")
        expect(data[0, :2].tolist() == [0x00, 0x3C], "the worked example: d = 127 / 127 = 1.0 is float16 bytes 0x00 0x3C")
        expect(data[0, 2:].view(torch.int8).tolist() == [127, -64, 1, -1, 3, 0] + [0] * 26,
               "the worked example: the codes differ (a half away from zero)")

    def judge_zeros(out):
        data = bytes_answer(out, (2, 68), "quantize_q8_0")
        expect(int(data.sum()) == 0, "all-zero blocks: d = 0 and codes 0, so every byte is 0")

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 128, generator=g)

    def judge_random(out):
        data = bytes_answer(out, (3, 5, 136), "quantize_q8_0")
        steps = (decoded(data, "Q8_0", x.shape) - x).reshape(-1, 32).abs() / (x.reshape(-1, 32).abs().amax(1, keepdim=True) / 127)
        expect(float(steps.max()) <= 0.57, "every value must decode within half a step of itself (plus float16's rounding of d)")

    checks = [Check(call("q8_0_result", worked), judge_worked, "the worked example"),
              Check(call("q8_0_result", torch.zeros(2, 64)), judge_zeros, "all-zero blocks"),
              Check(call("q8_0_result", x), judge_random, "random blocks")]
    checks += reference_bytes_checks(803, "Q8_0", "q8_0_result",
                                     "d = amax / 127 in float16, codes roundf(x * (1 / d)) with a half away from zero")
    return Part("test_quantize_q8_0", 15, tuple(checks))


def q4_0_part() -> Part:
    worked = torch.zeros(32)
    worked[:7] = torch.tensor([-4.0, 4.0, 3.75, 0.25, -0.25, 0.2499999, 1.0])
    worked[16] = -2.0

    def judge_worked(out):
        data = bytes_answer(out, (18,), "quantize_q4_0")
        expect(data[:2].tolist() == [0x00, 0x38], "the worked example: m = -4 (the first largest |x|), d = 0.5, float16 "
               "bytes 0x00 0x38")
        codes = torch.cat([data[2:] & 0x0F, data[2:] >> 4]).tolist()
        expect(codes[:8] == [0, 15, 15, 9, 8, 9, 10, 8] and codes[16:18] == [4, 8], "the worked example: the codes differ")
        expect(data[2:].tolist() == [0x40, 0x8F, 0x8F, 0x89, 0x88, 0x89, 0x8A] + [0x88] * 9,
               "the worked example: byte j holds q_j in its low nibble and q_(j+16) in its high nibble")

    def judge_zeros(out):
        data = bytes_answer(out, (1, 36), "quantize_q4_0")
        expect(data[0].tolist() == ([0x00, 0x80] + [0x88] * 16) * 2, "all-zero blocks: d = 0 / -8 = -0.0 (float16 bytes "
               "0x00 0x80) and every code 8 (bytes 0x88)")

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 128, generator=g)
    blocks = x.reshape(-1, 32)
    largest = blocks.abs().argmax(1, keepdim=True)

    def judge_random(out):
        data = bytes_answer(out, (3, 5, 72), "quantize_q4_0")
        x_hat = decoded(data, "Q4_0", x.shape).reshape(-1, 32)
        steps = (x_hat - blocks).abs() / (blocks.abs().amax(1, keepdim=True) / 8)
        expect(torch.allclose(x_hat.gather(1, largest), blocks.gather(1, largest), rtol=1e-3),
               "the value of largest |x| in each block must decode to itself, up to float16's rounding of d")
        expect(float(steps.max()) <= 1.01, "every value within one step |d| of itself (half a step, or one where 16 is "
               "clipped to 15)")

    checks = [Check(call("q4_0_result", worked), judge_worked, "the worked example"),
              Check(call("q4_0_result", torch.zeros(1, 64)), judge_zeros, "all-zero blocks"),
              Check(call("q4_0_result", x), judge_random, "random blocks")]
    checks += reference_bytes_checks(804, "Q4_0", "q4_0_result", "m the first value of largest |x|, d = m / -8 in "
                                     "float16, codes min(15, trunc(x * (1 / d) + 8.5)), q_j | q_(j+16) << 4")
    return Part("test_quantize_q4_0", 15, tuple(checks))


def gguf_model_part() -> Part:
    ref = gguf_references()  # now, in load_lab

    def judge(out):
        q8_bpb, q4_bpb = returned(out, 2, "gguf_model_result")
        expect(type(q8_bpb) is float and type(q4_bpb) is float, "the bits per byte must be floats")
        expect(abs(q8_bpb - ref["fp32"]) <= 0.001, "Q8_0 must stay within 0.001 bits/byte of FP32")
        expect(abs(q4_bpb - ref["fp32"]) <= 0.01, "Q4_0 must stay within 0.01 bits/byte of FP32")
        expect(abs(q8_bpb - ref["Q8_0"]) <= 1e-4 and abs(q4_bpb - ref["Q4_0"]) <= 1e-4,
               "the bits per byte differ by more than 1e-4 from the models built from the gguf package's own bytes")

    return Part("test_gguf_model", 5, (Check(call("gguf_model_result"), judge, "the tiny GPT in GGUF"),))


# -- Part 6: analysis ----------------------------------------------------------------------------------------------


def analysis_parts() -> list[Part]:
    answers = {"window_count": "a", "why_blocks": "b", "q4_0_grid": "b"}
    return [Part(f"test_{name}", 5, (letter(name, right),)) for name, right in answers.items()]


def parts() -> list[Part]:
    """The graded parts of lab 8, in notebook order."""
    return [quantize_groups_part(), dequantize_groups_part(), kivi_cache_part(), kivi_model_part(), q8_0_part(),
            q4_0_part(), gguf_model_part(), *analysis_parts()]
