"""Grade a batch: collect, build one sandbox task per submission, run them in parallel, judge, record.

    submissions ─> collect ─> parse + assemble (notebook.py) ─> task ─┬─> sandbox.run  (worker threads, or
                                                                      │                  dask workers)
    records <── judge (this process, one result at a time) <──────────┘

The tasks run on `workers` threads of this process, each of which only waits on a sandbox (the work is
done in the sandboxes' processes), or on a dask.distributed cluster (`scheduler`): the same task, the
same `sandbox.run`, on the cluster's workers. Either way the judging and all writing happen here, as
each answer arrives, so a crash, a timeout or an OOM in one sandbox changes no other student's grade.
"""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import nbformat
from tqdm import tqdm

from autograder import collect, judge, notebook, plain, sandbox, spec
from autograder.records import Records, open_gradebook, write_all_labs_csv


def load_lab(course: Path, lab: str) -> tuple[nbformat.NotebookNode, list[spec.Part], tuple[str, ...]]:
    """The source notebook, the spec's parts and disabled functions; check that they agree."""
    path = Path(course) / "source" / lab / f"{lab}.ipynb"
    if not path.is_file():
        raise ValueError(f"no source notebook {path}")
    source = nbformat.read(path, as_version=4)
    module = spec.load(lab)
    parts = module.parts()
    graded = {cell.metadata["nbgrader"]["grade_id"]: cell.metadata["nbgrader"].get("points", 0)
              for cell in source.cells if cell.metadata.get("nbgrader", {}).get("grade")}
    in_spec = {part.grade_id: part.points for part in parts}
    if graded != in_spec:
        raise ValueError(f"the spec of {lab} does not match its notebook's graded cells: notebook {graded}, spec {in_spec}")
    return source, parts, tuple(module.DISABLED)


def probe_calls(part: spec.Part) -> list[dict]:
    """A part's probes as plain data for the sandbox (the judges stay here): each check's main probe, then
    its context probes, in order. A `spec.Ref` argument travels as {"ref": key}."""
    def transport(value):
        return {"ref": value.key} if isinstance(value, spec.Ref) else plain.to_transport(value)

    return [{"name": probe.name, "read": probe.read, "key": probe.key,
             "args": [transport(arg) for arg in probe.args],
             "kwargs": {key: transport(value) for key, value in probe.kwargs.items()}}
            for check in part.checks for probe in check.probes()]


def forbidden_elsewhere(lab: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the lab's spec forbids outside qlab: (functions of other packages, packages whose import fails)."""
    module = spec.load(lab)
    return tuple(getattr(module, "FOREIGN", ())), tuple(getattr(module, "IMPORTS", ()))


def make_task(lab: str, submission: collect.Submission, program: notebook.Program, calls: dict[str, list],
              disabled: tuple[str, ...], limits: sandbox.Limits, foreign: tuple[str, ...] = (),
              imports: tuple[str, ...] = ()) -> dict:
    steps = [dict(step, calls=calls[step["grade_id"]]) if step["kind"] == "probe" else step for step in program.steps]
    return {"lab": lab, "student": submission.student, "notebook_name": submission.name,
            "notebook_bytes": submission.data, "steps": steps, "disabled": list(disabled),
            "foreign": list(foreign), "imports": list(imports), "limits": asdict(limits)}


def grade(lab: str, submissions: Path, course: Path, workers: int | None = None, limits: sandbox.Limits = sandbox.Limits(),
          scheduler: str | None = None, progress: bool = True) -> list[judge.Result]:
    """Grade every submission under `submissions` for `lab`; record and return the results.

    Args:
        course: the nbgrader course folder (source/<lab>/<lab>.ipynb, gradebook.db); results are written into it.
        workers: sandboxes running at once (default: one per CPU core); ignored with `scheduler`.
        scheduler: address of a dask.distributed scheduler to run the sandboxes on instead.
    """
    course, submissions = Path(course).resolve(), Path(submissions).resolve()
    if not scheduler:
        sandbox.warm_up()  # the fork server imports torch and qlab while we prepare the tasks
        if "mount-namespace" not in sandbox.isolation_level():
            warnings.warn("the sandbox runs without namespaces (grade as root on Linux for full isolation): "
                          "student code can read files readable by its uid and reach the network", stacklevel=2)
        elif "cgroup" not in sandbox.isolation_level():
            warnings.warn("no cgroups to limit each sandbox as a whole (cgroups v2 with the memory, pids and cpu "
                          "controllers, or their v1 hierarchies, writable by root): memory, processes and CPU "
                          "are limited per process only", stacklevel=2)
    source, parts, disabled = load_lab(course, lab)
    foreign, imports = forbidden_elsewhere(lab)
    records = Records(course, lab)
    _register(records, {part.grade_id: part.points for part in parts})
    # 1) a task per readable submission; a result at once for the others
    calls = {part.grade_id: probe_calls(part) for part in parts}
    notebook.assemble(source, [])  # the source itself must be fit to run (raises for the instructor, not per student)
    results, tasks = [], {}
    for submission in collect.collect(submissions, lab):
        notes = [submission.note] if submission.note else []
        try:
            if submission.problem:
                raise notebook.Unreadable(*submission.problem)
            program = notebook.assemble(source, notebook.parse(submission.data))
            tasks[submission.student] = (make_task(lab, submission, program, calls, disabled, limits, foreign, imports), notes + program.notes)
        except notebook.Unreadable as error:
            results.append(judge.unanswered(submission.student, lab, parts, error.status, error.reason, notes))
        except Exception as error:  # nothing one submission holds may stop the batch
            results.append(judge.unanswered(submission.student, lab, parts, "error", _failure("could not be prepared", error), notes))
    # 2) run the sandboxes; judge and record each answer as it arrives (the single writer: this thread)
    failed_writes = []
    with open_gradebook(course) as gradebook:
        for result in results:
            _write(records, gradebook, lab, result, failed_writes)
        bar = tqdm(total=len(results) + len(tasks), initial=len(results), desc=f"grading {lab}", unit="nb", disable=not progress)
        for student, run in _run_all({student: task for student, (task, _) in tasks.items()}, workers, scheduler):
            task, notes = tasks[student]
            steps = [(step["kind"], step["grade_id"]) for step in task["steps"]]
            try:
                result = judge.judge(student, lab, parts, run, notes, steps, disabled, foreign, imports)
            except Exception as error:  # a judge's own bug: this student is reported, the others are graded
                result = judge.unanswered(student, lab, parts, "error", _failure("could not be judged", error), notes)
            _write(records, gradebook, lab, result, failed_writes)
            results.append(result)
            bar.update()
        bar.close()
    if failed_writes:
        warnings.warn(f"the records of {len(failed_writes)} submissions could not be written: {'; '.join(failed_writes[:5])}",
                      stacklevel=2)
    records.write_csv()
    write_all_labs_csv(course)
    return sorted(results, key=lambda result: result.student)


def _failure(what: str, error: Exception) -> str:
    return f"the submission {what} ({type(error).__name__}): please report this to the course staff"


def _write(records: Records, gradebook, lab: str, result: judge.Result, failed: list[str]) -> None:
    """Store one result; a failure to write it is reported at the end and stops no one else's grading."""
    try:
        records.write(gradebook, lab, result)
    except Exception as error:
        result.status, result.reason = "error", f"the grade could not be recorded ({type(error).__name__}: {str(error)[:200]})"
        failed.append(f"{result.student}: {type(error).__name__}")


def _register(records: Records, points: dict[str, float]) -> None:
    """Make sure nbgrader's gradebook knows the lab (its notebook is <lab>.ipynb), registering it as
    `release` does, with nbgrader generate_assignment, if it does not."""
    with open_gradebook(records.course) as gradebook:
        if records.check_registered(gradebook, records.lab, points):
            return
    from labs.release import release_lab

    release_lab(records.lab, records.course)
    with open_gradebook(records.course) as gradebook:
        if not records.check_registered(gradebook, records.lab, points):
            raise ValueError(f"the gradebook in {records.course} has other graded cells for {records.lab} than its source")


def _run_all(tasks: dict[str, dict], workers: int | None, scheduler: str | None):
    """Yield (student, sandbox.run result) as each finishes, locally or on a dask cluster."""
    if not tasks:
        return
    if scheduler:
        from distributed import Client, as_completed

        with Client(scheduler) as client:
            futures = {client.submit(sandbox.run, task, pure=False, key=f"grade-{student}-{os.urandom(4).hex()}"): student
                       for student, task in tasks.items()}
            for future in as_completed(futures):
                yield futures[future], _safe_result(future.result)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        futures = {pool.submit(sandbox.run, task): student for student, task in tasks.items()}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], _safe_result(future.result)


def _safe_result(get) -> dict:
    """A sandbox run's result; if the machinery itself failed, an `internal` ending instead of a crash."""
    try:
        return get()
    except Exception as error:
        detail = f"{type(error).__name__}: {error}"[:300]
        return {"stream": b"", "ending": "internal", "detail": detail, "seconds": 0.0, "isolation": []}
