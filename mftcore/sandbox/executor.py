"""The harness side of the sandbox: run one program and its tests confined (`run_program`), or many of
them on a pool of workers (`SandboxPool`), and turn what came back into an `Outcome`.

Each run gets a fresh temporary directory (a `work/` directory the program may write in, and the files
that take its stdout and stderr, which it cannot open by name), a pids cgroup where this process may
make one (emptied and kept for the next run; removed at exit), and a supervisor process (supervisor.py)
in a new session that inherits nothing but its stdin, those two files and a status pipe. A backstop here
kills the whole session if the supervisor itself does not report within its wall-clock limit plus
BACKSTOP_SECONDS. Afterwards the directory is removed. `Outcome.passed` is true only when the runner's
report came back with this run's nonce and said the tests ran to their end, and the run did not time
out.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import select
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from mftcore.errors import SandboxError

SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervisor.py")
BACKSTOP_SECONDS = 15.0
TAIL_BYTES = 4000
CONFINE_FAILED = 111  # the runner's exit code when it could not apply a restriction
# Isolation modes: the features each does without. "auto" uses everything the platform allows; the
# others are what a platform lacking those features gets (tests/sandbox runs each one here, so that the
# paths a CI machine or a container takes are the ones tested). Whatever a mode lacks, a run is refused
# (SandboxError) rather than run with a hole in supervisor.FLOOR.
ISOLATION = {
    "auto": (),
    "fallback": ("namespaces", "cgroup"),
    "no-landlock": ("landlock",),
    "no-seccomp": ("seccomp",),
    "no-namespaces-no-seccomp": ("namespaces", "cgroup", "seccomp"),
    "no-namespaces-no-landlock": ("namespaces", "cgroup", "landlock"),
}
# Besides the Python installation: shared libraries (and the loader's cache), the few files under /etc
# the standard library reads (time zone, users, TLS roots, MIME types), random devices, the CPU count.
SYSTEM_READ_ROOTS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/localtime",
                     "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/ssl", "/etc/mime.types",
                     "/etc/os-release", "/dev/urandom", "/dev/random", "/dev/zero", "/sys/devices/system/cpu")


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    """Wall-clock seconds from the runner's start to its end; then it is killed (a failure)."""
    cpu_seconds: int = 5
    """CPU seconds of the runner (RLIMIT_CPU; SIGKILL one second later)."""
    memory_mb: int = 1024
    """Address space of each process (RLIMIT_AS): an allocation beyond it raises MemoryError."""
    max_processes: int = 8
    """Processes and threads at once (pids cgroup or RLIMIT_NPROC; where neither counts, none may be made)."""
    output_bytes: int = 4 << 20
    """Largest file it may write, its stdout and stderr included (RLIMIT_FSIZE)."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    disk_mb: int = 64
    """Size of the tmpfs working directory (where mount namespaces allow one)."""

    def check(self, where: str = "sandbox") -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise SandboxError(f"{where}: {name} must be > 0, got {value}")


@dataclass
class Outcome:
    passed: bool
    error: Optional[str]  # the failure's last line: an exception, a time-out, a signal; None when passed
    exit_code: Optional[int]  # the runner's (negative: killed by that signal); it never decides `passed`
    timed_out: bool
    wall_seconds: float
    cpu_seconds: float
    stdout: str = ""  # the last TAIL_BYTES of each
    stderr: str = ""
    capabilities: tuple = field(default_factory=tuple)  # the restrictions that applied (supervisor.py)


def read_roots() -> list:
    """What untrusted code may read: this Python's installation and packages, and the system libraries."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    roots.update(site.getsitepackages())
    return sorted(roots) + list(SYSTEM_READ_ROOTS)


def runner_sys_path() -> list:
    """The interpreter's sys.path without the harness's own entries: the standard library and site-packages
    (.pth files are not run, so editable installs such as mftcore's own stay out)."""
    paths = sysconfig.get_paths()
    std = [p for p in sys.path if p and (p.startswith(sys.base_prefix) or p.startswith(sys.base_exec_prefix))
           and "site-packages" not in p]
    return std + [p for p in dict.fromkeys([paths["purelib"], paths["platlib"], *site.getsitepackages()])
                  if os.path.isdir(p)]


# Idle pids cgroups, by pids.max, for the next runs: making and removing one per run cost 10-15 ms (the
# supervisor's exit leaves a cgroup some milliseconds after the harness has seen it end).
IDLE_CGROUPS: dict = {}
CGROUP_LOCK = threading.Lock()


def acquire_cgroup(max_pids: int) -> Optional[str]:
    with CGROUP_LOCK:
        idle = IDLE_CGROUPS.setdefault(max_pids, [])
        if idle:
            return idle.pop()
    return make_pids_cgroup(max_pids)


def release_cgroup(path: Optional[str], max_pids: int) -> None:
    """Kill what is still in it (nothing, normally) and keep it for the next run."""
    if not path:
        return
    try:
        for pid in list_cgroup_members(path):
            os.kill(pid, signal.SIGKILL)
    except OSError:
        remove_cgroup(path)
        return
    with CGROUP_LOCK:
        IDLE_CGROUPS.setdefault(max_pids, []).append(path)


@atexit.register
def remove_idle_cgroups() -> None:
    with CGROUP_LOCK:
        paths = [p for idle in IDLE_CGROUPS.values() for p in idle]
        IDLE_CGROUPS.clear()
    for path in paths:
        remove_cgroup(path)


def list_cgroup_members(path: str) -> list:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(line) for line in f if line.strip()]


def make_pids_cgroup(max_pids: int) -> Optional[str]:
    """A fresh cgroup of the v1 pids hierarchy with pids.max set, where this process may make one."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    for _, where, kind, options, *_ in mounts:
        if kind == "cgroup" and "pids" in options.split(",") and os.access(where, os.W_OK):
            path = os.path.join(where, f"mftcore-sandbox-{uuid.uuid4().hex[:12]}")
            try:
                os.mkdir(path)
                with open(os.path.join(path, "pids.max"), "w") as f:
                    f.write(str(max_pids))
                return path
            except OSError:
                remove_cgroup(path)
    return None


def remove_cgroup(path: Optional[str]) -> None:
    """Kill what is still in it (nothing, normally: the supervisor killed it all), then remove it."""
    if not path or not os.path.isdir(path):
        return
    for _ in range(2000):
        try:
            for pid in list_cgroup_members(path):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.001)  # exiting tasks leave the cgroup asynchronously


def remove_tree(path: str) -> None:
    """rmtree that also removes what the program made unreadable or unwritable (chmod 000)."""
    def retry(func, target, _):
        for p in (os.path.dirname(target), target):
            try:
                os.chmod(p, 0o700)
            except OSError:
                pass
        func(target)

    shutil.rmtree(path, onerror=retry)


def read_tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - TAIL_BYTES, 0))
        return f.read().decode("utf-8", "replace")


def run_program(program: str, tests: str, limits: Optional[Limits] = None, *, isolation: str = "auto") -> Outcome:
    """Run `program` then `tests` (Python source) in the sandbox; see the module docstring.
    isolation "auto": every restriction the platform allows; "fallback": no namespaces and no cgroup
    (what a platform without them gets: Landlock, seccomp, rlimits, the subreaper); the other ISOLATION
    modes do without other features (for tests). SandboxError where the platform, less what the mode
    denies, cannot stop one of the escapes of supervisor.FLOOR."""
    limits = limits or Limits()
    if isolation not in ISOLATION:
        raise SandboxError(f"sandbox: isolation must be one of {', '.join(ISOLATION)}, got {isolation!r}")
    deny = ISOLATION[isolation]
    nonce = secrets.token_hex(16)
    base = tempfile.mkdtemp(prefix="mftcore-sandbox-")
    workdir = os.path.join(base, "work")
    os.mkdir(workdir, 0o700)
    os.mkdir(os.path.join(base, "root"), 0o700)  # where the supervisor may build a minimal root
    max_pids = limits.max_processes + 1  # the supervisor counts too
    cgroup = None if "cgroup" in deny else acquire_cgroup(max_pids)
    status_r, status_w = os.pipe()
    try:
        job = {"program": program, "tests": tests, "nonce": nonce, "workdir": workdir, "cgroup": cgroup,
               "root": os.path.join(base, "root"), "deny": list(deny), "limits": asdict(limits),
               "read_roots": read_roots(),
               "sys_path": runner_sys_path(), "status_fd": status_w}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-S", "-s", "-P", SUPERVISOR], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, pass_fds=(status_w,), close_fds=True,
                                    start_new_session=True, cwd=base, env=env)
        os.close(status_w)
        status_w = None
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        status = read_status(status_r, limits.wall_seconds + BACKSTOP_SECONDS)
        if status is None:  # the supervisor did not report in time: end its whole session
            kill_session(proc.pid)
        proc.wait()
        if status == {}:  # it ended without a status: a fault of the sandbox here, not of the completion
            last = read_tail(err_path).strip().splitlines()
            raise SandboxError(f"sandbox: the supervisor ended (status {proc.returncode}) without a report"
                               + (f": {last[-1][:300]}" if last else ""))
        return make_outcome(status, nonce, limits, read_tail(out_path), read_tail(err_path))
    finally:
        if status_w is not None:
            os.close(status_w)
        os.close(status_r)
        release_cgroup(cgroup, max_pids)
        remove_tree(base)


def read_status(fd: int, seconds: float) -> Optional[dict]:
    """The supervisor's status (JSON, written once at its end), None if it has not come in `seconds`, {}
    if the pipe closed without one."""
    chunks, end = [], time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    try:
        status = json.loads(b"".join(chunks))
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def make_outcome(status: Optional[dict], nonce: str, limits: Limits, stdout: str, stderr: str) -> Outcome:
    if status is None:
        return Outcome(False, f"the sandbox did not report within {limits.wall_seconds + BACKSTOP_SECONDS:.0f} s",
                       None, True, limits.wall_seconds + BACKSTOP_SECONDS, 0.0, stdout, stderr)
    if "refused" in status:
        raise SandboxError(status["refused"])
    code, timed_out = status["exit_code"], status["timed_out"]
    if code == CONFINE_FAILED and not status["result"]:
        raise SandboxError(stderr.strip().splitlines()[-1] if stderr.strip() else "sandbox: the runner failed")
    record = None
    for line in status["result"].splitlines():
        try:
            candidate = json.loads(line)
        except ValueError:
            continue
        if isinstance(candidate, dict) and candidate.get("nonce") == nonce:
            record = candidate
            break
    passed = bool(record and record.get("passed") is True and not timed_out)
    if passed:
        error = None
    elif timed_out:
        error = f"timed out: wall-clock limit of {limits.wall_seconds:g} s"
    elif record is not None:
        error = str(record.get("error") or "failed")
    else:
        error = explain_early_end(code, status["cpu_seconds"], limits, stderr)
    return Outcome(passed, error, code, timed_out, status["wall_seconds"], status["cpu_seconds"], stdout, stderr,
                   tuple(status["capabilities"]))


def explain_early_end(code: int, cpu: float, limits: Limits, stderr: str) -> str:
    """Why a runner that wrote no report ended."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        if name == "SIGXCPU" or (name == "SIGKILL" and cpu >= limits.cpu_seconds):  # the hard limit is +1 s
            return f"killed: CPU time limit of {limits.cpu_seconds} s"
        if name == "SIGXFSZ":
            return f"killed: file size limit of {limits.output_bytes} bytes"
        return f"killed by {name}"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return f"exited with status {code} before the tests finished" + (f" ({last[:300]})" if last else "")


CHECKED: dict = {}  # (isolation, what it denies) -> capabilities, for check_platform


def check_platform(isolation: str = "auto") -> tuple:
    """The capabilities the sandbox applies here in this mode, from a trivial run (once per process);
    SandboxError, one line, where it would refuse: for the callers that should fail before loading a
    model or training for hours rather than at their first evaluation."""
    key = (isolation, ISOLATION.get(isolation))
    if key not in CHECKED:
        outcome = run_program("pass\n", "pass\n", Limits(wall_seconds=60), isolation=isolation)
        if not outcome.passed:
            raise SandboxError(f"sandbox: a trivial program failed here ({outcome.error})")
        CHECKED[key] = outcome.capabilities
    return CHECKED[key]


class SandboxPool:
    """Runs many (program, tests) pairs, `workers` at a time (default: the CPU count), in order."""

    def __init__(self, workers: Optional[int] = None, limits: Optional[Limits] = None, isolation: str = "auto"):
        self.workers = workers or os.cpu_count() or 1
        self.limits = limits or Limits()
        self.isolation = isolation
        if isolation not in ISOLATION:
            raise SandboxError(f"sandbox: isolation must be one of {', '.join(ISOLATION)}, got {isolation!r}")
        if self.workers < 1:
            raise SandboxError(f"sandbox: workers must be >= 1, got {self.workers}")
        self.limits.check()

    def run(self, jobs: list, progress: Optional[Callable[[int], None]] = None) -> list:
        """[Outcome] for [(program, tests)], in the order given; progress(1) after each."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(run_program, program, tests, self.limits, isolation=self.isolation)
                       for program, tests in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                if progress is not None:
                    progress(1)
            return results
