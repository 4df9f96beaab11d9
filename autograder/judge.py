"""Score one submission from the plain answers its sandbox sent back. Runs only in the grading process.

Nothing here executes or unpickles anything from the sandbox: the stream is JSON lines, decoded by
`autograder.plain`, and each part's points come from the spec's judges, which compute the expected
values themselves. The first answer for a part counts; lines that are not valid JSON are skipped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from autograder import plain
from qlab.labs import messages
from autograder.spec import Fail, Outcome, Part, label_of

ENDINGS = {  # how the sandbox ended -> (status, reason template)
    "timeout": ("timeout", "the notebook ran longer than the limit of {detail} and was stopped"),
    "signal": ("crashed", "the notebook's process was killed by {detail}"),
    "exit": ("crashed", "the notebook's process exited early ({detail})"),
    "output_limit": ("output_limit", "the notebook sent back {detail} and was stopped"),
    "internal": ("error", "the sandbox failed ({detail}): please report this to the course staff"),
}
DISABLED_PREFIX = "disabled:"  # a runner record "disabled:<name>": the cell called a switched-off qlab function
MAX_NOTES, MAX_NOTE = 20, 300
SIGNAL_HINTS = {"SIGKILL": " (often: out of memory)", "SIGXCPU": " (the CPU-time limit)", "SIGXFSZ": " (the file-size limit)"}


@dataclass
class PartResult:
    grade_id: str
    points: float
    max_points: float
    message: str


@dataclass
class Result:
    """The grade of one student for one lab, with what to tell them."""

    student: str
    lab: str
    status: str  # graded, timeout, crashed, output_limit, empty, corrupt, not_a_notebook, missing, refused, error
    reason: str
    parts: list[PartResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return sum(part.points for part in self.parts)

    @property
    def max_score(self) -> float:
        return sum(part.max_points for part in self.parts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Result":
        data = json.loads(text)
        data["parts"] = [PartResult(**part) for part in data["parts"]]
        return cls(**data)


def unanswered(student: str, lab: str, parts: list[Part], status: str, reason: str, notes=()) -> Result:
    """A result with 0 points in every part, for a submission that never reached the sandbox."""
    results = [PartResult(part.grade_id, 0, part.points, f"not graded: {reason}") for part in parts]
    return Result(student, lab, status, reason, results, cap_notes(list(notes)))


def exception_name(name: str, disabled: dict[str, str] | None = None) -> str:
    """The name of what a cell or call raised, if it is a built-in exception, or the sandbox's own
    explanation when a disabled qlab function was called; student-made names could spell out hidden
    inputs, so those are not repeated."""
    explanation = _explanation(name, disabled)
    if explanation:
        return explanation
    if name == "CellTimeout" or name in plain.SAFE_TYPE_NAMES:
        return name
    return "an exception of its own class"


def _explanation(name: str, disabled: dict[str, str] | None) -> str | None:
    """The sandbox's explanation for a runner record "disabled:<name>" of something the lab switches off."""
    if disabled and name.startswith(DISABLED_PREFIX):
        return disabled.get(name[len(DISABLED_PREFIX):])
    return None


@dataclass
class Stream:
    """What the runner reported, read strictly in the program's order: answers per part, each cell that ran
    with what it raised (or None), whether the runner's completion record came last after every step, and
    whether something other than the runner's records was found on the channel."""

    answers: dict[str, list]
    ran: list[tuple[str, str | None]]
    complete: bool
    forged: bool


def read_stream(stream: bytes, steps: list[tuple[str, str]], disabled: dict[str, str] | None = None) -> Stream:
    """Read the sandbox's JSON lines against the program's steps ((kind, grade_id), kind "cell" or "probe").

    The runner writes exactly one record per step, in order, then {"done": true}. A record that is not the
    next expected one ends the reading: what came before counts, nothing after it does. So a notebook that
    writes its own "done" and exits, or floods the channel with made-up records, is not complete and gets
    no more than the steps it really reached.
    """
    answers, ran, position, complete, forged = {}, [], 0, False, False
    for line in stream.split(b"\n"):
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            forged = True
            break
        if complete or not isinstance(message, dict):
            forged, complete = True, False  # anything after the completion record, or not a record at all
            break
        if position == len(steps):
            if message == {"done": True}:
                complete = True
                continue
            forged = True
            break
        kind, grade_id = steps[position]
        if kind == "cell" and set(message) == {"cell", "error"} and message["cell"] == grade_id and \
                (message["error"] is None or isinstance(message["error"], str)):
            ran.append((grade_id, message["error"] and exception_name(message["error"][:200], disabled)))
        elif kind == "probe" and set(message) == {"part", "results"} and message["part"] == grade_id and \
                isinstance(message["results"], list):
            answers[grade_id] = message["results"]
        else:
            forged = True
            break
        position += 1
    return Stream(answers, ran, complete, forged)


def outcome(raw, disabled: dict[str, str] | None = None) -> Outcome:
    """One probe's answer as an Outcome; anything malformed becomes an Invalid value."""
    if isinstance(raw, dict) and set(raw) <= {"raised", "missing"} and isinstance(raw.get("raised"), str):
        raised = raw["raised"][:200]
        explanation = _explanation(raised, disabled)
        if explanation:
            return Outcome(raised="RuntimeError", disabled=explanation)
        return Outcome(raised=exception_name(raised), missing=raw.get("missing") is True)
    return Outcome(value=plain.decode(raw))


def judge_part(part: Part, results: list | None, disabled: dict[str, str] | None = None) -> PartResult:
    """All-or-nothing, like an nbgrader test cell: the first failing check explains the score. With partial
    credit (every check has points) each passing check earns its points, and the message names the first
    failure and how many checks passed."""
    if results is None:
        return PartResult(part.grade_id, 0, part.points, "not graded: the notebook stopped before this test")
    index, earned, passed, first_failure = 0, 0.0, 0, None
    for check in part.checks:
        outs = []
        for _ in check.probes():
            outs.append(outcome(results[index], disabled) if index < len(results) else Outcome(missing=True))
            index += 1
        failure = None
        try:
            check.judge(*outs)
        except Fail as error:
            failure = f"{label_of(check)}: {error}"
        except Exception as error:  # a judge must never take the batch down: the answer is just wrong
            failure = f"{label_of(check)}: the answer could not be checked ({type(error).__name__})"
        if failure is None:
            passed += 1
            earned += check.points or 0
        elif not part.partial:
            return PartResult(part.grade_id, 0, part.points, failure)
        else:
            first_failure = first_failure or failure
    if not part.partial:
        return PartResult(part.grade_id, part.points, part.points, f"all {len(part.checks)} checks passed")
    earned = part.points if passed == len(part.checks) else round(earned, 6)
    summary = f"{passed} of {len(part.checks)} checks passed"
    return PartResult(part.grade_id, earned, part.points, summary if first_failure is None else f"{summary}; {first_failure}")


def judge(student: str, lab: str, parts: list[Part], run: dict, notes: list[str], steps: list[tuple[str, str]],
          disabled=(), foreign=(), imports=()) -> Result:
    """The Result of one sandbox run (`autograder.sandbox.run`'s return value). `steps` are the program's
    steps as (kind, grade_id); notes about cells come only from the runner's records of those steps."""
    explained = messages(lab, disabled, foreign, imports)
    stream = read_stream(run["stream"], steps, explained)
    ran = stream.ran
    results = [judge_part(part, stream.answers.get(part.grade_id), explained) for part in parts]
    failed = [f"cell {cell} {'failed:' if error in explained.values() else 'raised'} {error}" for cell, error in ran if error]
    notes = cap_notes(list(notes) + failed)
    ending, detail = run["ending"], run["detail"]
    if ending == "finished" and stream.complete:
        status, reason = "graded", ""
    elif ending == "finished" and stream.forged:
        status, reason = "crashed", "the notebook wrote to the grader's channel itself, so what came after could not be trusted"
    elif ending == "finished":
        status, reason = "crashed", "the notebook's process exited before the end (sys.exit or os._exit in a cell?)"
    else:
        status, template = ENDINGS[ending]
        reason = template.format(detail=detail + SIGNAL_HINTS.get(detail, ""))
    if status != "graded" and ran:
        reason += f", after cell {ran[-1][0]}"
    return Result(student, lab, status, reason, results, notes, round(run["seconds"], 3))


def cap_notes(notes: list[str]) -> list[str]:
    """At most MAX_NOTES notes of at most MAX_NOTE characters each; the rest are counted, not listed."""
    kept = [note if len(note) <= MAX_NOTE else note[:MAX_NOTE - 1] + "…" for note in notes[:MAX_NOTES]]
    if len(notes) > MAX_NOTES:
        kept.append(f"... and {len(notes) - MAX_NOTES} more notes like these")
    return kept
