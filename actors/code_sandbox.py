"""Run one untrusted Python program (a model's solution with its tests) in a child process that cannot hang, fork,
eat memory or reach the network without failing, and whose files go away with it.

Each run gets:

- a fresh throwaway working directory (``tempfile.TemporaryDirectory``; also its ``HOME`` and ``TMPDIR``), removed
  afterwards, and a minimal environment; the interpreter runs isolated (``python -I``: no ``PYTHON*`` variables, no
  user site-packages);
- its own session and process group (``start_new_session``); on wall-time expiry, and after every run, the whole
  group is killed (``os.killpg``), so stray children die with it;
- kernel limits (``setrlimit``): address space (memory), CPU seconds, file size, no core dumps, processes;
- no network: a new, empty network namespace (``unshare(CLONE_NEWNET)``, as root; else inside a new user namespace
  where the kernel allows unprivileged ones): not even loopback is up. Where neither works, a guard in the child's
  Python makes ``socket`` unimportable (``Isolation.network == "python-guard"``);
- processes: a guard in the child's Python replaces ``os.fork``/``exec*``/``spawn*``/``system``/``kill`` and makes
  ``subprocess``, ``multiprocessing``, ``pty`` and ``ctypes`` unimportable, so an ordinary fork bomb or shell-out
  fails at once with a clear error. Under it the kernel's ``RLIMIT_NPROC`` bounds what a program that gets around the
  guard can start; but the kernel never applies it to root (uid 0). So, run as root, the child drops to a dedicated
  unused uid (one per concurrent run, unique to this process) where the interpreter stays readable to it (it keeps
  only ``CAP_DAC_READ_SEARCH``, to read files such as a ``/root``-owned interpreter, and loses the rest; it can write
  only its working directory and world-writable places, and signal only its own processes), and every process left
  with that uid after the run is killed (``Isolation.processes == "dedicated-uid"``). Not root: ``RLIMIT_NPROC``
  counts all of the user's processes, so a sample may start no more than the limit allows (often none; threads count
  too) (``"rlimit"``). Root where the uid cannot be dropped: the guard and the process-group kill only
  (``"python-guard"``).

``isolation()`` says which of these is in force on this machine (found once, by trying them); results carry it.
Linux only (namespaces, ``/proc``, ``waitid``).

What this is not: a security boundary against a determined attacker. It stops the accidents of model-written code
(endless loops, runaway memory or recursion, forks, shell-outs, network calls, files left behind) from failing or
stalling an evaluation. A program written to escape (ctypes loaded by path, a kernel exploit, reading files the
evaluator can read, filling world-writable disk) is not contained; on a shared cluster, run evaluations in their own
container or VM, as the pods of this project do.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Literal, Optional

Status = Literal["passed", "failed", "timeout", "memory", "error"]
STATUSES: tuple[Status, ...] = ("passed", "failed", "timeout", "memory", "error")
MARKER = "domainsynth-sandbox"  # in every child's command line, so leftovers can be found by it
SETUP_FAILED = 97  # the launcher's exit code when it could not set the sandbox up (then the status is "error")
# Dedicated uids: far above any real account, one per (this process, concurrent run), so that two evaluating
# processes on one node never share one (pid_max is at most 2**22: the largest is below 2**32 - 1).
UID_BASE, UID_SLOTS = 2_000_000_000, 256


@dataclass(frozen=True)
class Limits:
    """What one run may use. ``cpu_s`` None = ``wall_s``. The slowest LeetCodeDataset reference solution (100-odd
    asserts on large inputs) takes 34 s with its tests on one CPU of a 2-CPU machine, hence the default wall time."""
    wall_s: float = 60.0
    cpu_s: Optional[float] = None
    memory_mb: int = 1024  # address space (RLIMIT_AS): Python itself takes ~30 MB of it
    file_mb: int = 16  # the largest file it may write (its output included)
    processes: int = 8  # RLIMIT_NPROC (threads count): the sample itself and a few threads
    python_guards: bool = True  # False only to test that the kernel's limits hold on their own


@dataclass(frozen=True)
class Isolation:
    network: Literal["netns", "userns+netns", "python-guard"]
    processes: Literal["dedicated-uid", "rlimit", "python-guard"]

    def describe(self) -> str:
        net = {"netns": "network namespace", "userns+netns": "user + network namespace",
               "python-guard": "Python socket guard only (no namespace allowed here)"}[self.network]
        procs = {"dedicated-uid": "dedicated uid with RLIMIT_NPROC", "rlimit": "RLIMIT_NPROC of this user",
                 "python-guard": "Python process guard + process-group kill only (root; uid not droppable)"}
        return f"network: {net}; processes: {procs[self.processes]}"


@dataclass
class RunResult:
    status: Status
    seconds: float
    detail: str  # the last line of stderr, or why the sandbox gave up


# The child's first (and only) Python code: set the limits up, then run the program in this same interpreter.
# Setup happens here rather than in a preexec_fn, which is unsafe in a threaded parent (this runs in a thread pool).
LAUNCHER = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[2])
def fail(why):
    os.write(2, ("sandbox setup failed: " + why + "\n").encode()); os._exit(%(setup_failed)d)
try:
    source = open(cfg["program"], encoding="utf-8").read()
    libc = ctypes.CDLL(None, use_errno=True)
    def check(result, what):
        if result != 0: fail(what + ": " + os.strerror(ctypes.get_errno()))
    if cfg["network"] != "python-guard":
        flags = 0x40000000 | (0x10000000 if cfg["network"] == "userns+netns" else 0)  # CLONE_NEWNET, CLONE_NEWUSER
        check(libc.unshare(flags), "unshare")
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS: no setuid binary gives root back
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(value))
    uid = cfg["uid"]
    if uid is not None:
        check(libc.prctl(8, 1, 0, 0, 0), "keepcaps")  # PR_SET_KEEPCAPS: keep the permitted set across setuid
        os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)(1 << 2, 1 << 2, 0, 0, 0, 0)  # effective, permitted: CAP_DAC_READ_SEARCH only
        check(libc.capset(header, data), "capset")
        for probe in cfg["must_read"]:
            os.listdir(probe)
except Exception as e:
    fail(type(e).__name__ + ": " + str(e))
if cfg["guards"]:
    def refuse(*args, **kwargs):
        raise PermissionError("sandbox: this program may not start or signal processes")
    import posix
    for module in (os, posix):
        for name in dir(module):
            if name in ("fork", "forkpty", "vfork", "system", "popen", "kill", "killpg") or \
                    name.startswith(("exec", "spawn", "posix_spawn")):
                setattr(module, name, refuse)
    blocked = {"subprocess", "_posixsubprocess", "multiprocessing", "pty", "ctypes", "_ctypes"}
    if cfg["network"] == "python-guard":
        blocked |= {"socket", "_socket", "ssl", "_ssl", "asyncio"}
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ImportError("sandbox: this program may not import " + name)
    sys.meta_path.insert(0, Refuse())
    for name in list(sys.modules):
        if name.partition(".")[0] in blocked:
            del sys.modules[name]
    del ctypes, libc
nonce = cfg["nonce"]
sys.argv = ["solution.py"]
code = compile(source, "solution.py", "exec")
del source, cfg
main = sys.modules["__main__"] = type(sys)("__main__")  # the program's own __main__ (pickle, dataclasses look there)
exec(code, main.__dict__)
sys.stdout.flush()
os.write(1, ("\n" + nonce + "\n").encode())  # reached only when the whole program ran (no early exit)
''' % {"setup_failed": SETUP_FAILED}


def _rlimits(limits: Limits) -> dict:
    cpu = math.ceil(limits.cpu_s if limits.cpu_s is not None else limits.wall_s)
    return {"RLIMIT_AS": [limits.memory_mb << 20] * 2, "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_FSIZE": [limits.file_mb << 20] * 2, "RLIMIT_CORE": [0, 0],
            "RLIMIT_NPROC": [limits.processes] * 2}


# ------------------------------------------------------------------------------------------------ dedicated uids
_slots_lock = threading.Lock()
_free_slots = list(range(UID_SLOTS))


def _take_uid() -> tuple[int, int]:
    with _slots_lock:
        slot = _free_slots.pop()  # more than UID_SLOTS concurrent runs in one process is a caller's bug
    return slot, UID_BASE + (os.getpid() % (1 << 22)) * UID_SLOTS + slot


def _give_back_uid(slot: int) -> None:
    with _slots_lock:
        _free_slots.append(slot)


def _processes_of(uid: int) -> list[int]:
    """The live processes (zombies aside: they are dead, waiting for init to reap them) whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue  # gone meanwhile
            if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
                pids.append(int(entry))
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: stopped first, round after round, so that none forks while the rest die."""
    for _ in range(100):
        pids = _processes_of(uid)
        if not pids:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------------- running
def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``proc`` to exit *without reaping it* (its pid, and so its process group id, stays reserved until
    we kill the group); False when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            left = deadline - time.monotonic()
            if fd is not None:
                select.select([fd], [], [], max(left, 0))
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                return True
            if left <= 0:
                return False
            if fd is None:
                time.sleep(min(0.01, left))
    finally:
        if fd is not None:
            os.close(fd)


def _tail(path: str, size: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - size, 0))
        return f.read().decode("utf-8", "replace")


def _spawn_run(program: str, limits: Limits, network: str, uid: Optional[int], python: str) -> RunResult:
    """One run with the given isolation choices (``isolation()`` calls this to try them)."""
    with tempfile.TemporaryDirectory(prefix=MARKER + "-", ignore_cleanup_errors=True) as root:
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
        program_path = os.path.join(root, "solution.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        nonce = secrets.token_hex(16)
        cfg = {"program": program_path, "network": network, "uid": uid, "rlimits": _rlimits(limits),
               "guards": limits.python_guards, "nonce": nonce,
               "must_read": [os.path.dirname(os.__file__)]}  # the stdlib: imports keep working after the uid drop
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen([python, "-I", "-c", LAUNCHER, MARKER, json.dumps(cfg)], cwd=work, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            except OSError as e:
                return RunResult("error", time.monotonic() - start, f"could not start the sandbox: {e}")
        try:
            exited = _wait_exit(proc, limits.wall_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: stray children die too (the leader is unreaped)
            except ProcessLookupError:
                pass
            code = proc.wait()
            if uid is not None:
                _kill_uid(uid)  # what left the group (setsid) but kept the uid
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out_path, 256), _tail(err_path)
    lines = [line for line in stderr.splitlines() if line.strip()]
    detail = lines[-1].strip()[:500] if lines else ""
    if not exited:
        return RunResult("timeout", seconds, f"wall time limit of {limits.wall_s:g} s")
    if code == 0 and nonce in stdout:
        return RunResult("passed", seconds, detail)
    if code == SETUP_FAILED and "sandbox setup failed" in stderr:
        return RunResult("error", seconds, detail)
    if code == -signal.SIGXCPU:
        return RunResult("timeout", seconds, "CPU time limit")
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return RunResult("memory", seconds, detail or "out of memory")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return RunResult("failed", seconds, f"killed by {name}" + (f": {detail}" if detail else ""))
    return RunResult("failed", seconds, detail or f"exited with code {code} before its end")


_isolation: dict[str, Isolation] = {}
_isolation_lock = threading.Lock()


def isolation(python: str = sys.executable) -> Isolation:
    """The strongest isolation this machine allows ``python``, found once by running a trivial program under each
    choice (the dedicated uid, say, only where that interpreter stays readable to it)."""
    with _isolation_lock:
        if python not in _isolation:
            _isolation[python] = _probe(python)
        return _isolation[python]


def _probe(python: str) -> Isolation:
    root = os.geteuid() == 0
    networks = ["netns" if root else "userns+netns", "python-guard"]
    probe = "import decimal, json\nassert json.loads(str(decimal.Decimal(1))) == 1\n"  # imports after setup
    for network in networks:
        for dedicated in ([True, False] if root else [False]):
            if not dedicated:
                uid, slot = None, None
            else:
                slot, uid = _take_uid()
            try:
                result = _spawn_run(probe, Limits(wall_s=30), network, uid, python)
            finally:
                if slot is not None:
                    _give_back_uid(slot)
            if result.status == "passed":
                processes = "dedicated-uid" if dedicated else ("python-guard" if root else "rlimit")
                return Isolation(network, processes)  # type: ignore[arg-type]
    raise RuntimeError(f"code sandbox: {python} cannot run even with Python guards only: {result.detail}")


def run_program(program: str, limits: Limits = Limits(), python: str = sys.executable) -> RunResult:
    """Run ``program`` (Python source: a solution and its tests) in the sandbox: ``passed`` when it ran to its end
    and exited 0; ``failed`` when it raised (a failed assert, an exception, a syntax error), exited early or was
    killed by a signal; ``timeout`` past ``limits.wall_s`` or the CPU limit; ``memory`` when an allocation failed
    under ``limits.memory_mb``; ``error`` when the sandbox itself could not run it. Thread-safe."""
    chosen = isolation(python)
    slot, uid = _take_uid() if chosen.processes == "dedicated-uid" else (None, None)
    try:
        return _spawn_run(program, limits, chosen.network, uid, python)
    finally:
        if slot is not None:
            _give_back_uid(slot)
