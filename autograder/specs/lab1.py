"""Grading spec of lab 1 (uniform quantization): the checks of each test cell of labs/source/lab1/lab1.ipynb.

Each part makes the same checks as the test cell with its grade_id, visible and hidden, on the same
seeds and shapes, with the same tolerances. The judges compute every expected value here, in the
grading process, with qlab: the sandbox only ever sees the inputs.
"""

from __future__ import annotations

import math

import torch

import qlab as ql
from autograder.spec import Check, Fail, Outcome, Part, call, close, expect, labels, number, read, returned, tensor

DISABLED = ql.labs.DISABLED["lab1"]  # qlab functions the lab switches off (qlab/labs.py)


def codes_match(q: torch.Tensor, ref_q: torch.Tensor, x_over_scale: torch.Tensor) -> bool:
    """The notebook's rule: codes equal, or off by one only where x / scale is within 1e-3 of a tie."""
    diff = (q.to(torch.int32) - ref_q.to(torch.int32)).abs()
    near_tie = ((x_over_scale.abs() % 1) - 0.5).abs() < 1e-3
    return bool((diff == 0).all()) or (bool((diff <= 1).all()) and bool((near_tie | (diff == 0)).all()))


# -- Parts 1 and 2: quantize / dequantize ----------------------------------------------------------------


def quantize_check(x: torch.Tensor, bits: int, symmetric: bool, label: str, exact: bool = False) -> Check:
    """quantize_(a)symmetric(x, bits) against qlab: codes dtype, shape and values, scale, zero point."""
    qtype = ql.qtype(bits, signed=symmetric)
    ref_scale, ref_zp = ql.choose_qparams(x, qtype, ql.PerTensor(), symmetric=symmetric)
    ref_q = ql.quantize(x, ref_scale, ref_zp, qtype)
    name = "quantize_symmetric" if symmetric else "quantize_asymmetric"

    def judge(out):
        values = returned(out, 2 if symmetric else 3, name)
        q = tensor(values[0], torch.int8 if symmetric else torch.uint8, x.shape, "the codes")
        if symmetric and not isinstance(values[1], float):
            tensor(values[1], torch.float32, None, "the scale")  # a float32 tensor, or a Python float
        scale = number(values[1], "the scale")
        expect(close(scale, float(ref_scale), rtol=1e-6), "the scale differs from the expected scale")
        if not symmetric:
            zero_point = number(values[2], "the zero point")
            expect(int(zero_point) == int(ref_zp), "the zero point differs from the expected zero point")
        matches = torch.equal(q, ref_q) if exact else codes_match(q, ref_q, x / ref_scale)
        expect(matches, "the codes differ from the expected codes")

    return Check(call(name, x, bits), judge, label)


def dequantize_check(q: torch.Tensor, scale, zero_point, label: str, exact: bool = False) -> Check:
    """dequantize_(a)symmetric on given codes against qlab's dequantize."""
    symmetric = q.dtype == torch.int8
    expected = ql.dequantize(q, scale, zero_point)
    name = "dequantize_symmetric" if symmetric else "dequantize_asymmetric"

    def judge(out):
        x_hat = tensor(returned(out, None, name), torch.float32, q.shape, "the dequantized values")
        same = torch.equal(x_hat, expected) if exact else torch.allclose(x_hat, expected, rtol=1e-6, atol=0)
        expect(same, "the dequantized values differ from the expected values")

    args = (q, scale) if symmetric else (q, scale, zero_point)
    return Check(call(name, *args), judge, label)


def round_trip(x: torch.Tensor, bits: int, symmetric: bool, label: str, exact: bool = False) -> list[Check]:
    """Quantize x, and dequantize the reference codes of x."""
    qtype = ql.qtype(bits, signed=symmetric)
    scale, zero_point = ql.choose_qparams(x, qtype, ql.PerTensor(), symmetric=symmetric)
    q = ql.quantize(x, scale, zero_point, qtype)
    dequantize = dequantize_check(q, scale, zero_point if not symmetric else 0, label, exact)
    return [quantize_check(x, bits, symmetric, label, exact), dequantize]


def symmetric_by_hand() -> Part:
    hidden = labels("hidden check")
    checks = round_trip(torch.tensor([1.75, -0.875, 0.625, -0.125]), 4, True, "the worked example", exact=True)
    checks += round_trip(torch.tensor([-2.0, 1.0, 0.0]), 2, True, "the 2-bit example", exact=True)
    checks += round_trip(torch.zeros(5), 8, True, "the all-zero example", exact=True)
    for x, bits in [(torch.tensor([[-3.5, 1.25], [0.75, -0.25]]), 4), (torch.tensor([7.5, -0.25, 3.75]), 5),
                    (torch.tensor([-1.0, 1.0, 0.25]), 8), (torch.zeros(3, 4), 4)]:
        checks += round_trip(x, bits, True, hidden(), exact=True)
    x = torch.randn(50, generator=torch.Generator().manual_seed(101))
    checks += [quantize_check(x, 3, True, hidden()), quantize_check(-x, 3, True, hidden())]
    return Part("test_symmetric_by_hand", 10, tuple(checks))


def symmetric_vs_reference() -> Part:
    generator, hidden = torch.Generator().manual_seed(1), labels("hidden check")
    checks = []
    for bits in (8, 4):
        checks += round_trip(torch.randn(16, 32, generator=generator) * 3, bits, True, f"random {bits}-bit tensor")
    generator = torch.Generator().manual_seed(102)
    for bits in range(2, 9):
        for shape, spread in [((1000,), 1.0), ((3, 4, 5), 1e-3), ((7, 9), 1e4)]:
            checks += round_trip(torch.randn(*shape, generator=generator) * spread, bits, True, hidden())
    return Part("test_symmetric_vs_reference", 10, tuple(checks))


def asymmetric_by_hand() -> Part:
    hidden = labels("hidden check")
    checks = round_trip(torch.tensor([-1.0, 0.0, 2.75]), 4, False, "the worked example", exact=True)
    checks += round_trip(torch.tensor([0.0, 1.0, 2.5, 3.75]), 4, False, "the non-negative example", exact=True)
    codes, scale, zero_point = torch.tensor([0, 3, 9], dtype=torch.uint8), torch.tensor(0.5), torch.tensor(3, dtype=torch.int32)
    checks.append(dequantize_check(codes, scale, zero_point, "the uint8 trap", exact=True))
    checks += round_trip(torch.zeros(4), 8, False, "the all-zero example", exact=True)
    for x, bits in [(torch.tensor([-3.75, -1.0, -0.5]), 4), (torch.tensor([-0.5, 0.0, 63.25]), 8),
                    (torch.tensor([[0.0, 0.375], [3.75, 0.625]]), 4), (torch.tensor([2.0, 3.0, 3.75]), 4)]:
        checks += round_trip(x, bits, False, hidden(), exact=True)
    return Part("test_asymmetric_by_hand", 10, tuple(checks))


def asymmetric_vs_reference() -> Part:
    generator, hidden = torch.Generator().manual_seed(2), labels("hidden check")
    cases = [("gaussian", torch.randn(16, 32, generator=generator)),
             ("shifted", torch.randn(16, 32, generator=generator) * 2 + 1),
             ("relu", torch.relu(torch.randn(16, 32, generator=generator)))]
    checks = [check for bits in (8, 4) for name, x in cases for check in round_trip(x, bits, False, f"{name}, {bits} bits")]
    generator = torch.Generator().manual_seed(103)
    for bits in range(2, 9):
        for shape, spread, shift in [((1000,), 1.0, 0.0), ((3, 4, 5), 1e-3, 5e-4), ((7, 9), 1e3, -2e3), ((64,), 1.0, 4.0)]:
            checks += round_trip(torch.randn(*shape, generator=generator) * spread + shift, bits, False, hidden())
    return Part("test_asymmetric_vs_reference", 10, tuple(checks))


# -- Part 3: SQNR ------------------------------------------------------------------------------------------


def sqnr_check(x: torch.Tensor, x_hat: torch.Tensor, label: str, expected: float | None = None, atol: float = 1e-3) -> Check:
    expected = ql.metrics.sqnr_db(x, x_hat) if expected is None else expected

    def judge(out):
        value = returned(out, None, "sqnr_db")
        expect(type(value) is float, f"sqnr_db must return a Python float, got {type(value).__name__}")
        expect(close(value, expected, atol=atol), "the SQNR differs from the expected value")

    return Check(call("sqnr_db", x, x_hat), judge, label)


def sqnr() -> Part:
    checks = [sqnr_check(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]), "the worked example", 10 * math.log10(25), 1e-6),
              sqnr_check(torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0]), "an exact copy", math.inf)]
    generator, hidden = torch.Generator().manual_seed(3), labels("hidden check")
    x = torch.randn(32, 64, generator=generator)
    for noise_std in (0.1, 0.01):
        checks.append(sqnr_check(x, x + noise_std * torch.randn(32, 64, generator=generator), f"noise {noise_std}"))
    checks += [sqnr_check(torch.ones(100), torch.full((100,), 1.1), hidden(), 20.0, 1e-4),
               sqnr_check(torch.zeros(3), torch.zeros(3), hidden(), math.inf)]
    generator = torch.Generator().manual_seed(104)
    x = torch.randn(4, 5, 6, generator=generator) * 100
    x_hat = ql.fake_quantize(x, ql.int4)
    checks += [sqnr_check(x, x_hat, hidden()), sqnr_check(x / 100, x_hat / 100, hidden())]
    x = torch.randn(1_000_000, generator=generator)  # float32 sums of a million squares lose precision
    checks.append(sqnr_check(x, ql.fake_quantize(x, ql.int8), hidden()))
    return Part("test_sqnr", 10, tuple(checks))


# -- Part 4: granularity -----------------------------------------------------------------------------------


def scale_check(name: str, w: torch.Tensor, args: tuple, kwargs: dict, expected: torch.Tensor, label: str,
                rtol: float = 1e-6, atol: float = 0.0) -> Check:
    def judge(out):
        scale = tensor(returned(out, None, name), torch.float32, expected.shape, "the scales")
        expect(torch.allclose(scale, expected, rtol=rtol, atol=atol), "the scales differ from the expected scales")

    return Check(call(name, w, *args, **kwargs), judge, label)


def reference_scale(w: torch.Tensor, bits: int, granularity) -> torch.Tensor:
    return ql.choose_qparams(w, ql.qtype(bits), granularity, symmetric=True)[0]


def per_channel() -> Part:
    example = torch.tensor([[0.7, -2.8, 1.4, 0.35], [0.07, 0.14, -0.28, 0.0]])
    loose = dict(rtol=1e-5, atol=1e-8)  # torch.allclose's defaults, as in the visible checks
    checks = [scale_check("per_channel_qparams", example, (4,), {"axis": 0}, torch.tensor([0.4, 0.04]), "the example, axis=0", **loose),
              scale_check("per_channel_qparams", example, (4,), {"axis": 1}, torch.tensor([0.1, 0.4, 0.2, 0.05]), "the example, axis=1", **loose),
              scale_check("per_channel_qparams", example, (4,), {}, torch.tensor([0.4, 0.04]), "the default axis", **loose)]
    generator, hidden = torch.Generator().manual_seed(4), labels("hidden check")
    w = torch.randn(64, 128, generator=generator) * torch.rand(64, 1, generator=generator)
    for bits in (8, 4):
        for axis in (0, 1):
            expected = reference_scale(w, bits, ql.PerChannel(axis))
            checks.append(scale_check("per_channel_qparams", w, (bits,), {"axis": axis}, expected, f"{bits} bits, axis={axis}"))
    generator = torch.Generator().manual_seed(105)
    w = torch.randn(4, 5, 6, generator=generator)
    for bits in (2, 3, 8):
        for axis in (0, 1, 2, -1):
            expected = reference_scale(w, bits, ql.PerChannel(axis))
            label = f"{hidden()} (a 3-D tensor, {'negative axis' if axis < 0 else f'axis {axis}'})"
            checks.append(scale_check("per_channel_qparams", w, (bits,), {"axis": axis}, expected, label))
    w = torch.randn(3, 8, generator=generator)
    w[1] = 0.0
    expected = torch.where(w.abs().amax(dim=1) > 0, w.abs().amax(dim=1) / 127, torch.ones(3))
    checks.append(scale_check("per_channel_qparams", w, (8,), {"axis": 0}, expected, f"{hidden()} (an all-zero channel)", **loose))
    return Part("test_per_channel", 10, tuple(checks))


def raises_value_error(w: torch.Tensor, group_size: int, label: str) -> Check:
    def judge(out):
        if out.missing:
            raise Fail("per_group_qparams is not defined")
        expect(out.raised == "ValueError", f"group_size={group_size} must raise ValueError, got "
               + (f"{out.raised}" if out.raised else "no exception"))

    return Check(call("per_group_qparams", w, 4, group_size), judge, label)


def per_group() -> Part:
    example = torch.tensor([[0.7, -2.8, 1.4, 0.35], [0.07, 0.14, -0.28, 0.0]])
    checks = [scale_check("per_group_qparams", example, (4,), {"group_size": 2}, torch.tensor([[0.4, 0.2], [0.02, 0.04]]),
                          "the example", rtol=1e-5, atol=1e-8),
              raises_value_error(example, 3, "group_size=3 on 4 columns")]
    generator, hidden = torch.Generator().manual_seed(5), labels("hidden check")
    w = torch.randn(64, 128, generator=generator)
    for bits, group_size in [(4, 32), (8, 128), (4, 1)]:
        expected = reference_scale(w, bits, ql.PerGroup(group_size))
        checks.append(scale_check("per_group_qparams", w, (bits, group_size), {}, expected, f"{bits} bits, group_size={group_size}"))
    generator = torch.Generator().manual_seed(106)
    w = torch.randn(2, 3, 64, generator=generator)
    for bits, group_size in [(3, 16), (8, 64), (2, 8)]:
        expected = reference_scale(w, bits, ql.PerGroup(group_size))
        checks.append(scale_check("per_group_qparams", w, (bits, group_size), {}, expected, hidden()))
    w = torch.randn(4, 32, generator=generator)
    w[2, 8:16] = 0.0
    checks.append(scale_check("per_group_qparams", w, (4, 8), {}, reference_scale(w, 4, ql.PerGroup(8)), hidden()))
    checks.append(scale_check("per_group_qparams", w, (4, 32), {}, reference_scale(w, 4, ql.PerToken())[:, None], hidden()))
    checks += [raises_value_error(w, bad, hidden()) for bad in (0, 5, 33, 64)]
    return Part("test_per_group", 10, tuple(checks))


# -- Part 5: int4 packing ----------------------------------------------------------------------------------


def pack_check(q: torch.Tensor, label: str) -> Check:
    expected = ql.pack_int4(q)

    def judge(out):
        packed = tensor(returned(out, None, "pack_int4"), torch.uint8, expected.shape, "the packed bytes")
        expect(torch.equal(packed, expected), "the packed bytes differ from the expected bytes")

    return Check(call("pack_int4", q), judge, label)


def unpack_check(packed: torch.Tensor, n: int, label: str) -> Check:
    expected = ql.unpack_int4(packed, (n,), signed=True).to(torch.int8)

    def judge(out):
        codes = tensor(returned(out, None, "unpack_int4"), torch.int8, (n,), "the codes")
        expect(torch.equal(codes, expected), "the unpacked codes differ from the expected codes")

    return Check(call("unpack_int4", packed, n), judge, label)


def pack() -> Part:
    checks = [pack_check(torch.tensor([1, -2, 7], dtype=torch.int8), "the worked example"),
              pack_check(torch.tensor([-8, 7], dtype=torch.int8), "the codes -8 and 7")]
    generator, hidden = torch.Generator().manual_seed(6), labels("hidden check")
    checks.append(pack_check(torch.randint(-8, 8, (7, 33), generator=generator, dtype=torch.int8), "an odd number of codes"))
    checks += [pack_check(torch.arange(-8, 8, dtype=torch.int8), hidden()), pack_check(torch.tensor([-1], dtype=torch.int8), hidden())]
    generator = torch.Generator().manual_seed(107)
    for shape in [(2, 3, 4), (5, 5), (1,), (64, 64)]:
        checks.append(pack_check(torch.randint(-8, 8, shape, generator=generator, dtype=torch.int8), hidden()))
    checks.append(pack_check(torch.randint(-8, 8, (10, 3), generator=generator), hidden()))  # int64 codes
    checks.append(pack_check(ql.quantize(torch.randn(16, 16, generator=generator), torch.tensor(0.3), 0, ql.int4), hidden()))
    return Part("test_pack_int4", 10, tuple(checks))


def unpack() -> Part:
    checks = [unpack_check(torch.tensor([225, 7], dtype=torch.uint8), 3, "the worked example")]
    q = torch.randint(-8, 8, (9, 11), generator=torch.Generator().manual_seed(7), dtype=torch.int8)
    checks.append(unpack_check(ql.pack_int4(q), q.numel(), "99 codes packed by qlab"))
    hidden = labels("hidden check")
    every_byte = torch.arange(256, dtype=torch.int16).to(torch.uint8)
    checks += [unpack_check(every_byte, n, hidden()) for n in (512, 511)]
    checks.append(unpack_check(torch.tensor([0x8F], dtype=torch.uint8), 2, hidden()))
    q = torch.randint(-8, 8, (1,), generator=torch.Generator().manual_seed(108), dtype=torch.int8)
    checks.append(unpack_check(ql.pack_int4(q), 1, hidden()))
    return Part("test_unpack_int4", 5, tuple(checks))


# -- Part 6: analysis --------------------------------------------------------------------------------------


def analysis_weight() -> torch.Tensor:
    """W of the locked cell analysis_setup, rebuilt here from the same seed."""
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02  # (O, K)
    W[:, [7, 100, 201]] *= 20
    return W


GRANULARITIES = {"per_tensor": ql.PerTensor(), "per_channel_axis0": ql.PerChannel(0),
                 "per_channel_axis1": ql.PerChannel(1), "per_group": ql.PerGroup(32)}


def broadcast_scale(name: str, scale: torch.Tensor) -> torch.Tensor:
    """A granularity's scale as the notebook's table says to broadcast it against W (64, 256)."""
    if name == "per_channel_axis0":
        return scale[:, None]
    if name == "per_channel_axis1":
        return scale[None, :]
    return scale.repeat_interleave(32, dim=-1)  # per_group: (64, 8) -> (64, 256)


SCALE_SHAPES = {"per_tensor": (), "per_channel_axis0": (64,), "per_channel_axis1": (256,), "per_group": (64, 8)}


def own_scale_probe(name: str, W: torch.Tensor):
    """The probe that gives the student's own scale for one granularity of the analysis."""
    if name == "per_tensor":
        return call("quantize_symmetric", W, 4)
    if name == "per_group":
        return call("per_group_qparams", W, 4, 32)
    return call("per_channel_qparams", W, 4, axis=0 if name.endswith("0") else 1)


def own_sqnr(name: str, W: torch.Tensor, out: Outcome) -> float | None:
    """The SQNR of W quantized with the student's own scale (from their function), computed here with qlab's
    metric: what a correct analysis on top of their earlier functions reports. None if there is no usable scale."""
    try:
        value = returned(out)
        if name == "per_tensor":
            q, scale = returned(out, 2)
            q = tensor(q, torch.int8, W.shape)
            return ql.metrics.sqnr_db(W, q.float() * float(number(scale)))
        scale = tensor(value, torch.float32, SCALE_SHAPES[name])
        qmax = 7
        return ql.metrics.sqnr_db(W, torch.clamp(torch.round(W / broadcast_scale(name, scale)), -qmax, qmax) * broadcast_scale(name, scale))
    except Fail:
        return None


def usable(out: Outcome) -> float | None:
    return out.value if not (out.missing or out.raised) and type(out.value) is float else None


def analysis_sqnr() -> Part:
    """2 points per value. Right if within 0.05 dB of the reference, or (errors carried forward) of the SQNR that the
    student's own scale gives (their quantize_symmetric, per_channel_qparams or per_group_qparams), or of what their
    own sqnr_db says about the reference quantization: a bug in an earlier function is charged only there."""
    W = analysis_weight()
    checks = []
    for name, granularity in GRANULARITIES.items():
        W_hat = ql.fake_quantize(W, ql.int4, granularity)
        expected = ql.metrics.sqnr_db(W, W_hat)

        def judge(out, scale_out, sqnr_out, variable=f"sqnr_{name}", expected=expected, name=name):
            value = returned(out, None, variable)
            expect(type(value) is float and math.isfinite(value), f"{variable} must be a finite float (dB)")
            accepted = [expected, own_sqnr(name, W, scale_out), usable(sqnr_out)]
            expect(any(a is not None and close(value, a, atol=0.05) for a in accepted),
                   f"{variable} differs from the SQNR of W quantized {name.replace('_', ' ')} at 4 bits")

        checks.append(Check(read(f"sqnr_{name}"), judge, f"sqnr_{name}", points=2,
                            context=(own_scale_probe(name, W), call("sqnr_db", W, W_hat))))
    return Part("test_analysis_sqnr", 8, tuple(checks))


def analysis_answer() -> Part:
    """best_granularity (4 points): the highest SQNR by the reference, or by the student's own four values;
    why (3 points): the explanation."""
    W = analysis_weight()
    reference = {name: ql.metrics.sqnr_db(W, ql.fake_quantize(W, ql.int4, g)) for name, g in GRANULARITIES.items()}

    def best(out, *own_outs):
        value = returned(out, None, "best_granularity")
        expect(isinstance(value, str) and value in GRANULARITIES, f"best_granularity must be one of {tuple(GRANULARITIES)}")
        if value == max(reference, key=reference.get):
            return
        own = dict(zip(GRANULARITIES, (usable(o) for o in own_outs)))
        consistent = all(v is not None and not math.isnan(v) for v in own.values()) and own[value] == max(own.values())
        expect(consistent, "best_granularity is not the granularity with the highest SQNR (by the reference, or by your own values)")

    def why(out):
        value = returned(out, None, "why")
        expect(isinstance(value, str) and value in ("a", "b", "c", "d"), 'why must be one of "a", "b", "c", "d"')
        expect(value == "b", "why is not the best explanation")

    own = tuple(read(f"sqnr_{name}") for name in GRANULARITIES)
    return Part("test_analysis_answer", 7, (Check(read("best_granularity"), best, "best_granularity", points=4, context=own),
                                            Check(read("why"), why, "why", points=3)))


def parts() -> list[Part]:
    """The graded parts of lab 1, in notebook order."""
    return [symmetric_by_hand(), symmetric_vs_reference(), asymmetric_by_hand(), asymmetric_vs_reference(), sqnr(),
            per_channel(), per_group(), pack(), unpack(), analysis_sqnr(), analysis_answer()]
