"""Score one submission from the plain answers its sandbox sent back. Runs only in the grading process.

Nothing here executes or unpickles anything from the sandbox: the stream is JSON lines, decoded by
`autograder.plain`, and each part's points come from the spec's judges, which compute the expected
values themselves. The first answer for a part counts; lines that are not valid JSON are skipped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from autograder import plain
from autograder.spec import Fail, Outcome, Part

ENDINGS = {  # how the sandbox ended -> (status, reason template)
    "timeout": ("timeout", "the notebook ran longer than the limit of {detail} and was stopped"),
    "signal": ("crashed", "the notebook's process was killed by {detail}"),
    "exit": ("crashed", "the notebook's process exited early ({detail})"),
    "output_limit": ("output_limit", "the notebook sent back {detail} and was stopped"),
    "internal": ("error", "the sandbox failed ({detail}): please report this to the course staff"),
}
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
    status: str  # graded, timeout, crashed, output_limit, empty, corrupt, not_a_notebook, missing, error
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
    return Result(student, lab, status, reason, results, list(notes))


def exception_name(name: str) -> str:
    """The name of what a cell or call raised, if it is a built-in exception; student-made names could
    spell out hidden inputs, so those are not repeated."""
    if name == "CellTimeout" or name in plain.SAFE_TYPE_NAMES:
        return name
    return "an exception of its own class"


def read_stream(stream: bytes) -> tuple[dict[str, list], list[tuple[str, str | None]], bool]:
    """The answers per part, each cell that ran with the name of what it raised (or None), and whether
    the program finished."""
    answers, ran, done = {}, [], False
    for line in stream.split(b"\n"):
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("part"), str) and isinstance(message.get("results"), list):
            answers.setdefault(message["part"], message["results"])
        elif isinstance(message.get("cell"), str) and (message.get("error") is None or isinstance(message["error"], str)):
            ran.append((message["cell"][:100], message["error"] and exception_name(message["error"])))
        elif message.get("done") is True:
            done = True
    return answers, ran, done


def outcome(raw) -> Outcome:
    """One probe's answer as an Outcome; anything malformed becomes an Invalid value."""
    if isinstance(raw, dict) and set(raw) <= {"raised", "missing"} and isinstance(raw.get("raised"), str):
        return Outcome(raised=exception_name(raw["raised"]), missing=raw.get("missing") is True)
    return Outcome(value=plain.decode(raw))


def judge_part(part: Part, results: list | None) -> PartResult:
    """All-or-nothing, like an nbgrader test cell: the first failing check explains the score."""
    if results is None:
        return PartResult(part.grade_id, 0, part.points, "not graded: the notebook stopped before this test")
    for index, check in enumerate(part.checks):
        out = outcome(results[index]) if index < len(results) else Outcome(missing=True)
        try:
            check.judge(out)
        except Fail as failure:
            return PartResult(part.grade_id, 0, part.points, f"{check.label}: {failure}")
        except Exception as error:  # a judge must never take the batch down: the answer is just wrong
            return PartResult(part.grade_id, 0, part.points, f"{check.label}: the answer could not be checked ({type(error).__name__})")
    return PartResult(part.grade_id, part.points, part.points, f"all {len(part.checks)} checks passed")


def judge(student: str, lab: str, parts: list[Part], run: dict, notes: list[str], cells: set[str]) -> Result:
    """The Result of one sandbox run (`autograder.sandbox.run`'s return value); `cells` are the names of
    the program's cells (only those are repeated in notes and reasons)."""
    answers, ran, done = read_stream(run["stream"])
    ran = [(cell, error) for cell, error in ran if cell in cells]
    results = [judge_part(part, answers.get(part.grade_id)) for part in parts]
    notes = list(notes) + [f"cell {cell} raised {error}" for cell, error in ran if error]
    ending, detail = run["ending"], run["detail"]
    if ending == "finished" and done:
        status, reason = "graded", ""
    elif ending == "finished":
        status, reason = "crashed", "the notebook's process exited before the end (sys.exit or os._exit in a cell?)"
    else:
        status, template = ENDINGS[ending]
        reason = template.format(detail=detail + SIGNAL_HINTS.get(detail, ""))
    if status != "graded" and ran:
        reason += f", after cell {ran[-1][0]}"
    return Result(student, lab, status, reason, results, notes, round(run["seconds"], 3))
