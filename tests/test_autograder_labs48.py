"""The grading specs of labs 4 to 8 check what their notebooks promise, no less and no more (project issue 14).

Most cases call a spec's judges directly on answers made here, as the sandbox would send them back (plain data);
the last ones grade whole notebooks in the sandbox, where errors carried forward need the context probes to run.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import qlab as ql
from autograder import plain
from autograder.judge import judge_part
from autograder.spec import HIDDEN_LABEL, Fail, Outcome, label_of
from autograder.specs import lab4, lab5, lab6, lab7, lab8

LABS = {"lab4": lab4, "lab5": lab5, "lab6": lab6, "lab7": lab7, "lab8": lab8}


def sent(value) -> Outcome:
    """What a probe's answer looks like to a judge once it has crossed the sandbox's channel."""
    return Outcome(value=plain.decode(plain.encode(value)))


def raw(value):
    return plain.encode(value)


def part(module, grade_id: str):
    return next(p for p in module.parts() if p.grade_id == grade_id)


def check(p, label: str):
    return next(c for c in p.checks if label_of(c) == label or c.label == label)


def passes(check_, *outcomes) -> bool:
    try:
        check_.judge(*outcomes)
    except Fail:
        return False
    return True


def failure(check_, *outcomes) -> str:
    with pytest.raises(Fail) as error:
        check_.judge(*outcomes)
    return str(error.value)


@pytest.fixture(scope="module")
def parts():
    """Every part of labs 4 to 8 (lab 6 and 8 compute their model references once, here)."""
    return {lab: {p.grade_id: p for p in module.parts()} for lab, module in LABS.items()}


# -- labels and messages -------------------------------------------------------------------------------------


def test_hidden_checks_name_their_category_by_hand(parts):
    """Every hidden check of labs 4 to 8 says what kind of input it has, written by hand ("a shorter last block"),
    not the automatic description of its argument values."""
    for lab, by_id in parts.items():
        for p in by_id.values():
            for c in p.checks:
                if c.label.startswith("hidden check"):
                    assert not HIDDEN_LABEL.fullmatch(c.label), (lab, p.grade_id, c.label)
                    assert re.fullmatch(r"hidden check \d+ \([a-zA-Z0-9 ,'|\-:]+\)", c.label), (lab, c.label)
                    assert label_of(c) == c.label


def test_hidden_failure_messages_do_not_repeat_hidden_inputs(parts):
    """Before: "alpha = 1.0001 must raise a ValueError", "3 bits, symmetric: scale differs", "group_size 16, ...":
    the messages of hidden checks spelled out their inputs."""
    smoothing = parts["lab4"]["test_smoothing_scales"]
    message = failure(check(smoothing, "hidden check 7 (alpha just above the range)"), sent(False))
    assert "1.0001" not in message and "outside [0, 1] must raise" in message
    act_w = check(smoothing, "hidden check 5 (some all-zero channels)")
    assert "0.3" not in failure(act_w, sent(torch.ones(100)))
    find_params = parts["lab5"]["test_find_params"]
    message = failure(check(find_params, "hidden check 3 (the lowest bit width)"), sent((torch.ones(7), torch.zeros(7))))
    assert "2 bits" not in message and "scale differs" in message
    gptq = parts["lab5"]["test_gptq_layer"]
    codes = torch.zeros(20, 64, dtype=torch.int64)
    message = failure(check(gptq, "hidden check 4 (dead input channels)"),
                      sent((codes, torch.ones(20, 4), torch.zeros(20, 4), True)))
    assert "group_size" not in message and "16" not in message


# -- partial credit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lab, answers, expected", [
    ("lab4", {"why_per_token": "c", "why_explicit": "b"}, 3),
    ("lab4", {"why_per_token": "a", "why_explicit": "a"}, 3),
    ("lab5", {"why_identity": "b", "why_scale": "a"}, 5),
    ("lab6", {"why_b_zero": "b", "dq_saves": "a", "why_merge_loses": "a"}, 4),
    ("lab6", {"why_b_zero": "a", "dq_saves": "b", "why_merge_loses": "c"}, 6),
    ("lab6", {"why_b_zero": "b", "dq_saves": "b", "why_merge_loses": "c"}, 10),
])
def test_each_multiple_choice_answer_earns_its_own_points(parts, lab, answers, expected):
    """Before: one wrong letter of a cell's two or three cost the whole cell (6 or 10 points)."""
    p = parts[lab]["test_analysis_answers"]
    result = judge_part(p, [raw(answers[c.label]) for c in p.checks])
    assert result.points == expected, result


def test_the_notebooks_state_the_points_of_each_answer():
    import nbformat
    from pathlib import Path
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "labs" / "source"
    texts = {lab: "\n".join(c.source for c in nbformat.read(root / lab / f"{lab}.ipynb", as_version=4).cells)
             for lab in ("lab4", "lab5", "lab6")}
    assert "a letter each (3 points each)" in texts["lab4"]
    assert "a letter each (5 points each)" in texts["lab5"]
    assert "`why_b_zero` 4 points, `dq_saves` and `why_merge_loses` 3 points each" in texts["lab6"]


# -- no more than the text promises --------------------------------------------------------------------------


def test_gptq_with_identity_hessian_needs_99_percent_of_rtns_codes(parts):
    """The text promises 99 % of the codes; before, H = I demanded every code equal to RTN's (a rounding tie taken
    the other way, with the same layer error up to float rounding, lost the 20 points)."""
    p = parts["lab5"]["test_gptq_layer"]
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 64, generator=g)
    rtn = ql.gptq.rtn(W, 4, 32)
    codes = rtn.int_repr().long().clone()
    scale, zero = (t.reshape(16, 2) for t in ql.gptq.find_params(W.reshape(-1, 32), 4))  # one (scale, zero) per group
    v = W / scale.repeat_interleave(32, dim=1) + zero.repeat_interleave(32, dim=1)
    closest = int(((v % 1) - 0.5).abs().argmin())  # the weight nearest a rounding tie: the other neighbour costs ~nothing
    row, col = divmod(closest, 64)
    other = int(torch.floor(v[row, col])) if codes[row, col] == torch.ceil(v[row, col]) else int(torch.ceil(v[row, col]))
    codes[row, col] = max(0, min(15, other))
    answer = sent((codes, scale, zero, True))
    assert passes(check(p, "H = I"), answer)
    assert not passes(check(p, "H = I"), sent((torch.zeros_like(codes), scale, zero, True)))


# -- no less than the visible tests check --------------------------------------------------------------------


def test_storage_bits_must_be_a_python_int(parts):
    """The visible test asserts `type(bits) is int`; before, the spec took a one-element integer tensor too."""
    p = parts["lab6"]["test_storage_bits"]
    worked = check(p, "the worked example of Part 1")
    assert passes(worked, sent(48))
    assert "must return an int" in failure(worked, sent(torch.tensor([48])))
    assert "must return an int" in failure(worked, sent(48.0))


def test_int8_mini_must_come_from_llm_int8_minilm(parts):
    """The visible test asserts that int8_mini is built by llm_int8_minilm; before, the spec only compared its
    embeddings with qlab's LLM.int8(), which the float model's embeddings also pass."""
    c = parts["lab4"]["test_llm_int8_minilm"].checks[0]
    reference = lab4.llm_int8_reference()
    fp32 = lab4.setup()[3]
    assert passes(c, sent(reference), Outcome(value=plain.Invalid("a module")), sent(reference))
    assert "must come from llm_int8_minilm" in failure(c, sent(fp32), Outcome(value=plain.Invalid("a module")), sent(reference))


# -- errors carried forward ----------------------------------------------------------------------------------


def forgetful_scales(xs: torch.Tensor, fmt: str) -> torch.Tensor:
    """A wrong DelayedScaler: its history never forgets (the flawed "never_forgets" solution)."""
    scales, history, last = [], [], torch.tensor(1.0)
    for x in xs:
        amax = max(history) if history else torch.tensor(0.0)
        if torch.isfinite(amax) and amax > 0:
            last = lab7.FP8_MAX[fmt] / amax
        scales.append(last.float().clone())
        history.append(x.abs().amax())
    return torch.stack(scales)


def test_delayed_quantize_is_judged_with_the_students_own_scaler(parts):
    """Before: a wrong DelayedScaler cost Part 3's 12 points and fp8_quantize_delayed's 8 (its codes differ from
    qlab's); now fp8_quantize_delayed is right if it quantizes with the scales of the student's own scaler."""
    p = parts["lab7"]["test_delayed_quantize"]
    for c in p.checks:
        xs = c.probe.args[0]
        fmt = c.probe.args[2]
        own = forgetful_scales(xs, fmt)
        codes, dequant = ql.fp8.quantize(xs, fmt, scale=own[:, None])
        answer = sent((str(lab7.FP8_DTYPE[fmt]), codes.view(torch.uint8), dequant.flatten()))
        assert passes(c, answer, sent(own)), label_of(c)
        # the same codes, but a scaler that says otherwise: the codes match neither qlab's nor the student's scales
        if not torch.equal(own, lab7.amax_history_scales(xs, c.probe.args[1], fmt)):
            assert not passes(c, answer, sent(own * 2)), label_of(c)


def test_fp8_linear_is_judged_with_the_students_own_quantizer(parts):
    """Part 4 multiplies the codes of "your fp8_quantize": a linear built on a wrong quantizer (here: one that
    puts the amax on 0.7 fp8_max) earns its points when it is the scaled matmul of those codes."""
    p = parts["lab7"]["test_fp8_linear"]
    for c in p.checks:
        if not c.label.startswith("hidden"):
            continue
        x, w, bias, fmt = c.probe.args

        def halved(t):  # a wrong quantizer: the amax lands on 0.7 fp8_max (a power of two would only shift the exponents)
            scale = lab7.FP8_MAX[fmt] * 0.7 / t.abs().amax()
            return (t * scale).to(lab7.FP8_DTYPE[fmt]), (1 / scale).float()

        (x8, xs), (w8, ws) = halved(x), halved(w)
        y = ql.fp8.scaled_mm(x8, w8.t(), xs, ws, bias=bias)
        x_out = sent((str(x8.dtype), x8.view(torch.uint8), xs))
        w_out = sent((str(w8.dtype), w8.view(torch.uint8), ws))
        assert passes(c, sent(y), x_out, w_out), label_of(c)
        assert not passes(c, sent(y), Outcome(raised="NameError", missing=True), Outcome(raised="NameError", missing=True))


def test_kivi_cache_is_judged_with_the_students_own_quantizer(parts):
    """The visible test compares the cache with `your_chunks` (the student's own Part 1); before, the spec compared it
    with qlab's quantizer, so one mistake in Part 1 cost Part 2's 20 points too."""
    p = parts["lab8"]["test_kivi_cache"]

    def own_quantizer(chunk):  # any deterministic "quantizer": the cache rule is what Part 2 grades
        return (chunk * 4).round() / 4

    for c in p.checks:
        k, v, bits, group_size, R = c.probe.args
        if not c.context:
            continue
        chunks = [own_quantizer(probe.args[0]) for probe in c.context]
        T = k.shape[2]
        n_k, n_v = T // R * R, max(T - R, 0)
        k_hat = torch.cat([own_quantizer(k[:, :, i:i + group_size]) for i in range(0, n_k, group_size)] + [k[:, :, n_k:]], 2)
        v_hat = torch.cat(([own_quantizer(v[:, :, :n_v])] if n_v else []) + [v[:, :, n_v:]], 2)
        outs = [sent(chunk) for chunk in chunks]
        assert passes(c, sent((k_hat, v_hat)), *outs), label_of(c)
        wrong_window = k_hat.clone()
        wrong_window[:, :, -1] += 1  # the newest key must stay as it came
        assert not passes(c, sent((wrong_window, v_hat)), *outs), label_of(c)


def test_sq_sweep_and_model_are_judged_with_the_students_own_factors(parts):
    """Part 4 measures SmoothQuant "built with your smoothing_scales": with factors s^2 instead of qlab's s at alpha 0.5 (a
    wrong Part 3), the sweep value and the model made with them earn Part 4's points; numbers that are neither
    qlab's nor the student's do not."""
    stats = lab4.smoothing_statistics()
    alphas = lab4.ALPHAS

    def own(act, w, alpha):
        s = lab4.smoothing_scales(act, w, alpha)
        return s.pow(2) if alpha == 0.5 else s  # not a constant factor: SmoothQuant is blind to those

    own_outs = [sent(own(act, w, alpha)) for alpha in alphas for act, w in stats]
    own_emb = lab4.own_smoothquant_embeddings(0.5, [own(act, w, 0.5) for act, w in stats])
    values = [lab4.cosine_mean(lab4.smoothquant_embeddings(a)) for a in alphas]
    values[1] = lab4.cosine_mean(own_emb)
    assert abs(values[1] - lab4.cosine_mean(lab4.smoothquant_embeddings(0.5))) > 5e-4  # really another number
    best = alphas[values.index(max(values))]
    sweep = parts["lab4"]["test_sq_sweep"].checks[0]
    assert passes(sweep, sent((alphas, tuple(values), best)), *own_outs)
    wrong = list(values)
    wrong[1] += 0.01
    wrong_best = alphas[wrong.index(max(wrong))]
    assert not passes(sweep, sent((alphas, tuple(wrong), wrong_best)), *own_outs)

    fidelity = parts["lab4"]["test_sq_fidelity"].checks[1]
    assert passes(fidelity, sent(own_emb), sent(0.5), *own_outs) == (lab4.cosine_mean(own_emb) >= 0.987)
    qlab_outs = [sent(lab4.smoothing_scales(act, w, alpha)) for alpha in alphas for act, w in stats]
    if lab4.cosine_mean(own_emb) >= 0.987:  # the student's model, judged without their factors, does not agree with qlab's
        assert not passes(fidelity, sent(own_emb), sent(0.5), *qlab_outs)


# -- whole notebooks in the sandbox ----------------------------------------------------------------------------


def test_errors_carried_forward_in_the_sandbox(tmp_path):
    """One earlier mistake costs the cell that has it, not the later cells built on it: the context probes reach the
    student's own functions in the sandbox."""
    from test_autograder import grade_flawed

    (tmp_path / "lab8").mkdir()
    (tmp_path / "lab7").mkdir()
    lost, scores = grade_flawed("lab8", tmp_path / "lab8", {
        # KIVI's quantizer that rounds a half up: Part 1's hidden ties see it; Part 2's cache rule is still right, and
        # is judged with the student's own quantizer (Part 3's glue compares with qlab's cache, so it loses its 10)
        "half_up": [("quantize_groups", "codes = ((g - lo.float()) / step).round()",
                     "codes = ((g - lo.float()) / step + 0.5).floor()")],
    })
    assert "test_kivi_cache" not in lost["half_up"] and "test_quantize_groups" in lost["half_up"], lost
    lost, scores = grade_flawed("lab7", tmp_path / "lab7", {
        "never_forgets": [("delayed_scaler", "self.history = torch.cat([amax, self.history[:-1]])  # (history_len,)",
                           "self.history = torch.cat([amax, self.history])")],
    })
    assert lost == {"never_forgets": ["test_delayed_scaler"]} and scores == {"never_forgets": 88}, (lost, scores)


def test_smoothquant_built_with_a_wrong_smoothing_scales_in_the_sandbox(tmp_path):
    """Lab 4: factors s^2 fail Part 3; the sweep measured with them is still right (before: 10 more points lost),
    and so is sq_model unless those factors take it below the text's absolute 0.987."""
    from test_autograder import grade_flawed

    lost, _ = grade_flawed("lab4", tmp_path, {
        "power": [("smoothing", "return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)",
                   "return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5).pow(2)")],
    })
    stats = lab4.smoothing_statistics()
    own = {a: lab4.cosine_mean(lab4.own_smoothquant_embeddings(a, [lab4.smoothing_scales(x, w, a).pow(2) for x, w in stats]))
           for a in lab4.ALPHAS}
    assert any(abs(own[a] - lab4.cosine_mean(lab4.smoothquant_embeddings(a))) > 5e-4 for a in lab4.ALPHAS)  # qlab's differ
    expected = ["test_smoothing_scales"] + (["test_sq_fidelity"] if max(own.values()) < 0.987 else [])
    assert lost == {"power": sorted(expected)}, (lost, own)


def test_what_labs_4_6_8_forbid_outside_qlab_is_switched_off_in_the_sandbox():
    """Labs 4 and 6 forbid bitsandbytes, lab 8 the gguf package's quantizers: the specs take the lists from
    ql.labs, and the runner refuses them with the lab's explanation (its decoder, gguf.quants.dequantize, stays on)."""
    import json
    import subprocess
    import sys

    import qlab as ql

    assert lab4.IMPORTS == lab6.IMPORTS == ("bitsandbytes",) == ql.labs.IMPORTS["lab6"]
    assert lab8.FOREIGN == ql.labs.FOREIGN["lab8"] and "gguf.quants.dequantize" not in lab8.FOREIGN
    program = """
import json, os, sys
from autograder import sandbox
lab, foreign, imports, source = json.loads(sys.argv[1])
import qlab
qlab.labs.forbid(lab, (), reversible=False, foreign=tuple(foreign), imports=tuple(imports))
reader, writer = os.pipe()
sandbox._Program({"steps": [{"kind": "cell", "grade_id": "c", "source": source}], "lab": lab, "disabled": [],
                  "foreign": foreign, "imports": imports}, writer, 10).run()
os.close(writer)
sys.stdout.buffer.write(os.fdopen(reader, "rb").read())
"""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cases = [("lab6", [], ["bitsandbytes"], "import bitsandbytes", "disabled:bitsandbytes"),
             ("lab8", list(lab8.FOREIGN), [], "import gguf, numpy\ngguf.quants.quantize(numpy.ones((1, 32), numpy.float32), "
              "gguf.GGMLQuantizationType.Q8_0)", "disabled:gguf.quants.quantize"),
             ("lab8", list(lab8.FOREIGN), [], "import gguf, numpy\ngguf.quants.dequantize(numpy.zeros((1, 34), numpy.uint8), "
              "gguf.GGMLQuantizationType.Q8_0)", None)]
    for lab, foreign, imports, source, expected in cases:
        proc = subprocess.run([sys.executable, "-c", program, json.dumps([lab, foreign, imports, source])], cwd=root,
                              capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        first = json.loads(proc.stdout.splitlines()[0])
        assert first == {"cell": "c", "error": expected}, (lab, first)
