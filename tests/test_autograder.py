"""The autograder against adversarial submissions: each gets exactly what its honest work deserves.

One batch grades every attack below next to two honest submissions, a blank one and a partly wrong one,
in a copy of labs/ under pytest's tmp_path. Each case states the score its honest work deserves:

- an attack bolted onto correct answers deserves full marks: it must neither help nor hurt;
- an attack on blank answers deserves 0: it must not help;
- a notebook that stops itself (os._exit, a segfault, an endless cell) keeps the parts graded before it stopped,
  as under nbgrader, where a test cell only passes if the notebook reaches it.

Every number is also checked in nbgrader's gradebook, grades_lab1.csv and the feedback pages.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch

from autograder import collect, notebook, plain, sandbox
from autograder.grade import grade, load_lab
from autograder.records import open_gradebook, read_csv
from labs.release import run_nbgrader

ROOT = Path(__file__).resolve().parents[1]
LAB = "lab1"
SOURCE = ROOT / "labs" / "source" / LAB / f"{LAB}.ipynb"
LIMITS = sandbox.Limits(timeout=40, cell_timeout=6, memory_mb=1024)
PART_POINTS = {"test_symmetric_by_hand": 10, "test_symmetric_vs_reference": 10, "test_asymmetric_by_hand": 10,
               "test_asymmetric_vs_reference": 10, "test_sqnr": 10, "test_per_channel": 10, "test_per_group": 10,
               "test_pack_int4": 10, "test_unpack_int4": 5, "test_analysis_sqnr": 8, "test_analysis_answer": 7}


# -- building submissions -------------------------------------------------------------------------------------


def meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def honest() -> nbformat.NotebookNode:
    """What a student who solved everything submits: the solutions without markers, only the visible tests."""
    nb = nbformat.read(SOURCE, as_version=4)
    for cell in nb.cells:
        if meta(cell).get("solution"):
            cell.source = "\n".join(line for line in cell.source.splitlines() if "### " not in line)
        elif meta(cell).get("grade"):
            cell.source = cell.source.split("### BEGIN HIDDEN TESTS")[0]
    return nb


def cell_index(nb, grade_id: str) -> int:
    return next(i for i, cell in enumerate(nb.cells) if meta(cell).get("grade_id") == grade_id)


def blank(nb, *grade_ids):
    """Put the release's stub back into these solution cells (all of them if none are named)."""
    for cell in nb.cells:
        if meta(cell).get("solution") and (not grade_ids or meta(cell)["grade_id"] in grade_ids):
            cell.source = "# YOUR CODE HERE\nraise NotImplementedError()"
    return nb


def add_after(nb, grade_id: str, source: str):
    """A cell of the student's own (no nbgrader metadata) right after the cell grade_id."""
    nb.cells.insert(cell_index(nb, grade_id) + 1, nbformat.v4.new_code_cell(source))
    return nb


def replace(nb, grade_id: str, source: str):
    nb.cells[cell_index(nb, grade_id)].source = source
    return nb


LAST = "test_analysis_answer"


def attacks(course: Path, submissions: Path) -> dict[str, tuple[nbformat.NotebookNode | bytes | None, float]]:
    """Every submission of the batch: (notebook, file bytes or None for no notebook; the score it deserves)."""
    secrets = [course / "source" / LAB / f"{LAB}.ipynb", course / "gradebook.db", SOURCE,
               ROOT / "autograder" / "specs" / "lab1.py", ROOT / ".git" / "HEAD", submissions / "honest_a" / LAB / f"{LAB}.ipynb"]
    cases = {
        "honest_a": (honest(), 100),
        "honest_b": (honest(), 100),
        "blank": (blank(honest()), 0),
        "wrong_why": (replace(honest(), "analysis", honest().cells[cell_index(honest(), "analysis")].source.replace('why = "b"', 'why = "a"')), 97),  # partial credit: `why` is 3 of the cell's 7
        # Patched comparison functions: the judge never uses the sandbox's torch, numpy or math.
        "patched_allclose": (add_after(blank(honest()), "setup", (
            "import math, numpy, torch\n"
            "torch.allclose = torch.equal = numpy.allclose = math.isclose = lambda *a, **k: True\n"
            "torch.Tensor.__eq__ = lambda self, other: True\n")), 0),
        # IPython hooks that blank later cells or hide failures: the sandbox has no IPython shell to hook.
        "ipython_hooks": (add_after(blank(honest()), "setup", (
            "ip = get_ipython()\n"
            "ip.input_transformers_post.append(lambda lines: ['pass\\n'])\n"
            "ip.events.register('post_run_cell', lambda result: None)\n")), 0),
        "showtraceback": (add_after(blank(honest()), "setup", (
            "import sys\n"
            "get_ipython().showtraceback = lambda *a, **k: None\n"
            "sys.excepthook = lambda *a: None\n")), 0),
        "hooks_on_good_work": (add_after(honest(), "setup", (
            "import sys\nsys.excepthook = lambda *a: None\nget_ipython().run_line_magic('time', 'x = 1')\n"
            "%time y = 2\n")), 100),
        # Reading hidden tests, sources, the spec, the gradebook or another student's notebook: any success
        # turns `why` into a wrong answer, so a leak would cost this otherwise perfect notebook 3 points.
        "read_secrets": (add_after(honest(), "analysis", (
            "import os\n"
            f"for path in {[str(p) for p in secrets]!r} + ['../source/lab1/lab1.ipynb', '/proc/1/cwd/x']:\n"
            "    try:\n"
            "        open(path, 'rb').read(10)\n"
            "        why = 'LEAKED'\n"
            "    except OSError:\n"
            "        pass\n"
            f"if os.path.exists({str(ROOT / 'labs')!r}) or os.path.exists({str(course)!r}):\n"
            "    why = 'LEAKED'\n")), 100),
        "write_gradebook": (add_after(blank(honest()), "setup", (
            "import sqlite3\n"
            f"for path in [{str(course / 'gradebook.db')!r}, {str(course / 'grades_lab1.csv')!r}]:\n"
            "    try:\n"
            "        db = sqlite3.connect(path)\n"
            "        db.execute('UPDATE grade SET auto_score = 100')\n"
            "        db.commit()\n"
            "    except Exception:\n"
            "        pass\n"
            f"open({str(course / 'grades_lab1.csv')!r}, 'w').write('student_id,score\\nwrite_gradebook,100\\n')\n")), 0),
        # Processes that outlive the notebook: killed with the sandbox (checked below, no survivors).
        "background_process": (add_after(honest(), LAST, (
            "import os, subprocess, time\n"
            "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(300)\n"
            "    os._exit(0)\n")), 100),
        # Grading-mode detection: the sandbox has a clean environment (the grader's variables are not there).
        "detect_grading": (add_after(honest(), "analysis", (
            "import os\n"
            "if any(k.startswith(('AUTOGRADER', 'NBGRADER', 'QLAB')) for k in os.environ):\n"
            "    why = 'LEAKED'\n")), 100),
        "fake_grading_mode": (add_after(blank(honest()), "setup", (
            "import os\nos.environ['NBGRADER_EXECUTION'] = 'autograde'\nprint('Score: 100 / 100')\n")), 0),
        # Exits: sys.exit is an exception (the cell fails, grading goes on); os._exit and a segfault end the
        # notebook, so the tests after them are not reached.
        "sys_exit": (add_after(honest(), "test_sqnr", "import sys\nsys.exit(0)"), 100),
        "os_exit": (add_after(honest(), "test_sqnr", "import os\nos._exit(0)"), 50),
        "segfault": (add_after(honest(), "test_per_group", "import ctypes\nctypes.string_at(0)"), 70),
        # An endless cell is stopped by the per-cell limit; one that ignores the alarm by the notebook's limit.
        "infinite_loop": (replace(honest(), "analysis", "while True:\n    pass"), 85),
        "ignore_alarm": (add_after(honest(), "test_unpack_int4", (
            "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass")), 85),
        "memory_bomb": (add_after(honest(), LAST, (
            "import torch\nhog = []\n"
            "try:\n    hog.append(bytearray(64 * 2**30))\nexcept MemoryError:\n    pass\n"
            "while True:\n    hog.append(torch.ones(2**27))\n")), 100),
        "fork_bomb": (add_after(honest(), LAST, (
            "import os\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")), 100),
        "output_flood": (add_after(honest(), LAST, (
            "import os\n"
            "for _ in range(2000):\n"
            "    print('x' * 10000)\n"
            "    os.write(1, b'y' * 10000)\n")), 100),
        # Writing to every open file descriptor, the result pipe included: garbage is skipped, too much is cut.
        "result_flood": (add_after(honest(), LAST, (
            "import os\n"
            "junk = b'{\"part\": \"test_sqnr\", \"results\": []}\\n' + b'z' * 2**20\n"
            "for fd in range(3, 64):\n"
            "    try:\n"
            "        for _ in range(40):\n"
            "            os.write(fd, junk)\n"
            "    except OSError:\n"
            "        pass\n")), 100),
        "lying_objects": (add_after(blank(honest()), "setup", (
            "class Liar:\n"
            "    def __eq__(self, other): return True\n"
            "    def __bool__(self): return True\n"
            "    def __float__(self): return 0.0\n"
            "    def __getattr__(self, name): return Liar()\n"
            "    def __call__(self, *a, **k): return Liar()\n"
            "quantize_symmetric = quantize_asymmetric = sqnr_db = pack_int4 = lambda *a, **k: (Liar(), Liar(), Liar())\n"
            "dequantize_symmetric = dequantize_asymmetric = unpack_int4 = lambda *a, **k: Liar()\n"
            "per_channel_qparams = per_group_qparams = lambda *a, **k: Liar()\n"
            "best_granularity = why = Liar()\n")), 0),
        "fake_scores": (add_after(blank(honest()), "setup", (
            "import json, os\n"
            "print('Score: 100 / 100')\n"
            "line = json.dumps({'part': 'test_sqnr', 'results': [{'bool': True}] * 20}) + '\\n'\n"
            "for fd in range(3, 16):\n"
            "    try:\n        os.write(fd, line.encode())\n    except OSError:\n        pass\n")), 0),
        # Smuggling hidden inputs out through feedback: names of student-made classes are never repeated.
        "leak_via_names": (replace(honest(), "quantize_symmetric", (
            "def quantize_symmetric(x, bits):\n"
            "    raise type('LEAK_' + '_'.join(str(int(v * 100)) for v in x.flatten()[:5]), (ValueError,), {})()\n"
            "def dequantize_symmetric(q, scale):\n"
            "    return type('LEAK_' + str(q.numel()), (), {})()\n")), 65),  # part 1 and the analysis, which uses it
        # Structure tampering: tests are rebuilt from the source, cells are matched by grade_id.
        "edited_tests": (_edit_tests(blank(honest()), "print('all visible checks passed')\nassert True"), 0),
        "deleted_tests": (_drop(honest(), lambda cell: meta(cell).get("grade")), 100),
        "duplicated_cells": (_duplicate(honest()), 100),
        "reordered_cells": (_reverse(honest()), 100),
        "retyped_cell": (_retype(honest(), "sqnr"), 75),
        "reid_cell": (_reid(honest(), "packing"), 100),
        "delegate_to_qlab": (_delegate(honest()), 40),
        # Files that are not notebooks.
        "corrupt_json": (b'{"cells": [', 0),
        "not_a_notebook": (b'[1, 2, 3]', 0),
        "empty_file": (b"", 0),
        "no_notebook": (None, 0),
    }
    return cases


def _edit_tests(nb, source):
    for cell in nb.cells:
        if meta(cell).get("grade"):
            cell.source = source
    return nb


def _drop(nb, condition):
    nb.cells = [cell for cell in nb.cells if not condition(cell)]
    return nb


def _duplicate(nb):
    """Every test cell twice, and a broken second copy of a solution cell: the first copy is graded."""
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        if meta(cell).get("grade"):
            cells.append(copy.deepcopy(cell))
            cells[-1].id = cell.id + "-copy"
        if meta(cell).get("grade_id") == "quantize_symmetric":
            broken = copy.deepcopy(cell)
            broken.id, broken.source = cell.id + "-copy", "def quantize_symmetric(x, bits):\n    return None"
            cells.append(broken)
    nb.cells = cells
    return nb


def _reverse(nb):
    nb.cells = nb.cells[::-1]
    return nb


def _retype(nb, grade_id):
    """The sqnr solution cell turned into markdown: not run, so parts 3 and 6 (which use sqnr_db) fail."""
    index = cell_index(nb, grade_id)
    nb.cells[index] = nbformat.v4.new_markdown_cell(nb.cells[index].source, metadata=nb.cells[index].metadata)
    return nb


def _reid(nb, grade_id):
    """A solution cell with its nbgrader metadata gone: it still runs, as one of the student's own cells."""
    nb.cells[cell_index(nb, grade_id)].metadata = {}
    return nb


def _delegate(nb):
    """Parts 1, 3 and 5 call qlab's reference (switched off while grading); reloading qlab does not help.

    Deserved: parts 2 and 4 (40 points); the analysis uses quantize_symmetric and sqnr_db, so it fails too.
    """
    add_after(nb, "setup", (
        "import importlib, qlab\n"
        "for module in ['qlab.core.primitives', 'qlab.core.packing', 'qlab.metrics', 'qlab']:\n"
        "    try:\n        importlib.reload(importlib.import_module(module))\n    except Exception:\n        pass\n"))
    replace(nb, "quantize_symmetric", (
        "import qlab as ql\n"
        "def quantize_symmetric(x, bits):\n"
        "    scale, zero_point = ql.choose_qparams(x, ql.qtype(bits), ql.PerTensor(), symmetric=True)\n"
        "    return ql.quantize(x, scale, zero_point, ql.qtype(bits)).to(torch.int8), scale\n"
        "def dequantize_symmetric(q, scale):\n"
        "    return ql.dequantize(q, scale, 0)\n"))
    replace(nb, "sqnr", "from qlab.metrics import sqnr_db\n")
    replace(nb, "packing", (
        "from qlab import pack_int4 as pack_int4\n"
        "def unpack_int4(packed, n):\n"
        "    return qlab.unpack_int4(packed, (n,), signed=True).to(torch.int8)\n"))
    return nb


# -- the batch ------------------------------------------------------------------------------------------------

# Hiding files, private uids and cutting the network need root on Linux (the CI container runs as root).
isolated = pytest.mark.skipif("mount-namespace" not in sandbox.isolation_level(),
                              reason="the full sandbox needs root and Linux namespaces")


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", root)
    shutil.copytree(ROOT / "labs" / "source", root / "source")
    return root


@pytest.fixture(scope="module")
def batch(course):
    """Grade every case in one batch; return (cases, results by student, course)."""
    submissions = course / "submitted"
    cases = attacks(course, submissions)
    for student, (content, _) in cases.items():
        folder = submissions / student / LAB
        folder.mkdir(parents=True)
        name = "Lab1 (1).ipynb" if student == "honest_b" else f"{LAB}.ipynb"  # a renamed file is still graded
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        elif content is not None:
            nbformat.write(content, folder / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOGRADER_TEST_SECRET", "the sandbox must not see this")  # for detect_grading
        results = grade(LAB, submissions, course, workers=2, limits=LIMITS, progress=False)
    return cases, {result.student: result for result in results}, course


@isolated
def test_every_submission_gets_what_its_honest_work_deserves(batch):
    cases, results, _ = batch
    scores = {student: results[student].score for student in cases}
    assert scores == {student: deserved for student, (_, deserved) in cases.items()}


@isolated
def test_statuses_and_reasons(batch):
    _, results, _ = batch
    expected = {"corrupt_json": "corrupt", "not_a_notebook": "not_a_notebook", "empty_file": "empty",
                "no_notebook": "missing", "os_exit": "crashed", "segfault": "crashed", "ignore_alarm": "timeout",
                "result_flood": "output_limit", "fake_scores": "crashed"}
    for student, result in results.items():
        assert result.status == expected.get(student, "graded"), (student, result.status, result.reason)
        assert (result.reason != "") == (result.status != "graded"), student
    assert "SIGSEGV" in results["segfault"].reason
    assert "renamed" in " ".join(results["honest_b"].notes) or "Lab1 (1).ipynb" in " ".join(results["honest_b"].notes)
    assert any("retyped" in n or "missing" in n for n in results["retyped_cell"].notes)
    assert any("more than once" in n for n in results["duplicated_cells"].notes)
    disabled = results["delegate_to_qlab"].parts[0].message
    assert "is disabled while grading lab1: write it yourself" in disabled and "ql." in disabled, disabled
    assert "grader's channel" in results["fake_scores"].reason


@isolated
def test_no_sandbox_process_survives(batch):
    survivors = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as status:
                    uid = int(next(line for line in status if line.startswith("Uid:")).split()[1])
            except (OSError, StopIteration):
                continue
            if uid >= sandbox.UID_BASE:
                survivors.append(entry)
    assert survivors == []
    parents = sandbox._Cgroup._parents()  # and no sandbox's cgroup is left behind (output floods kill supervisors)
    left = [name for folder in (parents[1] if parents else ()) for name in os.listdir(folder) if name.startswith("qlab-")]
    assert left == []


@isolated
def test_gradebook_csv_and_feedback_agree(batch):
    cases, results, course = batch
    with open_gradebook(course) as gradebook:
        for student in cases:
            submitted = gradebook.find_submission_notebook(LAB, LAB, student)
            cells = {grade.name: grade.score for grade in submitted.grades}
            assert cells == {part.grade_id: part.points for part in results[student].parts}, student
        assert len(gradebook.find_assignment(LAB).submissions) == len(cases)
    with open(course / "grades_lab1.csv", newline="") as file:
        rows = {row["student_id"]: row for row in csv.DictReader(file)}
    assert set(rows) == set(cases)
    for student, row in rows.items():
        assert float(row["score"]) == results[student].score
        assert row["max_score"] == "100" and row["status"] == results[student].status
        assert sum(float(row[grade_id]) for grade_id in PART_POINTS) == results[student].score
    hidden_lines = [line.strip() for cell in nbformat.read(SOURCE, as_version=4).cells
                    for line in cell.source.split("### BEGIN HIDDEN TESTS")[-1].splitlines()
                    if meta(cell).get("grade") and len(line.strip()) > 12]
    for student in cases:
        page = (course / "feedback" / student / LAB / f"{LAB}.html").read_text()
        assert f"{results[student].score:g} / 100 points" in page
        assert not any(line in page for line in hidden_lines), student
        for value in ("63.25", "manual_seed", "per_channel_axis1", "1000000", "LEAK_"):
            assert value not in page, (student, value)


def test_spec_points_match_the_notebook(course):
    _, parts, disabled = load_lab(course, LAB)
    assert {part.grade_id: part.points for part in parts} == PART_POINTS
    assert "quantize" in disabled and "metrics.sqnr_db" in disabled


# -- smaller pieces -------------------------------------------------------------------------------------------


def test_regrading_is_idempotent(course, tmp_path):
    submissions = tmp_path / "flat"
    submissions.mkdir()
    nbformat.write(honest(), submissions / "idem_full.ipynb")
    nbformat.write(blank(honest(), "packing"), submissions / "idem_partial.ipynb")
    first = grade(LAB, submissions, course, workers=2, limits=LIMITS, progress=False)
    csv_before = (course / "grades_lab1.csv").read_text()
    second = grade(LAB, submissions, course, workers=2, limits=LIMITS, progress=False)
    assert [(r.student, r.score, r.status) for r in first] == [(r.student, r.score, r.status) for r in second]
    assert [(r.student, r.score) for r in second] == [("idem_full", 100), ("idem_partial", 85)]
    assert (course / "grades_lab1.csv").read_text() == csv_before
    with open_gradebook(course) as gradebook:
        students = [s.student.id for s in gradebook.find_assignment(LAB).submissions]
    assert students.count("idem_full") == 1


def with_magics(nb, idioms):
    """The honest notebook with Jupyter idioms: cell magics on top of solution cells, line magics inside them."""
    if "cell" in idioms:
        for grade_id, magic in [("quantize_symmetric", "%%time"), ("quantize_asymmetric", "%%prun -s cumulative"),
                                ("sqnr", "%%capture"), ("granularity", "%%capture captured --no-stderr")]:
            cell = nb.cells[cell_index(nb, grade_id)]
            cell.source = f"{magic}\nprint('shown in Jupyter, captured while grading')\n{cell.source}"
        add_after(nb, "packing", "%%timeit -n 1 -r 1 codes = torch.arange(-8, 8)\nassert torch.equal(unpack_int4(pack_int4(codes), 16), codes)")
    if "line" in idioms:
        edited(nb, "analysis", "q, scale = quantize_symmetric(W, BITS)", (
            "%matplotlib inline\n%load_ext autoreload\n!pip list\nfiles = !ls\n"
            "%time q, scale = quantize_symmetric(W, BITS)\n"
            "%timeit -n 1 -r 1 sqnr_db(W, dequantize_symmetric(q, scale))\n"
            "%prun -s time per_channel_qparams(W, BITS)\n"
            "bits = %time BITS\nassert bits == BITS\n"
            "display(W[:2, :2])"))
    if "capture" in idioms:  # what %%capture kept: the print of the granularity cell, nothing of the others
        add_after(nb, "granularity", "captured.show()\nassert 'captured while grading' in captured.stdout")
    return nb


def test_jupyter_idioms_keep_full_marks(course, tmp_path):
    """%%time, %%timeit, %%prun and %%capture run their cell; %time x = ..., %timeit, %prun keep their statement;
    display exists; other magics and shell commands do nothing. None of them costs an honest student a point."""
    submissions = tmp_path / "flat"
    submissions.mkdir()
    cases = {"cell_magics": ("cell",), "line_magics": ("line",), "capture_object": ("cell", "capture"),
             "every_idiom": ("cell", "line", "capture")}
    for student, idioms in cases.items():
        nbformat.write(with_magics(honest(), idioms), submissions / f"{student}.ipynb")
    results = {r.student: r for r in grade(LAB, submissions, course, workers=2, limits=LIMITS, progress=False)}
    for student in cases:
        assert (results[student].score, results[student].status) == (100, "graded"), results[student]
        assert not any("raised" in note for note in results[student].notes), results[student].notes


def test_magics_run_their_code_once_in_the_notebook_namespace():
    """The runner's magics on their own (no sandbox): what runs, what is bound, what does nothing."""
    cells = ["%%time\nx = 1",
             "%%timeit -n 3 -r 2 runs = []\nruns.append(x)",
             "%%capture out --no-stderr\nprint('hello')\ny = 2",
             "%time z = x + y\nvalue = %time z * 10\n%timeit -n 5 runs.append(z)\n%prun -s cumulative w = z\ndisplay(w)",
             "def f(a):\n    b = %time a + 1\n    return b\nv = f(41)",
             "%%bash\nexit 1",
             "%%writefile never.py\nnot_run = True",
             "!touch never_created\nlisted = !ls\n%matplotlib inline",
             "%%capture failed\nprint('before')\nraise ValueError('in the cell')"]
    reader, writer = os.pipe()
    program = sandbox._Program({"steps": [{"kind": "cell", "grade_id": f"c{i}", "source": source}
                                          for i, source in enumerate(cells)]}, writer, cell_timeout=10)
    program.run()
    os.close(writer)
    with os.fdopen(reader) as stream:
        errors = [json.loads(line).get("error") for line in stream][:-1]
    assert errors == [None] * 8 + ["ValueError"]
    ns = program.namespace
    assert (ns["x"], ns["y"], ns["z"], ns["value"], ns["w"], ns["v"], ns["runs"]) == (1, 2, 3, 30, 3, 42, [1, 3])
    assert ns["out"].stdout == "hello\n" and ns["failed"].stdout == "before\n"
    assert "not_run" not in ns and ns["listed"] is None and not os.path.exists("never_created")


def test_grades_csv_per_lab_and_for_all_labs(tmp_path):
    """grades_<lab>.csv: fixed columns, then the test cells in the notebook's order, whatever order the results
    list them in; grades_all.csv: one score column per lab, in lab order (lab2 before lab10). Large fields read back."""
    from autograder.judge import PartResult, Result
    from autograder.records import FIXED_COLUMNS, Records, read_csv, write_all_labs_csv

    course = tmp_path / "course"
    for lab, source in [("lab2", "lab2"), ("lab10", "lab1")]:  # lab10: a copy of lab 1's notebook
        (course / "source" / lab).mkdir(parents=True)
        shutil.copy(ROOT / "labs" / "source" / source / f"{source}.ipynb", course / "source" / lab / f"{lab}.ipynb")
    long_reason = "the notebook's process was killed " + "x" * 200_000  # over csv's default field limit (128 KiB)
    order = {}
    for lab, students in [("lab2", ["ann", "bob"]), ("lab10", ["bob", "cy"])]:
        records = Records(course, lab)
        order[lab] = records.test_cells()
        for index, student in enumerate(students):
            parts = [PartResult(grade_id, index, 10, "") for grade_id in reversed(order[lab])]
            result = Result(student, lab, "crashed" if student == "bob" else "graded", long_reason if student == "bob" else "", parts)
            path = records.record_path(student)
            path.parent.mkdir(parents=True)
            path.write_text(result.to_json())
        records.write_csv()
    source_order = [cell.metadata["nbgrader"]["grade_id"] for cell in nbformat.read(SOURCE, as_version=4).cells
                    if meta(cell).get("grade")]
    assert order["lab10"] == source_order == list(PART_POINTS)
    for lab in ("lab2", "lab10"):
        with open(course / f"grades_{lab}.csv", newline="") as file:
            assert next(csv.reader(file)) == [*FIXED_COLUMNS, *order[lab]]
    rows = {row["student_id"]: row for row in read_csv(course / "grades_lab10.csv")}
    assert rows["bob"]["reason"] == long_reason and rows["cy"]["score"] == str(len(order["lab10"]))
    write_all_labs_csv(course)
    with open(course / "grades_all.csv", newline="") as file:
        assert list(csv.reader(file)) == [["student_id", "lab2", "lab10"], ["ann", "0", ""],
                                          ["bob", str(len(order["lab2"])), "0"], ["cy", "", str(len(order["lab10"]))]]


def test_lms_zip(course, tmp_path):
    archive = tmp_path / "canvas.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zoe/lab1.ipynb", nbformat.writes(honest()))
        zf.writestr("../../yann.ipynb", nbformat.writes(blank(honest())))
        zf.writestr("__MACOSX/zoe/._lab1.ipynb", b"junk")
    found = {s.student: s for s in collect.collect(archive, LAB)}
    assert set(found) == {"zoe", "yann"}


def test_plain_decoding_rejects_what_is_not_plain_data():
    assert isinstance(plain.decode({"tensor": {"dtype": "object", "shape": [1], "data": ""}}), plain.Invalid)
    assert isinstance(plain.decode({"tensor": {"dtype": "int8", "shape": [4], "data": "AAA="}}), plain.Invalid)
    assert isinstance(plain.decode({"other": "Liar"}), plain.Invalid)
    assert isinstance(plain.decode({"pickle": "gASVAAAA"}), plain.Invalid)
    import torch

    t = torch.arange(6, dtype=torch.int8).reshape(2, 3)
    assert (plain.decode(json.loads(json.dumps(plain.encode(t)))) == t.numpy()).all()
    assert plain.decode(plain.encode((1.5, float("inf"), "b", None))) == (1.5, float("inf"), "b", None)


def test_unreadable_notebooks_get_a_status():
    for data, status in [(b"", "empty"), (b"{", "corrupt"), (b"\xff\xfe", "corrupt"), (b'{"cells": 3}', "not_a_notebook"),
                         (b'{"cells": []}', "empty")]:
        with pytest.raises(notebook.Unreadable) as error:
            notebook.parse(data)
        assert error.value.status == status


def test_command_line_help():
    result = subprocess.run([sys.executable, "-m", "autograder", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("release", "grade", "feedback", "export"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "autograder", "grade", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert all(option in result.stdout for option in ("--workers", "--timeout", "--memory", "--scheduler"))


@isolated
def test_feedback_and_export_commands(batch):
    cases, results, course = batch
    with open_gradebook(course) as gradebook:  # an instructor overrides a score in formgrader
        grade_row = gradebook.find_grade("test_analysis_answer", LAB, LAB, "wrong_why")
        grade_row.manual_score = 7
        gradebook.db.commit()
    run = lambda *args: subprocess.run([sys.executable, "-m", "autograder", "--course", str(course), *args, LAB],
                                       cwd=ROOT, capture_output=True, text=True)
    assert run("export").returncode == 0
    with open(course / "grades_lab1.csv", newline="") as file:
        rows = {row["student_id"]: row for row in csv.DictReader(file)}
    assert rows["wrong_why"]["score"] == "100" and rows["honest_a"]["score"] == "100"
    shutil.rmtree(course / "feedback")
    assert run("feedback").returncode == 0
    assert "100 / 100 points" in (course / "feedback" / "wrong_why" / LAB / f"{LAB}.html").read_text()
    # nbgrader's own export reads the same gradebook
    run_nbgrader(["export", "--to", "nbgrader_grades.csv"], course)
    with open(course / "nbgrader_grades.csv", newline="") as file:
        exported = {row["student_id"]: float(row["score"]) for row in csv.DictReader(file) if row["assignment"] == LAB}
    assert exported["wrong_why"] == 100 and exported["blank"] == 0 and exported["os_exit"] == 50


def test_release_command_checks_for_leaks(course):
    result = subprocess.run([sys.executable, "-m", "autograder", "--course", str(course), "release", LAB],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no leaks" in result.stdout and (course / "release" / LAB / f"{LAB}.ipynb").is_file()


def test_dask_local_cluster_grades_the_same(course, tmp_path):
    distributed = pytest.importorskip("distributed")
    submissions = tmp_path / "flat"
    submissions.mkdir()
    nbformat.write(honest(), submissions / "dask_full.ipynb")
    nbformat.write(blank(honest()), submissions / "dask_blank.ipynb")
    nbformat.write(add_after(honest(), "test_sqnr", "import os\nos._exit(0)"), submissions / "dask_exit.ipynb")
    import dask

    # Sandboxes are processes of their own: dask's worker processes must not be daemonic (see the README).
    with dask.config.set({"distributed.worker.daemon": False}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        results = grade(LAB, submissions, course, limits=LIMITS, scheduler=cluster.scheduler_address, progress=False)
    assert {r.student: r.score for r in results} == {"dask_full": 100, "dask_blank": 0, "dask_exit": 50}


# -- labs 2 to 8 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lab", ["lab2", "lab3", "lab4", "lab5", "lab6", "lab7", "lab8"])
def test_later_labs_grade_solution_full_and_blank_zero(lab, tmp_path):
    """The hardened grader agrees with nbgrader on labs 2 to 8: the solution earns 100, a blank copy 0."""
    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "labs" / "source" / lab, course / "source" / lab)
    solution = nbformat.read(ROOT / "labs" / "source" / lab / f"{lab}.ipynb", as_version=4)
    blank = copy.deepcopy(solution)
    for cell in blank.cells:
        if meta(cell).get("solution") and cell.cell_type == "code":
            cell.source = "# YOUR CODE HERE\nraise NotImplementedError()"
    submissions = tmp_path / "submitted"
    for student, nb in (("solver", solution), ("blank", blank)):
        (submissions / student / lab).mkdir(parents=True)
        nbformat.write(nb, submissions / student / lab / f"{lab}.ipynb")
    results = {r.student: r for r in grade(lab, submissions, course, workers=2, progress=False)}
    assert results["solver"].score == results["solver"].max_score == 100, results["solver"]
    assert results["blank"].score == 0, results["blank"]


# -- deliberately flawed solutions lose exactly the points of what they got wrong --------------------------


def edited(nb, grade_id: str, old: str, new: str):
    cell = nb.cells[cell_index(nb, grade_id)]
    assert old in cell.source, (grade_id, old)
    cell.source = cell.source.replace(old, new)
    return nb


def grade_flawed(lab: str, tmp_path, flaws: dict[str, list[tuple[str, str, str]]]) -> tuple[dict, dict]:
    """Grade one copy of the lab's solution per student, each with its (grade_id, old, new) edits applied:
    ({student: sorted grade_ids that earned 0}, {student: score})."""
    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "labs" / "source" / lab, course / "source" / lab)
    submissions = tmp_path / "submitted"
    for student, edits in flaws.items():
        nb = nbformat.read(ROOT / "labs" / "source" / lab / f"{lab}.ipynb", as_version=4)
        for grade_id, old, new in edits:
            nb = edited(nb, grade_id, old, new)
        (submissions / student / lab).mkdir(parents=True)
        nbformat.write(nb, submissions / student / lab / f"{lab}.ipynb")
    results = {r.student: r for r in grade(lab, submissions, course, workers=2, progress=False)}
    lost = {student: sorted(p.grade_id for p in r.parts if p.points == 0) for student, r in results.items()}
    return lost, {student: r.score for student, r in results.items()}


def test_lab4_flawed_solutions_lose_the_right_points(tmp_path):
    lost, scores = grade_flawed("lab4", tmp_path, {
        # the outliers set the row scale: Part 1's outlier cell fails, and so does Part 2, which builds on it
        "absmax_all": [("vectorwise", "absmax = x.masked_fill(outliers, 0.0).abs().amax(dim=1)",
                        "absmax = x.abs().amax(dim=1)")],
        # an alpha picked by hand instead of the best of the sweep (0.25 keeps a mean cosine below 0.987)
        "bad_alpha": [("smoothquant", "best_alpha = max(sweep, key=sweep.get)", "best_alpha = 0.25")],
        # hostile: the float model handed in as the SmoothQuant W8A8 one
        "float_model": [("smoothquant", "sq_model = smoothquant_w8a8(best_alpha)", "sq_model = copy.deepcopy(mini)")],
        # no clamp: an all-zero channel gets s = 0
        "no_clamp": [("smoothing", "return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)",
                      "return act_absmax.float().pow(alpha) / weight_absmax.float().pow(1 - alpha)")],
    })
    assert lost == {
        "absmax_all": ["test_llm_int8_minilm", "test_matmul_outliers", "test_vectorwise_outliers"],
        "bad_alpha": ["test_sq_fidelity", "test_sq_sweep"],
        "float_model": ["test_sq_fidelity"],
        "no_clamp": ["test_smoothing_scales"],
    }, lost
    assert scores == {"absmax_all": 60, "bad_alpha": 75, "float_model": 85, "no_clamp": 85}


def test_lab5_flawed_solutions_lose_the_right_points(tmp_path):
    lost, scores = grade_flawed("lab5", tmp_path, {
        # round-to-nearest in GPTQ's clothes: no error is pushed onto the later columns, so the codes differ from
        # GPTQ's and the tiny GPT keeps RTN's gap; find_params, which it builds on, is still right
        "no_feedback": [("gptq", "err = (w - scale * (q - zero)) / U1[i, i]", "err = torch.zeros_like(w)")],
        # r = 1 in the grid: the hidden block whose loss keeps falling picks it
        "r_one": [("awq", "for i in range(n_grid):  # r = 1 is not in the grid", "for i in range(n_grid + 1):")],
    })
    assert lost == {"no_feedback": ["test_gptq_layer", "test_gptq_model"], "r_one": ["test_awq_scales"]}, lost
    assert scores == {"no_feedback": 60, "r_one": 80}


def test_lab6_flawed_solutions_lose_the_right_points(tmp_path):
    lost, scores = grade_flawed("lab6", tmp_path, {
        # the first code in the low nibble (ql.pack's order, not bitsandbytes'): Part 1 fails, and so does the
        # fine-tuning, whose 4-bit base the glue stores with this quantize_nf4 (every pair of weights swapped)
        "swapped": [("quantize_nf4", "return (codes[0::2] << 4) | codes[1::2], absmax",
                     "return (codes[1::2] << 4) | codes[0::2], absmax")],
        # a value half-way between two levels rounded up: only the worked tie of Part 1 shows it; trained weights
        # almost never sit on a midpoint, so the fine-tuned model is unchanged
        "ties_high": [("quantize_nf4", "codes = torch.bucketize(v, midpoints).to(torch.uint8)",
                       "codes = torch.bucketize(v, midpoints, right=True).to(torch.uint8)")],
        # B drawn like A: step 0 is no longer the base model, and 30 steps do not recover from it
        "random_b": [("lora", "nn.init.zeros_(self.lora_B.weight)",
                      "nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))")],
    })
    assert lost == {"swapped": ["test_qlora_finetune", "test_quantize_nf4"], "ties_high": ["test_quantize_nf4"],
                    "random_b": ["test_lora_layer", "test_qlora_finetune"]}, lost
    assert scores == {"swapped": 60, "ties_high": 75, "random_b": 70}


def test_lab7_flawed_solutions_lose_the_right_points(tmp_path):
    lost, scores = grade_flawed("lab7", tmp_path, {
        # no clamp before the cast: E5M2 overflows to inf (torch 2.13), visible in Part 1's own checks
        "no_clamp": [("fp8_quantize",
                      "codes = (x * scale).clamp(-FP8_MAX[fmt], FP8_MAX[fmt]).to(FP8_DTYPE[fmt])  # 3) clamp first: the cast may overflow",
                      "codes = (x * scale).to(FP8_DTYPE[fmt])")],
        # delayed scaling that already knows this step's amax: a spike is never clipped
        "current_amax": [("delayed_quantize",
                          "scale = scaler.scale(fmt)  # 1) from the previous steps only\n    scaler.update(x)  # 2) this step's amax, for the next steps",
                          "scaler.update(x)\n    scale = scaler.scale(fmt)")],
        # a history that grows for ever: the window never forgets the spike
        "never_forgets": [("delayed_scaler", "self.history = torch.cat([amax, self.history[:-1]])  # (history_len,)",
                           "self.history = torch.cat([amax, self.history])")],
    })
    assert lost == {"no_clamp": ["test_fp8_quantize"], "current_amax": ["test_delayed_quantize"],
                    "never_forgets": ["test_delayed_scaler"]}, lost  # fp8_quantize_delayed: right by the student's own scaler
    assert scores == {"no_clamp": 80, "current_amax": 92, "never_forgets": 88}


def test_lab8_flawed_solutions_lose_the_right_points(tmp_path):
    lost, scores = grade_flawed("lab8", tmp_path, {
        # keys quantized per token (KIVI's axis for values): the cache's keys differ from qlab's; Part 3's glue builds
        # its own cache (keys per channel) on the student's group quantizer, which is still right
        "keys_per_token": [("kivi_cache",
                            'quantize_groups(k[:, :, i:i + group_size], bits, "channel", group_size), bits, "channel")',
                            'quantize_groups(k[:, :, i:i + group_size], bits, "token", group_size), bits, "token")')],
        # no full-precision window: every whole group of keys and every value quantized at once
        "no_window": [("kivi_cache", "n_k = T // R * R", "n_k = T // group_size * group_size"),
                      ("kivi_cache", "n_v = max(T - R, 0)", "n_v = T")],
        # Q8_0 rounded half to even (torch.round), not C's roundf: the worked example's ties show it; the tiny GPT's
        # weights are not on ties, so its GGUF model is unchanged
        "q8_half_even": [("quantize_q8_0", "q = torch.copysign(whole + (a - whole >= 0.5).float(), v)", "q = torch.round(v)")],
        # Q4_0 rounded to nearest instead of truncating x * id + 8.5: a half now goes to even, and 0.2499999 to 8
        "q4_round": [("quantize_q4_0", "q = (blocks * inv + 8.5).trunc().clamp(max=15).to(torch.uint8)",
                      "q = (torch.round(blocks * inv) + 8).clamp(max=15).to(torch.uint8)")],
    })
    assert lost == {"keys_per_token": ["test_kivi_cache"], "no_window": ["test_kivi_cache"],
                    "q8_half_even": ["test_quantize_q8_0"], "q4_round": ["test_quantize_q4_0"]}, lost
    assert scores == {"keys_per_token": 80, "no_window": 80, "q8_half_even": 85, "q4_round": 85}


# -- disabling qlab's functions ------------------------------------------------------------------------------


def test_every_specs_disabled_function_raises_when_called():
    """Each name a grading spec disables, decorated ones included (torch.no_grad() wraps the function in a
    closure), raises the 'disabled while grading' error. In a child process: disabling is for good."""
    program = textwrap.dedent("""
        import importlib, inspect, pathlib
        import qlab
        from autograder.sandbox import _disable
        for spec in sorted(pathlib.Path("autograder/specs").glob("lab*.py")):
            for name in importlib.import_module(f"autograder.specs.{spec.stem}").DISABLED:
                _disable(name, spec.stem)
                function = qlab
                for part in name.split("."):
                    function = getattr(function, part)
                arguments = [None] * len([p for p in inspect.signature(function).parameters.values()
                                          if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD])
                try:
                    function(*arguments)
                except RuntimeError as error:
                    assert f"ql.{name} is disabled while grading {spec.stem}" in str(error), error
                else:
                    raise AssertionError(f"{name} still runs")
                print("disabled", name)
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disabled gptq.quantize_weight" in proc.stdout and "disabled awq.scale_grid_losses" in proc.stdout


# -- issue 14: the sandbox as a whole, batches that never crash, collection that trusts nothing --------------

IPC_KEY = 0x51AB0000 + os.getpid() % 0xFFFF  # SysV keys a notebook below creates; none may outlive it
CLONE = Path("/var/lib") / f"qlab-second-clone-{os.getpid()}"  # outside every folder the old deny-list hid


def _sandbox_attacks(clone: Path) -> dict[str, tuple[nbformat.NotebookNode, float, str]]:
    """Attacks on the sandbox as a whole: (notebook, the score it deserves, the status it must get). Each
    one that succeeds turns `why` into a wrong answer (3 points) on otherwise perfect work."""
    leak = "    why = 'LEAKED'\n"
    return {
        # A second clone of the course anywhere on the host: absent from the sandbox's root.
        "second_clone": (add_after(honest(), "analysis", (
            "import os, sys\n"
            f"clone = {str(clone)!r}\n"
            "for path in [clone + '/autograder/specs/lab1.py', clone + '/labs/source/lab1/lab1.ipynb',\n"
            "             clone + '/qlab/__init__.py', '/work', '/srv', '/opt', '/home', '/root/.bashrc', '/var/lib']:\n"
            "    if os.path.exists(path):\n" + leak +
            "sys.path.insert(0, clone)\n"
            "try:\n    import importlib; importlib.import_module('autograder.specs.lab1')\n" + leak +
            "except Exception:\n    pass\n")), 100, "graded"),
        # The grader's environment: not in os.environ, not in /proc/self/environ even when made readable.
        "environ": (add_after(honest(), "analysis", (
            "import ctypes, os\n"
            "ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: /proc/self/environ becomes readable\n"
            "seen = open('/proc/self/environ', 'rb').read() + repr(dict(os.environ)).encode()\n"
            "if b'QLAB_GRADER_TOKEN' in seen or b'token-for-the-test' in seen:\n" + leak)), 100, "graded"),
        # SysV IPC objects: made in the sandbox's own IPC namespace, gone with it (checked on the host below).
        "sysv_ipc": (add_after(honest(), "analysis", (
            "import ctypes\nlibc = ctypes.CDLL(None)\n"
            f"ids = [libc.shmget({IPC_KEY}, 4096, 0o1666), libc.msgget({IPC_KEY}, 0o1666), libc.semget({IPC_KEY}, 1, 0o1666)]\n"
            "if min(ids) < 0:\n" + leak)), 100, "graded"),
        # Memory and CPU across processes: one cgroup holds them all.
        "memory_across_processes": (add_after(honest(), "analysis", (
            "import os, time\n"
            "children = []\n"
            "for _ in range(3):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        hog = b'x' * (300 * 2**20)\n"
            "        time.sleep(1.5)\n"
            "        os._exit(0)\n"
            "    children.append(pid)\n"
            "held = sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in children)\n"
            "if held == 3:  # 900 MB held at once under a 768 MB limit\n" + leak)), 100, "graded"),
        "cpu_across_processes": (add_after(honest(), "analysis", (
            "import os, time\n"
            "start, before = time.monotonic(), os.times()\n"
            "children = []\n"
            "for _ in range(6):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        end = time.monotonic() + 1.5\n"
            "        while time.monotonic() < end:\n"
            "            pass\n"
            "        os._exit(0)\n"
            "    children.append(pid)\n"
            "for pid in children:\n    os.waitpid(pid, 0)\n"
            "after = os.times()\n"
            "used = after.children_user + after.children_system - before.children_user - before.children_system\n"
            "if used > 1.25 * (time.monotonic() - start):  # more than one core\n" + leak)), 100, "graded"),
        # Status only when true: a forged completion record, then an exit, is a crash.
        "forged_done": (add_after(honest(), "test_sqnr", (
            "import os\n"
            "for fd in range(3, 32):\n"
            "    try:\n        os.write(fd, b'{\"done\": true}\\n')\n    except OSError:\n        pass\n"
            "os._exit(0)\n")), 50, "crashed"),
        # Notes are data: 600,000 forged "cell raised" records and 60 failing cells of the student's own.
        "notes_flood": (add_after(honest(), LAST, (
            "import json, os\n"
            "line = b''.join(json.dumps({'cell': f'{i} for input', 'error': 'E'}).encode() + b'\\n'\n"
            "                for i in range(1000))\n"
            "for fd in range(3, 32):\n"
            "    try:\n"
            "        for _ in range(600):\n            os.write(fd, line)\n"
            "    except OSError:\n        pass\n")), 100, "crashed"),
        "many_failing_cells": (_own_failing_cells(honest(), 60), 100, "graded"),
        # A correct but slow function loses its test's points (one limit for all its probes), nothing else.
        "slow_sqnr": (edited(honest(), "sqnr", "def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:", (
            "import time\n"
            "def sqnr_db(x, x_hat):\n"
            "    if x.shape != (64, 256):\n"
            "        time.sleep(1.0)\n"
            "    return _sqnr_db(x, x_hat)\n"
            "def _sqnr_db(x, x_hat):")), 90, "graded"),
    }


def _own_failing_cells(nb, count: int):
    for index in range(count):
        add_after(nb, LAST, f"raise ValueError('own cell {index}')")
    return nb


@pytest.fixture(scope="module")
def sandbox_batch(course):
    """Grade the sandbox attacks in one batch, with a secret in the grader's environment from the start of
    the fork server, and a second clone of the course on the host."""
    from multiprocessing import forkserver

    submissions = course / "sandbox_attacks"
    submissions.mkdir()
    CLONE.mkdir(parents=True)
    try:
        shutil.copytree(ROOT / "autograder", CLONE / "autograder", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "labs" / "source", CLONE / "labs" / "source")
        shutil.copytree(ROOT / "qlab", CLONE / "qlab", ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
        cases = _sandbox_attacks(CLONE)
        for student, (nb, _, _) in cases.items():
            nbformat.write(nb, submissions / f"{student}.ipynb")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("QLAB_GRADER_TOKEN", "token-for-the-test")
            forkserver._forkserver._stop()  # the next sandbox starts a fork server under this environment
            limits = sandbox.Limits(timeout=60, cell_timeout=4, memory_mb=768)
            results = grade(LAB, submissions, course, workers=2, limits=limits, progress=False)
    finally:
        shutil.rmtree(CLONE, ignore_errors=True)
    return cases, {result.student: result for result in results}


@isolated
def test_sandbox_attacks_get_what_the_work_deserves(sandbox_batch):
    cases, results = sandbox_batch
    if "cgroup" not in sandbox.isolation_level():  # the documented fallback: per-process limits only
        cases = {k: v for k, v in cases.items() if k not in ("memory_across_processes", "cpu_across_processes")}
    got = {student: (results[student].score, results[student].status) for student in cases}
    assert got == {student: (score, status) for student, (_, score, status) in cases.items()}


@isolated
def test_sysv_ipc_does_not_outlive_the_sandbox(sandbox_batch):
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as table:
            keys = [int(line.split()[0]) for line in list(table)[1:]]
        assert IPC_KEY not in keys, kind


@isolated
def test_forged_records_and_notes_floods_stay_small(sandbox_batch, course):
    _, results = sandbox_batch
    assert "grader's channel" in results["notes_flood"].reason
    assert "grader's channel" in results["forged_done"].reason  # its "done" came before the steps it skipped
    for student in ("notes_flood", "many_failing_cells"):
        notes = results[student].notes
        assert len(notes) <= 21 and all(len(note) <= 300 for note in notes), (student, len(notes))
    assert "... and 40 more notes like these" in results["many_failing_cells"].notes
    assert not any("for input" in note for note in results["notes_flood"].notes)  # nothing forged is repeated
    slow = next(part for part in results["slow_sqnr"].parts if part.grade_id == "test_sqnr")
    assert slow.points == 0 and "time limit of its test" in slow.message
    rows = {row["student_id"]: row for row in read_csv(course / "grades_lab1.csv")}
    assert all(len(row["reason"]) < 10_000 for row in rows.values())


@isolated
def test_disabled_function_explains_itself(batch):
    _, results, _ = batch
    messages = " ".join(part.message for part in results["delegate_to_qlab"].parts)
    assert "is disabled while grading lab1: write it yourself" in messages
    assert "raised RuntimeError" not in messages


def _zip_with_damaged_entries(path: Path) -> None:
    """A zip with a good entry, one whose data is corrupt (bad CRC) and one marked encrypted."""
    good = nbformat.writes(honest()).encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("good/lab1.ipynb", good)
        archive.writestr("crc/lab1.ipynb", good)
        archive.writestr("locked/lab1.ipynb", good)
    data = bytearray(path.read_bytes())
    second = data.index(b"crc/lab1.ipynb") + len("crc/lab1.ipynb") + 100
    data[second] ^= 0xFF  # a byte of the stored notebook: its CRC no longer matches
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # set the "encrypted" flag of the third entry's headers
        start = 0
        while (start := data.find(header, start)) != -1:
            name_at = start + (30 if header == b"PK\x03\x04" else 46)
            if data[name_at:name_at + 17] == b"locked/lab1.ipynb":
                flag_at = start + (6 if header == b"PK\x03\x04" else 8)
                data[flag_at] |= 1
            start += 4
    path.write_bytes(bytes(data))


def _hostile_files(folder: Path, course: Path) -> dict[str, tuple[str, float]]:
    """Write submissions that used to crash or fool collection; return {student id: (status, score)}."""
    expected = {}

    def write(name: str, data: bytes, status: str, score: float = 0, student: str | None = None):
        (folder / f"{name}.ipynb").write_bytes(data)
        expected[student or collect.student_id(name)] = (status, score)

    write("deep_json", b"[" * 200_000 + b"]" * 200_000, "corrupt")
    write("huge_int", b'{"cells": [], "n": ' + b"9" * 20_000 + b"}", "corrupt")
    write("bad_v3", b'{"nbformat": 3, "nbformat_minor": 0, "worksheets": "not a list", "metadata": {}}', "corrupt")
    write("v3_honest", nbformat.writes(nbformat.convert(honest(), 3)).encode(), "graded", 100)
    write("Zoë Brontë", nbformat.writes(honest()).encode(), "graded", 100, "Zoe_Bronte")
    write("\u202e\u200blong" + "\u00e9" * 110, nbformat.writes(blank(honest())).encode(), "graded", 0)
    write("erin_smith", nbformat.writes(honest()).encode(), "graded", 100)
    write("erin smith", nbformat.writes(blank(honest())).encode(), "graded", 0,
          f"erin_smith-{collect._digest('erin smith')}")
    (folder / "sym_file.ipynb").symlink_to(course / "source" / LAB / f"{LAB}.ipynb")  # the instructor's source
    expected["sym_file"] = ("refused", 0)
    (folder / "sym_folder").symlink_to(course / "source")  # a whole folder of someone else's
    expected["sym_folder"] = ("refused", 0)
    os.mkfifo(folder / "pipe.ipynb")  # reading it would block the batch for ever
    expected["pipe"] = ("refused", 0)
    (folder / "inner" / LAB).mkdir(parents=True)
    (folder / "inner" / LAB / f"{LAB}.ipynb").symlink_to(course / "source" / LAB / f"{LAB}.ipynb")
    expected["inner"] = ("refused", 0)
    return expected


@isolated
def test_hostile_files_never_stop_the_batch(course, tmp_path):
    """Deep JSON, huge integers, broken nbformat-3 files, odd and over-long unicode names, id collisions and
    symbolic links each get a status and a reason; everyone else is graded, and the records can be read back."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    expected = _hostile_files(folder, course)
    results = {r.student: r for r in grade(LAB, folder, course, workers=2, limits=LIMITS, progress=False)}
    assert {student: (r.status, r.score) for student, r in results.items()} == expected
    assert all(r.reason for r in results.values() if r.status != "graded")
    assert "symbolic link" in results["sym_file"].reason
    assert any("erin_smith" in note for note in results["erin_smith"].notes)
    assert all(len(student) <= collect.MAX_ID and student.isascii() for student in results)
    rows = {row["student_id"] for row in read_csv(course / "grades_lab1.csv")}
    assert set(results) <= rows
    zipped = tmp_path / "lms.zip"
    _zip_with_damaged_entries(zipped)
    found = {s.student: s for s in collect.collect(zipped, LAB)}
    assert found["good"].problem is None
    assert found["crc"].problem[0] == "corrupt" and "BadZipFile" in found["crc"].problem[1]
    assert found["locked"].problem[0] == "corrupt" and "encrypted" in found["locked"].problem[1]


# -- the spec format's refinements and the strict reading of the runner's records (no sandbox) ---------------


def _run_program(steps: list[dict], cell_timeout: float = 10, disabled=(), lab: str = "lab1") -> tuple[bytes, dict]:
    reader, writer = os.pipe()
    program = sandbox._Program({"steps": steps, "lab": lab, "disabled": list(disabled)}, writer, cell_timeout=cell_timeout)
    program.run()
    os.close(writer)
    with os.fdopen(reader, "rb") as stream:
        return stream.read(), program.namespace


def _probes(part) -> list[dict]:
    from autograder.grade import probe_calls

    return probe_calls(part)


def test_partial_credit_context_probes_and_refs():
    """Points per check; a judge that gets the student's own earlier value (errors carried forward) through a
    context probe, with a Ref to a keyed probe's return value that never leaves the sandbox."""
    from autograder import judge as judging
    from autograder.spec import Check, Fail, Part, Ref, call, expect, read

    def square_is_right(out):
        expect(out.value == 9, "square(3) is not 9")

    def answer_consistent(out, own_square):  # the student's answer must be what their own square gives
        expect(out.value == own_square.value + 1, "answer is not square(3) + 1 by your own square")

    def twice_the_object(out):
        expect(out.value == 2 * 16, "double(box) is wrong")

    part = Part("p", 10, (
        Check(call("square", 3), square_is_right, "the square", points=4),
        Check(read("answer"), answer_consistent, "the answer", points=3, context=(call("square", 3),)),
        Check(call("make_box", key="box"), lambda out: None, "the box", points=1),
        Check(call("double", Ref("box")), twice_the_object, "the doubled box", points=2),
    ))
    source = ("def square(x):\n    return x * x + 1  # a bug\n"
              "answer = square(3) + 1\n"
              "class Box:\n    value = 16\n"
              "def make_box():\n    return Box()\n"
              "def double(box):\n    return 2 * box.value\n")
    stream, _ = _run_program([{"kind": "cell", "grade_id": "c", "source": source},
                              {"kind": "probe", "grade_id": "p", "calls": _probes(part)}])
    read_back = judging.read_stream(stream, [("cell", "c"), ("probe", "p")])
    assert read_back.complete and not read_back.forged
    result = judging.judge_part(part, read_back.answers["p"])
    # the square is wrong (-4); the answer is right given the student's own square (+3); the box (+1) and
    # the doubled box, computed from the student's own object passed back in (+2)
    assert result.points == 6 and result.max_points == 10
    assert result.message.startswith("3 of 4 checks passed; the square: square(3) is not 9")
    with pytest.raises(ValueError, match="add up to 9, not 10"):
        Part("q", 10, (Check(call("f"), lambda out: None, "a", points=4), Check(call("g"), lambda out: None, "b", points=5)))
    with pytest.raises(ValueError, match="names no earlier probe"):
        Part("q", 1, (Check(call("f", Ref("later")), lambda out: None, "a"),))


def test_one_time_limit_for_all_probes_of_a_test():
    """--cell-timeout is per test: three 0.4 s calls under a 1 s limit; the third is cut, the next test is not."""
    from autograder.spec import Check, Part, call

    slow = Part("slow", 1, tuple(Check(call("nap", 0.4), lambda out: None, f"nap {i}") for i in range(3)))
    fast = Part("fast", 1, (Check(call("nap", 0.0), lambda out: None, "no nap"),))
    stream, _ = _run_program([{"kind": "cell", "grade_id": "c", "source": "import time\ndef nap(s):\n    time.sleep(s)\n    return s"},
                              {"kind": "probe", "grade_id": "slow", "calls": _probes(slow)},
                              {"kind": "probe", "grade_id": "fast", "calls": _probes(fast)}], cell_timeout=1.0)
    records = [json.loads(line) for line in stream.splitlines()]
    assert [r.get("raised") for r in records[1]["results"]] == [None, None, "CellTimeout"]
    assert records[2]["results"] == [{"float": "0.0"}]


def test_the_runner_records_are_read_in_program_order_only():
    from autograder import judge as judging

    steps = [("cell", "a"), ("probe", "t"), ("cell", "b")]
    good = b'{"cell": "a", "error": null}\n{"part": "t", "results": []}\n{"cell": "b", "error": "ValueError"}\n{"done": true}\n'
    read_back = judging.read_stream(good, steps)
    assert read_back.complete and not read_back.forged and read_back.ran == [("a", None), ("b", "ValueError")]
    forged_done = b'{"cell": "a", "error": null}\n{"done": true}\n'
    assert not judging.read_stream(forged_done, steps).complete
    made_up = b'{"cell": "a", "error": null}\n{"cell": "x raised KeyError for input 3", "error": "KeyError"}\n'
    read_back = judging.read_stream(made_up, steps)
    assert read_back.forged and read_back.ran == [("a", None)] and not read_back.answers
    after_done = good + b'{"part": "t", "results": [{"bool": true}]}\n'
    assert not judging.read_stream(after_done, steps).complete
    assert judging.read_stream(b"[" * 100_000 + b"\n", steps).forged  # nested too deeply: no crash


def test_hidden_checks_name_their_input_category():
    from autograder.spec import Check, call, label_of

    check = Check(call("f", torch.tensor([[0.5, 1.5], [2.0, 3.0]]), 4, axis=-1), lambda out: None, "hidden check 3")
    assert label_of(check) == "hidden check 3 (a 2-D all-positive float tensor; 4; axis=-1)"
    tie = Check(call("f", torch.tensor([-2.5, 0.5, 1.5])), lambda out: None, "tie at .5")
    assert label_of(tie) == "tie at .5"  # hand-written labels stay as they are
    assert "0.5" not in label_of(check) and "3.0" not in label_of(check)


def test_disabled_function_message_reaches_notes_and_parts():
    from autograder import judge as judging
    from autograder.spec import Check, Part, call, returned

    part = Part("t", 2, (Check(call("mine", torch.ones(2)), lambda out: returned(out, None, "mine"), "worked example"),))
    source = "import qlab as ql\ndef mine(x):\n    return ql.metrics.sqnr_db(x, x)\nmine(1)"
    program = textwrap.dedent("""
        import json, os, sys
        from autograder import sandbox
        from autograder.grade import probe_calls
        sandbox._disable("metrics.sqnr_db", "lab1")
        steps = json.loads(sys.argv[1])
        reader, writer = os.pipe()
        sandbox._Program({"steps": steps, "lab": "lab1", "disabled": ["metrics.sqnr_db"]}, writer, 10).run()
        os.close(writer)
        sys.stdout.buffer.write(os.fdopen(reader, "rb").read())
    """)
    import numpy as np

    calls = [{**c, "args": [a.tolist() if isinstance(a, np.ndarray) else a for a in c["args"]]} for c in _probes(part)]
    steps = [{"kind": "cell", "grade_id": "c", "source": source}, {"kind": "probe", "grade_id": "t", "calls": calls}]
    proc = subprocess.run([sys.executable, "-c", program, json.dumps(steps)], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = {"stream": proc.stdout, "ending": "finished", "detail": "", "seconds": 0.1}
    result = judging.judge("s", "lab1", [part], run, [], [("cell", "c"), ("probe", "t")], ("metrics.sqnr_db",))
    message = "ql.metrics.sqnr_db is disabled while grading lab1: write it yourself"
    assert result.notes == [f"cell c failed: {message}"]
    assert result.parts[0].message == f"worked example: mine failed: {message}"


def test_local_and_graded_scores_agree_for_a_delegating_solution(course, tmp_path):
    """A solution that calls qlab's versions fails the same test cells when the student runs the notebook
    (the setup cell switches them off there too, ql.labs.forbid) as in grading."""
    from nbclient import NotebookClient

    nb = replace(honest(), "quantize_symmetric", (
        "import qlab as ql\n"
        "def quantize_symmetric(x, bits):\n"
        "    scale, zero_point = ql.choose_qparams(x, ql.qtype(bits), ql.PerTensor(), symmetric=True)\n"
        "    return ql.quantize(x, scale, zero_point, ql.qtype(bits)).to(torch.int8), scale\n"
        "def dequantize_symmetric(q, scale):\n"
        "    return q.float() * scale\n"))
    replace(nb, "sqnr", "from qlab.metrics import sqnr_db\n")
    local = copy.deepcopy(nb)
    NotebookClient(local, timeout=120, allow_errors=True, resources={"metadata": {"path": str(tmp_path)}}).execute()
    failed_locally = {meta(cell)["grade_id"] for cell in local.cells if meta(cell).get("grade")
                      and any(output.get("output_type") == "error" for output in cell.get("outputs", []))}
    submissions = tmp_path / "flat"
    submissions.mkdir()
    nbformat.write(nb, submissions / "delegating.ipynb")
    result, = grade(LAB, submissions, course, workers=1, limits=LIMITS, progress=False)
    failed_graded = {part.grade_id for part in result.parts if part.points < part.max_points}
    assert {"test_symmetric_by_hand", "test_sqnr"} <= failed_locally
    assert failed_locally == failed_graded


# -- issue 14, item 11, 12, 14: grading what each notebook states ----------------------------------------
#
# The autograder grades what each notebook states, no less and no more (issue 14, items 11, 12 and 14).
#
# - Lab 2: `test_ptq_accuracy` promises "each model within 1.0 percentage point of FP32": a model built with other,
#   valid calibration choices keeps its 20 points, one more than a point below FP32 loses them.
# - Lab 3: QAT is graded at 3 bits, where the untrained model (LSQ's initial step sizes) is far below the bar: a
#   notebook that skips training gets nothing for the QAT parts.
# - Lab 1: errors carried forward: a per-channel bug costs `test_per_channel`'s points, not the analysis that builds on it;
#   partial credit: a wrong answer to one of the two analysis questions costs that question's points only.
#
# Each lab's cases are graded in one batch, in a copy of the lab under pytest's tmp_path.


def source_notebook(lab: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "labs" / "source" / lab / f"{lab}.ipynb", as_version=4)


def grade_lab_batch(lab: str, root: Path, cases: dict[str, nbformat.NotebookNode]) -> dict:
    """Grade every case of one lab in one batch: {student: Result}."""
    course = root / "course"
    course.mkdir()
    shutil.copy(ROOT / "labs" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "labs" / "source" / lab, course / "source" / lab)
    submissions = root / "submitted"
    for student, nb in cases.items():
        (submissions / student / lab).mkdir(parents=True)
        nbformat.write(nb, submissions / student / lab / f"{lab}.ipynb")
    return {r.student: r for r in grade(lab, submissions, course, workers=2, progress=False)}


def part_points(result) -> dict[str, float]:
    return {part.grade_id: part.points for part in result.parts}


def points_lost(result) -> dict[str, float]:
    """{grade_id: points lost} of the parts that did not earn all their points."""
    return {part.grade_id: part.max_points - part.points for part in result.parts if part.points < part.max_points}


# -- lab 1 --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fair_lab1(tmp_path_factory):
    cases = {
        "honest": source_notebook("lab1"),
        # a per-channel bug (the unsigned grid's qmax): the analysis, done right on top of it, keeps its points
        "per_channel_bug": edited(source_notebook("lab1"), "granularity",
                                  "    qmax = 2 ** (bits - 1) - 1\n    channels =", "    qmax = 2 ** bits - 1\n    channels ="),
        # one of the two analysis questions wrong: that question's 3 points only
        "wrong_why": edited(source_notebook("lab1"), "analysis", 'why = "b"', 'why = "a"'),
        # one SQNR of four wrong: its 2 points only (best_granularity is still right by the reference)
        "one_sqnr_off": edited(source_notebook("lab1"), "analysis", "best_granularity = max(",
                               "sqnr_per_group += 1.0\nbest_granularity = max("),
    }
    return grade_lab_batch("lab1", tmp_path_factory.mktemp("lab1"), cases)


@isolated
def test_lab1_honest_full_marks(fair_lab1):
    assert fair_lab1["honest"].score == 100, fair_lab1["honest"]


@isolated
def test_lab1_per_channel_bug_costs_only_its_own_part(fair_lab1):
    assert points_lost(fair_lab1["per_channel_bug"]) == {"test_per_channel": 10}, fair_lab1["per_channel_bug"]


@isolated
def test_lab1_partial_credit(fair_lab1):
    assert points_lost(fair_lab1["wrong_why"]) == {"test_analysis_answer": 3}, fair_lab1["wrong_why"]
    assert points_lost(fair_lab1["one_sqnr_off"]) == {"test_analysis_sqnr": 2}, fair_lab1["one_sqnr_off"]
    message = next(p.message for p in fair_lab1["wrong_why"].parts if p.grade_id == "test_analysis_answer")
    assert message.startswith("1 of 2 checks passed") and "why" in message, message


# -- lab 2 --------------------------------------------------------------------------------------------------------

THRESHOLD = "act_qparams = {name: symmetric_int8_qparams(layer_threshold(x, method)) for name, x in inputs.items()}"


@pytest.fixture(scope="module")
def fair_lab2(tmp_path_factory):
    cases = {
        "honest": source_notebook("lab2"),
        # a different but valid calibration: every threshold 10 % above the prescribed one, still within 1 point of FP32
        "wider_thresholds": edited(source_notebook("lab2"), "static_w8a8", THRESHOLD,
                                   THRESHOLD.replace("layer_threshold(x, method)", "1.1 * layer_threshold(x, method)")),
        # thresholds far too small: everything clips and the models fall far below FP32
        "clipped": edited(source_notebook("lab2"), "static_w8a8", THRESHOLD,
                          THRESHOLD.replace("layer_threshold(x, method)", "0.05 * layer_threshold(x, method)")),
    }
    return grade_lab_batch("lab2", tmp_path_factory.mktemp("lab2"), cases)


@isolated
def test_lab2_honest_full_marks(fair_lab2):
    assert fair_lab2["honest"].score == 100, fair_lab2["honest"]


@isolated
def test_lab2_other_valid_calibration_keeps_the_accuracy_points(fair_lab2):
    # before: the hidden checks compared scales and logits with qlab's model, and this earned 0 of 20
    assert fair_lab2["wider_thresholds"].score == 100, fair_lab2["wider_thresholds"]


@isolated
def test_lab2_more_than_a_point_below_fp32_loses_them(fair_lab2):
    # the analysis is right given the student's own static_w8a8 (errors carried forward): only Part 5's accuracy is lost
    assert points_lost(fair_lab2["clipped"]) == {"test_ptq_accuracy": 20}, fair_lab2["clipped"]
    message = next(p.message for p in fair_lab2["clipped"].parts if p.grade_id == "test_ptq_accuracy")
    assert "more than 1 point below FP32" in message, message


# -- lab 3 --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fair_lab3(tmp_path_factory):
    cases = {
        "honest": source_notebook("lab3"),
        # no training at all: qat_model is prepare_qat's model with LSQ's initial step sizes
        "untrained": edited(source_notebook("lab3"), "train_qat", "train_qat(qat_model, x_train, y_train, epochs=5, lr=1e-3)", "pass"),
        # training in name only (one epoch at a learning rate of 1e-7): the step sizes move, the accuracy does not
        "barely_trained": edited(source_notebook("lab3"), "train_qat", "epochs=5, lr=1e-3)", "epochs=1, lr=1e-7)"),
        # round half away from zero instead of half to even: only the forward test's tie check fails
        "half_away": edited(source_notebook("lab3"), "ste", "code = torch.round(x / scale) + zero_point",
                            "code = torch.sign(x / scale) * torch.floor((x / scale).abs() + 0.5) + zero_point"),
    }
    return grade_lab_batch("lab3", tmp_path_factory.mktemp("lab3"), cases)


@isolated
def test_lab3_honest_full_marks(fair_lab3):
    assert fair_lab3["honest"].score == 100, fair_lab3["honest"]


@isolated
def test_lab3_untrained_model_gets_nothing_for_qat(fair_lab3):
    # before: at 4 bits the untrained model (99.4 %) passed test_qat_is_4bit's accuracy bar
    assert points_lost(fair_lab3["untrained"]) == {"test_qat_accuracy": 25, "test_qat_is_3bit": 10}, fair_lab3["untrained"]
    # before: at 4 bits LSQ's initial step sizes alone gave 99.4 %, so a token training step earned all 35 points
    assert points_lost(fair_lab3["barely_trained"]) == {"test_qat_accuracy": 25, "test_qat_is_3bit": 10}, fair_lab3["barely_trained"]


@isolated
def test_lab3_round_half_even_is_checked(fair_lab3):
    assert points_lost(fair_lab3["half_away"]) == {"test_ste_forward": 10}, fair_lab3["half_away"]
    message = next(p.message for p in fair_lab3["half_away"].parts if p.grade_id == "test_ste_forward")
    assert "ties at .5" in message, message


def test_lab3_text_numbers_hold():
    """The numbers lab 3's text gives for choosing 3 bits: 4-bit PTQ keeps 99.2 % and the untrained 4-bit QAT
    model reaches 99.4 %; at 3 bits PTQ falls to about 62 % and the untrained QAT model to about 83 %."""
    from autograder.specs import lab3

    assert lab3.reference_ptq(4) == pytest.approx(0.992, abs=0.002)
    assert lab3.reference_ptq(4, steps="lsq") == pytest.approx(0.994, abs=0.002)
    assert lab3.reference_ptq(3) == pytest.approx(0.62, abs=0.02)
    assert lab3.reference_ptq(3, steps="lsq") == pytest.approx(0.83, abs=0.02)
