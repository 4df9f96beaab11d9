"""Run one submission in a sandbox and return what it answered, as bytes nobody has interpreted yet.

Three processes take part, and only the last one ever runs student code:

    grading process ──(fork server)──> A supervisor   (root, trusted: never runs student code)
                                        └─ fork ──> B init  (pid 1 of a new PID namespace, trusted)
                                                     └─ fork ──> C runner  (unprivileged: runs the notebook)

1) The fork server is started once per grading process with torch, numpy, qlab and IPython already
   imported, and it never sees a task, so every sandbox starts from the same clean memory. Forking it
   costs milliseconds where a Jupyter kernel costs seconds.
2) A (the fork server's child) unshares a mount, PID and network namespace, forks B and enforces the
   whole-notebook wall-clock limit: at the deadline it kills B, and the kernel then kills every process
   of the namespace, including any that detached with setsid or double forks.
3) B hides the repository, the course folder and the grading spec under empty tmpfs mounts, gives
   the sandbox private tmpfs scratch space (/tmp, /var/tmp, /dev/shm) holding only the submission,
   mounts a /proc that shows only the sandbox, forks C, reaps orphans and exits when C does.
4) C closes every inherited file descriptor except the result pipe, sets resource limits (address
   space, CPU time, processes, file size, no core dumps), drops to a uid of its own (1000000 + A's pid,
   so that no two sandboxes share one and RLIMIT_NPROC is per sandbox), switches off the qlab
   functions the lab asks students to write, then runs the program: the student's cells, and in place
   of each test cell a *probe* that calls the student's functions on the judge's inputs and writes
   the results to the pipe as one JSON line per part (see `autograder.plain`).

What comes back is only the student's answers. Verdicts are computed elsewhere (`autograder.judge`)
by a process that never ran student code, so nothing the notebook patches or prints can set a score.

Without root (or where the kernel forbids namespaces) the sandbox still sets the limits, the timeouts
and the process-group kill, but cannot hide files, change uid or cut the network: `isolation` in
the result says which protections were in force, and the README tells instructors to grade as root
(for example in a container).
"""

from __future__ import annotations

import builtins
import ctypes
import functools
import importlib.util
import json
import multiprocessing
import os
import resource
import select
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy  # noqa: F401  (loaded before the sandbox starts: the runner's hidden folders hold no imports)
import torch
from IPython.core.inputtransformer2 import TransformerManager
from IPython.utils.capture import capture_output

import qlab

from autograder import plain

# Linux constants (sched.h, sys/mount.h, sys/prctl.h).
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

UID_BASE = 1_000_000  # sandbox uid = UID_BASE + pid of its supervisor: unique among running sandboxes
RESULT_CAP = 32 * 2**20  # bytes of answers read back from one submission at most
EXIT_TIMEOUT, EXIT_INTERNAL, EXIT_SIGNAL = 98, 97, 100  # A's exit codes; EXIT_SIGNAL + n: C died of signal n

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox.

    timeout: wall-clock seconds for the whole notebook (cells and probes); also its CPU-time limit.
    cell_timeout: wall-clock seconds for one cell or one part's probe.
    memory_mb: address space the notebook may add to the preloaded interpreter.
    processes: processes and threads the sandbox uid may have at once.
    file_mb: largest file, and size of each scratch tmpfs.
    """

    timeout: float = 120.0
    cell_timeout: float = 30.0
    memory_mb: int = 2048
    processes: int = 64
    file_mb: int = 64

    def __post_init__(self):
        if self.timeout <= 0 or self.cell_timeout <= 0 or self.memory_mb <= 0:
            raise ValueError(f"timeouts and memory must be positive, got {self}")


# -- the grading side: start a sandbox, read its answers --------------------------------------------------


_context_lock = threading.Lock()


def _fork_server() -> multiprocessing.context.BaseContext:
    """The fork-server context, with this module (torch, qlab, IPython) preloaded in the server."""
    with _context_lock:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["autograder.sandbox"])
        return context


def warm_up() -> None:
    """Start the fork server now (it takes a few seconds to import torch), not at the first submission."""
    _fork_server()
    from multiprocessing import forkserver

    forkserver.ensure_running()


def run(task: dict) -> dict:
    """Run one task in a fresh sandbox; return its raw answers and how it ended, as plain data.

    `task` (built by `autograder.grade`) holds only builtins and numpy arrays. The result is a dict:
    stream (bytes: JSON lines written by the sandbox, at most RESULT_CAP), ending (one of "finished",
    "timeout", "signal", "exit", "output_limit", "internal"), detail (signal name or exit status),
    seconds, and isolation (the protections in force). This function is also what a dask worker runs.
    """
    if multiprocessing.current_process().daemon:
        raise RuntimeError("sandboxes cannot start in a daemonic process: start dask workers with "
                           "DASK_DISTRIBUTED__WORKER__DAEMON=False (dask config distributed.worker.daemon: false)")
    context = _fork_server()
    start = time.monotonic()
    reader, writer = context.Pipe(duplex=False)  # answers, from C
    status_reader, status_writer = context.Pipe(duplex=False)  # how it ended, from A alone
    process = context.Process(target=_supervise, args=(task, writer, status_writer), name=f"sandbox-{task['student']}")
    process.start()
    writer.close()
    status_writer.close()
    limits = Limits(**task["limits"])
    deadline = start + limits.timeout + 30  # A enforces the limit; this is in case A itself hangs
    stream, too_large = _read_capped(reader.fileno(), deadline)
    reader.close()
    if too_large:
        process.kill()  # B dies with its parent (PDEATHSIG), and the namespace dies with B
    code = None
    if not too_large and status_reader.poll(max(deadline - time.monotonic(), 1)):
        try:
            code = int(status_reader.recv_bytes(16))
        except (EOFError, OSError, ValueError):
            code = None
    status_reader.close()
    process.join(timeout=5)
    if process.exitcode is None:
        process.kill()
        process.join()
    if code is None:
        code = process.exitcode
    if too_large:
        ending, detail = "output_limit", f"more than {RESULT_CAP // 2**20} MiB of answers"
    elif code == 0:
        ending, detail = "finished", ""
    elif code == EXIT_TIMEOUT:
        ending, detail = "timeout", f"{limits.timeout:g} s"
    elif code is not None and EXIT_SIGNAL < code < EXIT_SIGNAL + 65:
        ending, detail = "signal", signal.Signals(code - EXIT_SIGNAL).name
    elif code is not None and 0 < code < EXIT_INTERNAL:
        ending, detail = "exit", f"exit status {code}"
    else:
        ending, detail = "internal", f"supervisor exit status {code}"
    return {"stream": stream, "ending": ending, "detail": detail, "seconds": time.monotonic() - start,
            "isolation": list(isolation_level())}


def _read_capped(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Read fd until EOF, the deadline, or RESULT_CAP bytes; return (data, whether the cap was hit)."""
    chunks, total = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b"".join(chunks), False
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks), False
        total += len(chunk)
        if total > RESULT_CAP:
            return b"".join(chunks), True
        chunks.append(chunk)


@functools.cache
def isolation_level() -> tuple[str, ...]:
    """The protections sandboxes get on this machine (namespaces need root and a kernel that allows them)."""
    if os.geteuid() != 0:
        return ("process-group", "rlimits")
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET) else 1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0:
        return ("mount-namespace", "pid-namespace", "network-namespace", "private-uid", "rlimits")
    return ("process-group", "private-uid", "rlimits")


# -- A: the supervisor -------------------------------------------------------------------------------------


def _supervise(task: dict, writer, status) -> None:
    """Fork B in fresh namespaces, wait for it with the wall-clock limit, kill it, report how it ended."""
    limits = Limits(**task["limits"])
    if any(name.startswith("autograder.specs") for name in sys.modules):
        os._exit(EXIT_INTERNAL)  # a grading spec must never be in memory a sandbox could read
    out_fd = writer.fileno()
    isolated = os.geteuid() == 0 and _unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET)
    uid = UID_BASE + os.getpid() if os.geteuid() == 0 else None
    scratch = None if isolated else tempfile.mkdtemp(prefix="qlab-grade-")  # else a private tmpfs
    pid = os.fork()
    if pid == 0:
        try:
            status.close()  # only A reports the ending
            _init(task, out_fd, uid, scratch, limits)
        finally:
            os._exit(EXIT_INTERNAL)
    writer.close()
    ended = _wait(pid, limits.timeout)
    if ended is None:  # in a PID namespace, killing its init (B) kills every process in it
        _kill(pid)
        os.waitpid(pid, 0)
    if not isolated:  # B's process group, and as root every process of the sandbox uid (setsid escapees)
        _kill(-pid)
        if uid is not None:
            _kill_uid(uid)
        shutil.rmtree(scratch, ignore_errors=True)
    if ended is None:
        code = EXIT_TIMEOUT
    else:
        code = os.waitstatus_to_exitcode(ended) if os.WIFEXITED(ended) else EXIT_INTERNAL
    status.send_bytes(str(code).encode())
    os._exit(code)


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


def _wait(pid: int, timeout: float) -> int | None:
    """Wait for child pid at most `timeout` seconds; return its wait status, or None on timeout."""
    pidfd = os.pidfd_open(pid)
    try:
        if select.select([pidfd], [], [], timeout)[0]:
            return os.waitpid(pid, 0)[1]
        return None
    finally:
        os.close(pidfd)


def _kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL) if pid > 0 else os.killpg(-pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid`, until none is left (they may be forking)."""
    for _ in range(100):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/status") as status:
                        uids = next(line for line in status if line.startswith("Uid:")).split()
                except (OSError, StopIteration):
                    continue
                if int(uids[1]) == uid:
                    found.append(int(entry))
        if not found:
            return
        _kill(*found)
        time.sleep(0.01)


# -- B: init of the sandbox --------------------------------------------------------------------------------


def _init(task: dict, out_fd: int, uid: int | None, scratch: str | None, limits: Limits) -> None:
    """Prepare the file system, fork the runner C, reap every orphan, exit with C's fate.

    scratch: the work folder made by A when there are no namespaces (then B leads a process group).
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the supervisor
    if scratch is None:
        workdir = _private_file_system(task["hide"] + _own_secrets(), limits.file_mb)
    else:
        os.setsid()
        workdir = scratch
    notebook = os.path.join(workdir, task["notebook_name"])
    with open(notebook, "wb") as file:
        file.write(task["notebook_bytes"])
    if uid is not None:
        for path in (workdir, notebook):
            os.chown(path, uid, uid)
    os.chmod(workdir, 0o700)
    pid = os.fork()
    if pid == 0:
        try:
            _runner(task, out_fd, uid, workdir, limits)
        finally:
            os._exit(EXIT_INTERNAL)
    os.close(out_fd)
    while True:  # as pid 1, B inherits every orphan: reap them all, return when C is done
        try:
            child, status = os.wait()
        except ChildProcessError:
            os._exit(EXIT_INTERNAL)
        if child == pid:
            break
    if os.WIFSIGNALED(status):
        os._exit(EXIT_SIGNAL + os.WTERMSIG(status))
    os._exit(min(os.waitstatus_to_exitcode(status), EXIT_INTERNAL - 1))


def _own_secrets() -> list[str]:
    """The grading specs, the repository this package runs from (sources, hidden tests, .git), and the
    grader's home folder (often private, and often where Python itself lives: pyenv, conda)."""
    package = os.path.dirname(os.path.abspath(__file__))
    repository = os.path.dirname(package)
    checkout = os.path.isdir(os.path.join(repository, "labs")) or os.path.isdir(os.path.join(repository, ".git"))
    return [os.path.join(package, "specs"), os.path.expanduser("~")] + ([repository] if checkout else [])


def _mount(source: str, target: str, fstype: str | None, flags: int, options: str | None = None) -> None:
    result = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                         options.encode() if options else None)
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def _private_file_system(hide: list[str], file_mb: int) -> str:
    """In B's new mount namespace: hide the secret folders, make private scratch space; return the workdir."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    scratch = [path for path in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(path)]
    covered = {os.path.realpath(path) for path in hide if os.path.isdir(path)} | set(scratch)
    covered = sorted(p for p in covered if not any(q != p and _is_under(p, q) for q in covered))
    # The interpreter and its packages may live inside a hidden folder (a venv in the repository):
    # hold them open, cover everything, then bind them back. Only the interpreter's own folders, never
    # a folder that holds something hidden (sys.path may name the repository itself).
    # qlab's shipped checkpoints are data that labs load (ql.models.digits_cnn()); qlab's source stays
    # hidden, so that re-importing it cannot bring back the functions disabled in the runner.
    own = [sys.prefix, sys.base_prefix, *sysconfig.get_paths().values(), _qlab_checkpoints()]
    keep = {os.path.realpath(p) for p in own if p and os.path.isdir(p)}
    keep = {p for p in keep if any(_is_under(p, c) and p != c for c in covered)}
    keep = {p for p in keep if not any(_is_under(c, p) for c in covered)}
    keep = {p for p in keep if not any(q != p and _is_under(p, q) for q in keep)}
    held = {path: os.open(path, os.O_PATH) for path in keep}
    for path in covered:
        size = f"{file_mb}m" if path in scratch else "64k"
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode={'1777' if path in scratch else '755'}")
    for path, fd in sorted(held.items()):
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # shows the sandbox's processes only
    workdir = "/tmp/submission"  # the only thing in the sandbox's /tmp
    os.mkdir(workdir)
    return workdir


def _qlab_checkpoints() -> str | None:
    spec = importlib.util.find_spec("qlab")
    return os.path.join(os.path.dirname(spec.origin), "models", "checkpoints") if spec and spec.origin else None


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# -- C: the runner (the only process that runs student code) ----------------------------------------------


def _runner(task: dict, out_fd: int, uid: int | None, workdir: str, limits: Limits) -> None:
    """Lock the process down, run the program, write one JSON line per probe to out_fd."""
    # 1) nothing inherited but the result pipe; no terminal, no stdin
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd != out_fd:
            try:
                os.close(fd)
            except OSError:  # the descriptor listdir used, already closed
                pass
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdin = sys.stdout = sys.stderr = open(os.devnull, "r+")  # prints and fake scores go nowhere
    # 2) limits, then drop to the sandbox uid
    memory = limits.memory_mb * 2**20 + _address_space()
    for limit, value in [(resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, int(limits.timeout) + 1),
                         (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_FSIZE, limits.file_mb * 2**20)]:
        resource.setrlimit(limit, (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.chdir(workdir)
    os.environ.clear()  # a student's laptop has no grading variables either
    os.environ.update(HOME=workdir, TMPDIR=workdir, PATH="/usr/local/bin:/usr/bin:/bin", LANG="C.UTF-8")
    torch.set_num_threads(1)  # one core per sandbox: the workers already use them all
    # 3) no delegation to the library
    for name in task["disabled"]:
        _disable(name, task["lab"])
    # 4) the program
    _Program(task, out_fd, limits.cell_timeout).run()
    os._exit(0)


def _address_space() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def disabled_message(name: str, lab: str) -> str:
    return f"ql.{name} is disabled while grading {lab}: write it yourself"


def _disabled_stub(*args, **kwargs):
    raise RuntimeError("MESSAGE")  # only builtins: the code runs with the globals of qlab's module


def _disable(name: str, lab: str) -> None:
    """Make qlab.<name> raise a RuntimeError that says why, wherever it is referenced from.

    The function object's code is replaced, so aliases (`from qlab import quantize`) and qlab's own
    internal calls are switched off too.
    """
    function = qlab
    for part in name.split("."):
        function = getattr(function, part)
    while hasattr(function, "__wrapped__"):  # a functools.wraps wrapper (torch.no_grad()) calls the
        function = function.__wrapped__     # original, whose code is the one to replace
    message = disabled_message(name, lab)
    code = _disabled_stub.__code__
    consts = tuple(message if const == "MESSAGE" else const for const in code.co_consts)
    function.__code__ = code.replace(co_consts=consts, co_name=function.__name__, co_qualname=function.__qualname__)


class CellTimeout(BaseException):
    """Raised in the notebook when one cell or one probe runs longer than its limit."""


class _Magics:
    """What `get_ipython()` returns while grading (IPython's input transformer turns `%%time` and `%time x = 1`
    into calls of these methods). The magics that wrap code run it once, in the notebook's namespace, as in
    Jupyter: `%%time`, `%%timeit` (its setup line first), `%%prun`, `%%capture [name]` (name gets IPython's
    CapturedIO) and the line magics `%time`, `%timeit`, `%prun`. Every other magic and shell command
    (`%matplotlib inline`, `!pip install ...`) does nothing.

    The code they run is the student's own, in the same runner process: no more than a plain cell can do.
    """

    # IPython's options of each line magic that take a value (`%timeit -n 10 -r 3 f()`): skipped before the code
    VALUED_OPTIONS = {"time": "", "timeit": "nrpv", "prun": "DlsT"}

    def __init__(self, namespace: dict, transformer: TransformerManager):
        self._namespace, self._transformer = namespace, transformer

    def run_cell_magic(self, name: str, line: str, cell: str):
        if name == "capture":
            return self._capture(line, cell)
        if name == "timeit":
            self._run(_strip_options(line, self.VALUED_OPTIONS[name]))  # the setup code
        if name in self.VALUED_OPTIONS:
            self._run(cell)
        return None

    def run_line_magic(self, name: str, line: str, _stack_depth: int = 1):
        if name not in self.VALUED_OPTIONS:
            return None
        caller = sys._getframe(_stack_depth).f_locals  # `%timeit f(x)` inside a function sees its locals
        value = self._run(_strip_options(line, self.VALUED_OPTIONS[name]), None if caller is self._namespace else caller)
        return value if name == "time" else None  # `y = %time f(x)` gets f(x), as in IPython

    def system(self, *args, **kwargs):
        return None

    getoutput = system

    def _run(self, source: str, local_ns: dict | None = None):
        """Run source (magics allowed) in the notebook's namespace; the value if it is an expression."""
        code = self._transformer.transform_cell(source)
        try:
            expression = compile(code, "<magic>", "eval")
        except SyntaxError:
            exec(compile(code, "<magic>", "exec"), self._namespace, local_ns)
            return None
        return eval(expression, self._namespace, local_ns)

    def _capture(self, line: str, cell: str) -> None:
        """%%capture [--no-stdout] [--no-stderr] [--no-display] [name]: run the cell with its output kept in name."""
        words = line.split()
        names = [word for word in words if not word.startswith("-")]
        with capture_output("--no-stdout" not in words, "--no-stderr" not in words, display=False) as captured:
            try:
                self._run(cell)
            finally:
                if names and names[0].isidentifier():
                    self._namespace[names[0]] = captured


def _strip_options(line: str, valued: str) -> str:
    """The code of a magic's line without its leading options: `-n 3 -r1 f()` -> `f()` (valued="nr")."""
    rest = line.strip()
    while rest[:1] == "-" and rest[1:2].isalpha():
        option, rest = (rest.split(maxsplit=1) + [""])[:2]
        if len(option) == 2 and option[1] in valued:  # `-n 3`: the value is the next word
            rest = (rest.split(maxsplit=1) + ["", ""])[1]
    return rest


def _display(*objects, **kwargs) -> None:
    """IPython's `display`, which Jupyter puts in every notebook's namespace: grading shows nothing."""
    return None


class _Program:
    """The notebook's steps, run in one namespace: cells with `exec`, probes with `plain.encode`."""

    def __init__(self, task: dict, out_fd: int, cell_timeout: float):
        self.steps, self.out_fd, self.cell_timeout = task["steps"], out_fd, cell_timeout
        self.disabled = {disabled_message(name, task.get("lab", "")): name for name in task.get("disabled", ())}
        self.pid = os.getpid()
        self.namespace = {"__name__": "__main__", "__builtins__": builtins, "display": _display}
        self.transformer = TransformerManager()
        magics = _Magics(self.namespace, self.transformer)
        self.namespace["get_ipython"] = lambda: magics

    def run(self) -> None:
        for step in self.steps:
            if step["kind"] == "cell":
                error = self._timed(self._run_cell, self.cell_timeout, step["source"], step["grade_id"])
                self._emit({"cell": step["grade_id"], "error": error})
            else:  # one time limit for all the probes of a test, as --cell-timeout promises
                deadline, keyed = time.monotonic() + self.cell_timeout, {}
                results = [self._call(call, deadline, keyed) for call in step["calls"]]
                self._emit({"part": step["grade_id"], "results": results})
        self._emit({"done": True})

    def _run_cell(self, source: str, grade_id: str) -> None:
        code = compile(self.transformer.transform_cell(source), f"<cell {grade_id}>", "exec")
        exec(code, self.namespace)

    def _call(self, call: dict, deadline: float, keyed: dict) -> dict:
        """One probe, within what is left of its test's time; `keyed` holds the values of earlier probes
        of the same test that later ones refer to ({"ref": key})."""
        def argument(value):
            if isinstance(value, dict):
                if value["ref"] not in keyed:
                    raise LookupError("an earlier probe of this test gave no value")
                return keyed[value["ref"]]
            return plain.to_torch(value)

        def probe():
            if call["name"] not in self.namespace:
                return {"raised": "NameError", "missing": True}
            target = self.namespace[call["name"]]
            if not call["read"]:
                target = target(*[argument(arg) for arg in call["args"]],
                                **{key: argument(value) for key, value in call["kwargs"].items()})
            if call.get("key"):
                keyed[call["key"]] = target
            return plain.encode(target)

        left = deadline - time.monotonic()
        if left <= 0:
            return {"raised": "CellTimeout"}
        result = {}
        error = self._timed(lambda: result.update(probe()), left)
        return {"raised": error} if error else result

    def _timed(self, function, seconds: float, *args) -> str | None:
        """Run function(*args) under an alarm of `seconds`; return None, or the name of what it raised.

        The alarm repeats every second until it is switched off, so code that catches the first
        CellTimeout (a bare `except:` in a loop) is interrupted again."""
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
        try:
            function(*args)
            return None
        except CellTimeout:
            return "CellTimeout"
        except BaseException as error:  # SystemExit, KeyboardInterrupt, MemoryError: the cell failed
            try:
                if type(error) is RuntimeError and len(error.args) == 1 and type(error.args[0]) is str \
                        and error.args[0] in self.disabled:
                    return f"disabled:{self.disabled[error.args[0]]}"  # the sandbox's own explanation
                return str(type(error).__name__)[:100]
            except BaseException:
                return "Exception"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _emit(self, message: dict) -> None:
        if os.getpid() != self.pid:  # a copy the notebook forked: it stops at the end of the cell that forked it,
            os._exit(0)              # and only the runner itself reports (one record per step, in order)
        data = memoryview(json.dumps(message).encode() + b"\n")
        while data:
            data = data[os.write(self.out_fd, data):]


def _alarm(signum, frame):
    raise CellTimeout()
