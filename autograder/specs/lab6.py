"""Grading spec of lab 6 (QLoRA: NF4 blocks and their dequantization, double quantization and its storage, the LoRA
layer, QLoRA on the tiny GPT): the checks of each test cell of labs/source/lab6/lab6.ipynb.

Each part makes the checks of the test cell with its grade_id, visible and hidden, on the same seeds and with the
same tolerances. The students' functions run in the sandbox through the notebook's locked helpers
(`quantize_nf4_result`, `dequantize_nf4_result`, `double_quantize_result`, `lora_result`, `qlora_result`; the
probes call `storage_bits` itself); every expected value is computed here, in the grading process:

- bytes, absmax, offset, nested absmax and dequantized values by bitsandbytes 0.50 on CPU (`quantize_4bit`,
  `dequantize_4bit`), the reference implementation of QLoRA's formats;
- the 8-bit codes of double quantization by qlab (`nf4.quantize_blockwise`: the exactly nearest level, as
  bitsandbytes' CUDA kernel and pure-torch backend take it; its CPU C kernel searches a table that may pick the
  other neighbour within 2e-5 of a midpoint, see tests/test_nf4.py);
- the storage by qlab's `Tensor4bit.nbytes`, PEFT's draws of A by `ql.LoRALinear` (tests/test_lora.py checks them
  against peft), and the reference QLoRA run by qlab's NF4Config and LoRALinear (the glue's seed, steps and torch
  AdamW). That run takes about 10 s; `parts()` makes it at once, in `load_lab`, so that it does not compete with the
  sandboxes for the CPUs while their fine-tuning cells run against the 30 s cell limit.

Codes whose normalised value lies within 1e-6 of a midpoint between two levels are not compared (there the last
bit of float arithmetic decides), and an all-zero block may store 0 or 1e-38 as its absmax, as the notebook says.

What is switched off while grading, and what is not: the glue stores the tiny GPT's weights with the student's
`quantize_nf4` and `double_quantize` in qlab's `nf4.Tensor4bit` and `NF4Linear` (not with `ql.NF4Config`, whose
handler calls `nf4.quantize_4bit`), so qlab's quantizers can be disabled. `NF4Linear`'s forward dequantizes with
`Tensor4bit.dequantize` (`codes`, `block_absmax`, `nf4.dequantize_blockwise`): those stay on, and a student could
call them in `dequantize_nf4`; the notebook forbids qlab in answers, as lab 5 does for `gptq.find_params`.
`LoRALinear.__init__` cannot be switched off (its `super()` makes it a closure, whose code cannot be swapped for the
stub); its `forward` is, so a qlab LoRALinear handed in as the student's does not run.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import cache

import torch
from torch import nn

import qlab as ql
from autograder.spec import Check, Part, call, close, expect, labels, letter, number, returned, tensor

DISABLED = ql.labs.DISABLED["lab6"]  # qlab functions the lab switches off (qlab/labs.py)
NF4, DYNAMIC = ql.nf4.NF4_LEVELS.clone(), ql.nf4.dynamic_map()
GROUP, RANK, ALPHA, STEPS, LR, SEED = 64, 16, 32, 30, 2e-3, 0

# The notebook asks for plain torch and math: importing bitsandbytes fails in its cells, locally and while grading.
IMPORTS = ql.labs.IMPORTS["lab6"]


def hidden_labels():
    """hidden("an all-zero block") -> "hidden check 1 (an all-zero block)": the category of a hidden check's inputs."""
    count = labels("hidden check")
    return lambda category: f"{count()} ({category})"


def bitsandbytes():
    """bitsandbytes.functional: the oracle of Parts 1 to 3 (installed with the course extra, `pip install -e .[course]`)."""
    bnb = ql.nf4.import_bitsandbytes()
    if bnb is None:
        raise ImportError("grading lab 6 compares with bitsandbytes 0.50: pip install -e .[course]")
    return bnb.functional


def near_midpoint(v: torch.Tensor, levels: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Where v lies within tol of a midpoint between two neighbouring levels (either neighbour is accepted there)."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return (v.reshape(-1, 1) - midpoints).abs().min(dim=1).values <= tol


def unpacked(packed: torch.Tensor) -> torch.Tensor:
    """The codes of bytes packed two per byte, the first in the high nibble."""
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)


# -- Part 1: quantize_nf4 ----------------------------------------------------------------------------------


def quantized(out, n: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    packed, absmax = returned(out, 2, "quantize_nf4")
    packed = tensor(packed, torch.uint8, ((n + 1) // 2,), "packed (ceil(n / 2) bytes)")
    absmax = tensor(absmax, torch.float32, (-(-n // group_size),), "absmax (one per block)")
    return packed, absmax


def example_check(w: torch.Tensor, label: str, expected_bytes: list[int], expected_absmax: list[float] | None) -> Check:
    def judge(out):
        packed, absmax = quantized(out, w.numel(), GROUP)
        expect(packed.tolist() == expected_bytes, "the bytes differ")
        if expected_absmax is not None:
            expect(absmax.tolist() == expected_absmax, "absmax differs")

    return Check(call("quantize_nf4_result", w, GROUP), judge, label)


def blocks_check() -> Check:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 100, generator=g)  # 4 blocks of 64 and a last block of 44
    w[0, :64] = 0  # an all-zero block
    blocks = w.reshape(-1).split(GROUP)

    def judge(out):
        packed, absmax = quantized(out, w.numel(), GROUP)
        expect(torch.equal(absmax[1:], torch.stack([b.abs().max() for b in blocks[1:]])) and 0 <= float(absmax[0]) <= 1e-38,
               "absmax must be max |w| over each block, the last one shorter (0 or 1e-38 for an all-zero block)")
        expect(set(packed[:32].tolist()) == {0x77}, "an all-zero block must get the code 7 (the level 0) everywhere")

    return Check(call("quantize_nf4_result", w, GROUP), judge, "4 blocks of 64 and a shorter last one")


def bnb_quantize_check(w: torch.Tensor, group_size: int, label: str) -> Check:
    ref_packed, state = bitsandbytes().quantize_4bit(w, blocksize=group_size, quant_type="nf4")
    ref_codes = unpacked(ref_packed.reshape(-1))
    flat = w.reshape(-1)
    n = flat.numel()
    v = flat / state.absmax.clamp(min=1e-38).repeat_interleave(group_size)[:n]
    doubt = torch.cat([near_midpoint(v, NF4), torch.zeros(ref_codes.numel() - n, dtype=torch.bool)])
    zero = state.absmax <= 1e-38

    def judge(out):
        packed, absmax = quantized(out, n, group_size)
        expect(torch.equal(unpacked(packed)[~doubt], ref_codes[~doubt]), "the bytes differ from bitsandbytes'")
        all_zero_ok = bool(((absmax[zero] >= 0) & (absmax[zero] <= 1e-38)).all())  # 0 or 1e-38: both decode to zeros
        expect(torch.equal(absmax[~zero], state.absmax[~zero]) and all_zero_ok, "absmax differs from bitsandbytes'")

    return Check(call("quantize_nf4_result", w, group_size), judge, label)


def quantize_part() -> Part:
    checks = [example_check(torch.tensor([1.0, -1.0, 0.0]), "the worked example", [0xF0, 0x77], [1.0]),
              example_check(3 * NF4, "3 * NF4", [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], [3.0]),
              example_check(torch.tensor([1.0, float(NF4[8]) / 2, float(NF4[6]) / 2]), "half-way between two levels",
                            [0xF7, 0x67], None),
              blocks_check()]
    g, hidden = torch.Generator().manual_seed(601), hidden_labels()
    for shape, group_size, zero_blocks, zero_tail, scale, label in [
            ((48, 64), 64, 0, False, 1.0, "full blocks only"),
            ((7, 45), 32, 1, False, 0.05, "small blocks of small weights, an all-zero block, a shorter last block"),
            ((1000,), 128, 2, False, 3.0, "a 1-D tensor, all-zero blocks, a shorter last block"),
            ((3, 333), 256, 0, False, 0.02, "large blocks of small weights, a shorter last block"),
            ((2, 97), 64, 1, False, 1.0, "an all-zero block, a short last block"),
            ((513,), 64, 0, True, 0.5, "an odd number of values, an all-zero shorter last block"),
            ((5,), 32, 0, False, 1.0, "an odd number of values, fewer than a block")]:
        w = torch.randn(*shape, generator=g) * scale
        flat = w.view(-1)
        n = flat.numel()
        flat[: zero_blocks * group_size] = 0
        if zero_tail:
            flat[n - n % group_size:] = 0
        checks.append(bnb_quantize_check(w, group_size, hidden(label)))
    return Part("test_quantize_nf4", 25, tuple(checks))


# -- Part 2: dequantize_nf4 --------------------------------------------------------------------------------


def dequantize_check(packed, absmax, shape, group_size, expected, label, exact=False) -> Check:
    def judge(out):
        w_hat = tensor(returned(out, None, "dequantize_nf4"), torch.float32, shape, "the dequantized tensor")
        same = torch.equal(w_hat, expected) if exact else torch.allclose(w_hat, expected, rtol=1e-6, atol=0)
        expect(same, "the values differ")

    return Check(call("dequantize_nf4_result", packed, absmax, torch.tensor(shape), group_size), judge, label)


def dequantize_part() -> Part:
    u8 = torch.uint8
    checks = [dequantize_check(torch.tensor([0xF0, 0x77], dtype=u8), torch.tensor([2.0]), (3,), 64,
                               torch.tensor([2.0, -2.0, 0.0]), "the worked example with absmax 2", exact=True),
              dequantize_check(torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=u8), torch.tensor([3.0]),
                               (16,), 64, NF4 * 3.0, "the codes 0..15 with absmax 3", exact=True)]
    expected = NF4[[15, 0, 7, 15, 0, 15, 8, 7, 14, 1]] * torch.tensor([1.0] * 4 + [2.0] * 4 + [0.5] * 2)
    checks.append(dequantize_check(torch.tensor([0xF0, 0x7F, 0x0F, 0x87, 0xE1], dtype=u8), torch.tensor([1.0, 2.0, 0.5]),
                                   (2, 5), 4, expected.reshape(2, 5), "three blocks of 4, shape (2, 5)"))
    g, hidden = torch.Generator().manual_seed(602), hidden_labels()
    for shape, group_size, zero_blocks, label in [
            ((40, 64), 64, 0, "full blocks only"),
            ((3, 111), 32, 2, "an odd number of values, all-zero blocks, a shorter last block"),
            ((777,), 128, 1, "a 1-D tensor, an odd number of values, an all-zero block, a shorter last block"),
            ((2, 2, 100), 256, 0, "a 3-D shape, large blocks, a shorter last block"),
            ((65,), 64, 0, "an odd number of values, a last block of one value")]:
        w = torch.randn(*shape, generator=g)
        w.view(-1)[: zero_blocks * group_size] = 0
        ref_packed, state = bitsandbytes().quantize_4bit(w, blocksize=group_size, quant_type="nf4")
        expected = bitsandbytes().dequantize_4bit(ref_packed, state)
        checks.append(dequantize_check(ref_packed.reshape(-1), state.absmax, shape, group_size, expected, hidden(label)))
    return Part("test_dequantize_nf4", 15, tuple(checks))


# -- Part 3: double quantization and storage ---------------------------------------------------------------


def dq_returned(out, n: int, n_nested: int):
    codes, nested_absmax, offset = returned(out, 3, "double_quantize")
    codes = tensor(codes, torch.uint8, (n,), "codes (one per absmax)")
    nested_absmax = tensor(nested_absmax, torch.float32, (n_nested,), "nested_absmax (one per block of 256)")
    offset = tensor(offset, torch.float32, (), "offset (a 0-dim tensor)")
    return codes, nested_absmax, offset


def dq_example_check() -> Check:
    def judge(out):
        codes, nested_absmax, offset = dq_returned(out, 4, 1)
        expect(codes.tolist() == [23, 47, 127, 255] and nested_absmax.tolist() == [3.0] and float(offset) == 3.0,
               "codes, nested absmax or offset differ")

    return Check(call("double_quantize_result", torch.tensor([1.0, 2.0, 3.0, 6.0])), judge, "the worked example")


def dq_visible_check() -> Check:
    g = torch.Generator().manual_seed(3)
    absmax = torch.rand(600, generator=g) * 2 + 0.5  # blocks of 256, 256 and 88
    c = absmax - absmax.mean()
    nested_ref = torch.stack([b.abs().max() for b in c.split(256)])

    def judge(out):
        codes, nested_absmax, offset = dq_returned(out, 600, 3)
        expect(torch.allclose(offset, absmax.mean(), rtol=1e-6), "offset must be the mean of absmax")
        expect(torch.allclose(nested_absmax, nested_ref, rtol=1e-6),
               "nested_absmax must be max |absmax - offset| per block of 256")
        v = c / nested_absmax.repeat_interleave(256)[:600]
        distance = (v[:, None] - DYNAMIC).abs()  # (600, 256)
        expect(bool((distance[torch.arange(600), codes.long()] <= distance.min(dim=1).values + 1e-7).all()),
               "each code must be the index of the nearest level of DYNAMIC")

    return Check(call("double_quantize_result", absmax), judge, "600 absmax values")


def dq_bnb_check(numel: int, group_size: int, zero_blocks: int, g: torch.Generator, label: str) -> Check:
    w = torch.randn(numel, generator=g) * torch.rand(1, generator=g)
    w[: zero_blocks * group_size] = 0
    _, plain = bitsandbytes().quantize_4bit(w, blocksize=group_size, quant_type="nf4")
    _, dq = bitsandbytes().quantize_4bit(w, blocksize=group_size, quant_type="nf4", compress_statistics=True)
    centred = plain.absmax - dq.offset
    exact = ql.nf4.quantize_blockwise(centred)[0]  # the exactly nearest codes (bitsandbytes' CPU kernel approximates)
    doubt = near_midpoint(centred / dq.state2.absmax.clamp(min=1e-38).repeat_interleave(256)[: centred.numel()], DYNAMIC)

    def judge(out):
        codes, nested_absmax, offset = dq_returned(out, plain.absmax.numel(), dq.state2.absmax.numel())
        expect(torch.allclose(offset, dq.offset, rtol=1e-6, atol=0), "offset differs from bitsandbytes'")
        expect(torch.allclose(nested_absmax, dq.state2.absmax, rtol=1e-6, atol=0),
               "nested_absmax differs from bitsandbytes'")
        expect(torch.equal(codes[~doubt], exact[~doubt]), "the codes differ from the nearest levels of DYNAMIC")

    return Check(call("double_quantize_result", plain.absmax), judge, label)


def double_quantize_part() -> Part:
    checks = [dq_example_check(), dq_visible_check()]
    g, hidden = torch.Generator().manual_seed(603), hidden_labels()
    for numel, group_size, zero_blocks, label in [
            (64 * 300, 64, 0, "two blocks of 256, the last one shorter"),
            (32 * 1000 + 5, 32, 4, "all-zero weight blocks, a shorter last block of 256"),
            (128 * 256, 128, 0, "exactly one block of 256"),
            (64 * 700 + 17, 64, 2, "all-zero weight blocks, three blocks of 256, the last one shorter")]:
        checks.append(dq_bnb_check(numel, group_size, zero_blocks, g, hidden(label)))
    return Part("test_double_quantize", 15, tuple(checks))


def storage_int(out) -> int:
    """storage_bits' answer, which must be a Python int (as the visible test asserts), not a tensor or a float."""
    bits = returned(out, None, "storage_bits")
    expect(type(bits) is int, f"storage_bits must return an int, got {type(bits).__name__}")
    return bits


def storage_check(numel: int, group_size: int, double_quant: bool, label: str, expected=None) -> Check:
    if expected is None:
        expected = 8 * ql.nf4.quantize_4bit(torch.ones(numel), "nf4", group_size, double_quant).nbytes

    def judge(out):
        bits = storage_int(out)
        expect(bits == expected, "the number of bits differs")

    return Check(call("storage_bits", numel, group_size, double_quant), judge, label)


def storage_part() -> Part:
    n = 4096 * 4096
    checks = [storage_check(3, 64, False, "the worked example of Part 1", 2 * 8 + 32),
              storage_check(n, 64, False, "4096 x 4096, blocks of 64", int(4.5 * n))]

    def judge_dq(out):
        bits = storage_int(out)
        expect(round(bits / n, 3) == 4.127, "not 4.127 bits per parameter")

    checks.append(Check(call("storage_bits", n, 64, True), judge_dq, "4096 x 4096, blocks of 64, double quantization"))
    hidden = hidden_labels()
    for numel, group_size, double_quant, label in [
            (3, 64, True, "fewer values than a block, double quantization"), (301, 64, False, "an odd number of values"),
            (301, 64, True, "an odd number of values, double quantization"),
            (64 * 300, 64, True, "two blocks of 256 absmax values, double quantization"),
            (32 * 1000 + 5, 32, True, "a shorter last block, double quantization"),
            (128 * 256 + 1, 128, True, "one block more than a multiple of 256, double quantization"),
            (1000, 256, False, "large blocks, a shorter last block"), (4096, 4096, True, "a single block, double quantization")]:
        checks.append(storage_check(numel, group_size, double_quant, hidden(label)))
    return Part("test_storage_bits", 5, tuple(checks))


# -- Part 4: LoRA ------------------------------------------------------------------------------------------


def lora_check(W, b, rank, alpha, x, A, B, seed, label) -> Check:
    N, K = W.shape
    base = nn.Linear(K, N, bias=b is not None)
    with torch.no_grad():
        base.weight.copy_(W)
        if b is not None:
            base.bias.copy_(b)
    with torch.random.fork_rng(devices=[]):  # PEFT's draws under the student's seed, without touching ours
        torch.manual_seed(seed)
        A_ref = ql.LoRALinear(base, rank, alpha).lora_A.weight.detach().clone()
    with torch.no_grad():
        base_y = base(x)
    expected = base_y + (x @ A.T) @ B.T * (alpha / rank)
    lead = tuple(x.shape[:-1])

    def judge(out):
        A0, B0, scaling, trainable, y0, y_base, y = returned(out, 7, "lora_result")
        A0 = tensor(A0, torch.float32, (rank, K), "lora_A.weight")
        B0 = tensor(B0, torch.float32, (N, rank), "lora_B.weight")
        expect(trainable == ("lora_A.weight", "lora_B.weight"),
               "only lora_A.weight and lora_B.weight may train (the base is frozen)")
        expect(close(number(scaling, "scaling"), alpha / rank, rtol=1e-9), "scaling must be alpha / rank")
        expect(torch.equal(B0, torch.zeros(N, rank)), "B must start at zero")
        y0 = tensor(y0, torch.float32, (*lead, N), "the output")
        expect(torch.allclose(y0, base_y, rtol=0, atol=1e-6), "with B = 0 the layer must give the base layer's output")
        expect(torch.equal(A0, A_ref),
               "A must be drawn as PEFT draws it: lora_A, lora_B, then kaiming_uniform_(A, a=sqrt(5))")
        y = tensor(y, torch.float32, (*lead, N), "the output")
        expect(torch.allclose(y, expected, rtol=1e-5, atol=1e-5), "the output must be base(x) + (x A^T) B^T * alpha / rank")

    return Check(call("lora_result", W, b, rank, alpha, x, A, B, seed), judge, label)


def lora_layer_part() -> Part:
    g = torch.Generator().manual_seed(4)
    W, b = torch.randn(24, 32, generator=g) * 0.2, torch.randn(24, generator=g)
    x = torch.randn(2, 5, 32, generator=g)
    A, B = torch.randn(4, 32, generator=g), torch.randn(24, 4, generator=g)
    checks = [lora_check(W, b, 4, 8.0, x, A, B, 0, "rank 4 on a 24 x 32 layer")]
    g, hidden = torch.Generator().manual_seed(604), hidden_labels()
    for K, N, rank, alpha, has_bias, lead, seed, label in [
            (64, 48, 8, 16.0, True, (3,), 1, "a bias, one leading dimension"),
            (16, 40, 2, 5.0, False, (2, 7), 2, "no bias, two leading dimensions, a non-integer scaling"),
            (100, 30, 16, 32.0, True, (5,), 3, "a bias, a rank close to the layer's size"),
            (256, 256, 1, 1.0, False, (1, 1), 4, "no bias, rank one")]:
        W = torch.randn(N, K, generator=g) * 0.1
        b = torch.randn(N, generator=g) if has_bias else None
        x = torch.randn(*lead, K, generator=g)
        A, B = torch.randn(rank, K, generator=g), torch.randn(N, rank, generator=g)
        checks.append(lora_check(W, b, rank, alpha, x, A, B, seed, hidden(label)))
    return Part("test_lora_layer", 15, tuple(checks))


@cache
def setup():
    """The tiny GPT, the names of its block linears, the code to fine-tune on and the code to measure on."""
    gpt = ql.models.tiny_gpt()
    linears = tuple(name for name, m in gpt.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear))
    return gpt, linears, ql.data.python_source("train"), ql.data.python_source("val")


def bits_per_byte(model: nn.Module) -> float:
    return ql.eval.perplexity(model, setup()[3], max_tokens=4096, batch_size=32, progress=False)["bits_per_token"]


@cache
def reference_run() -> tuple[float, float]:
    """Bits per byte of the glue's model made with qlab's NF4 + DQ and LoRALinear, before and after fine-tuning."""
    gpt, linears, train, _ = setup()
    model = ql.quantize_(copy.deepcopy(gpt), ql.NF4Config(group_size=GROUP, double_quant=True, include=("blocks.*",)))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for name in linears:
            model.set_submodule(name, ql.LoRALinear(model.get_submodule(name), RANK, ALPHA))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as in the sandbox: 30 steps amplify the rounding of other thread counts
    try:
        before = bits_per_byte(model)
        ql.lora.finetune(model, train, steps=STEPS, lr=LR, optimizer="adamw", seed=SEED, progress=False)
        return before, bits_per_byte(model)
    finally:
        torch.set_num_threads(threads)


def qlora_part() -> Part:
    before, after = reference_run()  # now, in load_lab, not while the sandboxes run and need the CPUs

    def judge(out):
        layers, bases, trainable, bpb = returned(out, 4, "qlora_result")
        gpt, linears, _, _ = setup()
        expect(layers == ("LoRALinear",) * len(linears) and bases == ("NF4Linear",) * len(linears),
               "every linear of the blocks must be a LoRALinear around an NF4Linear")
        adapters = sum(RANK * (gpt.get_submodule(n).in_features + gpt.get_submodule(n).out_features) for n in linears)
        expect(number(trainable, "the trainable parameters", integer=True) == adapters, "only the adapters may train")
        expect(type(bpb) is float, "bits_per_byte must be a float")
        expect(bpb <= before - 0.5, "fine-tuning must gain at least 0.5 bits/byte on code over the 4-bit model before it")
        expect(close(bpb, after, atol=0.05),
               "the fine-tuned model's bits per byte differ from qlab's LoRALinear run by more than 0.05")

    return Part("test_qlora_finetune", 15, (Check(call("qlora_result"), judge, "QLoRA on the tiny GPT"),))


# -- Part 5: analysis --------------------------------------------------------------------------------------


def analysis_answers() -> Part:
    points = {"why_b_zero": 4, "dq_saves": 3, "why_merge_loses": 3}  # as the notebook's Part 5 says
    return Part("test_analysis_answers", 10, tuple(dataclasses.replace(letter(name, right), points=points[name])
                                                  for name, right in (("why_b_zero", "b"), ("dq_saves", "b"),
                                                                      ("why_merge_loses", "c"))))


def parts() -> list[Part]:
    """The graded parts of lab 6, in notebook order."""
    return [quantize_part(), dequantize_part(), double_quantize_part(), storage_part(), lora_layer_part(), qlora_part(),
            analysis_answers()]
