"""The executor against hand-written completions: what passes, what fails, and that nothing escapes.

Every case runs in each isolation mode (executor.ISOLATION) this platform can run: with every
restriction it allows ("auto": namespaces, a pids cgroup, Landlock, seccomp), as a platform without
namespaces or cgroups would run it ("fallback": Landlock, seccomp, rlimits and the subreaper alone), and
without seccomp or Landlock; which modes can run is asked of the kernel here, apart from the sandbox,
and a mode that cannot stop every escape must be refused. Limits are small so that the time-outs cost little; a
completion meant to pass has 30 s of wall clock, so a loaded machine cannot fail it.
"""

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mftcore.errors import SandboxError
from mftcore.sandbox import Limits, SandboxPool, check_platform, run_program
from mftcore.sandbox.executor import ISOLATION, SUPERVISOR
from tests.helpers.paths import ROOT

FAST = Limits(wall_seconds=30, cpu_seconds=2, memory_mb=512, max_processes=6)
SHORT = Limits(wall_seconds=2, cpu_seconds=1, memory_mb=512, max_processes=6)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"

# Asked of the kernel directly, not of the sandbox: which namespaces a process may enter one by one
# after a user namespace, and whether it may then remount.
PROBE_NAMESPACES = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
uid, gid, got = os.geteuid(), os.getegid(), []
if libc.unshare(0x10000000) == 0:
    got.append("userns")
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        got += [name for flag, name in ((0x40000000, "netns"), (0x20000000, "pidns"), (0x00020000, "mountns"))
                if libc.unshare(flag) == 0]
        if "mountns" in got and libc.mount(None, b"/", None, ctypes.c_ulong(0x4000 | 0x40000), None) == 0:
            got += ["readonly-mounts", "tmpfs-workdir"]
    except OSError:
        pass
print(json.dumps(got))
"""


def probe_namespaces() -> set:
    out = subprocess.run([sys.executable, "-c", PROBE_NAMESPACES], capture_output=True, text=True, check=False)
    return set(json.loads(out.stdout)) if out.returncode == 0 else set()


def probe_landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(int(libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint(1))), 0)


def platform_has_pids_cgroup() -> bool:
    with open("/proc/mounts") as f:
        return any(kind == "cgroup" and "pids" in opts.split(",") and os.access(where, os.W_OK)
                   for _, where, kind, opts, *_ in (line.split() for line in f))


def probe_seccomp() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return os.uname().machine in ("x86_64", "aarch64") and libc.prctl(21, 0, 0, 0, 0) >= 0  # PR_GET_SECCOMP


NAMESPACES, LANDLOCK_ABI, PIDS_CGROUP = probe_namespaces(), probe_landlock_abi(), platform_has_pids_cgroup()
SECCOMP = probe_seccomp()


def expected_capabilities(isolation: str) -> set:
    """What the sandbox should apply in this mode on this platform."""
    deny = ISOLATION[isolation]
    caps = set() if "namespaces" in deny else set(NAMESPACES)
    if PIDS_CGROUP and "cgroup" not in deny:
        caps.add("pids-cgroup")
    else:
        caps.add("rlimit-nproc" if "userns" in caps and os.geteuid() != 0 else "no-new-processes")
    if "userns" in caps or os.geteuid() == 0:
        caps.add("no-capabilities")
    if LANDLOCK_ABI < 1 or "landlock" in deny:
        caps |= {"minimal-root"} if {"mountns", "readonly-mounts"} <= caps else set()
    else:
        caps |= {"landlock-fs"} | ({"landlock-net"} if LANDLOCK_ABI >= 4 else set()) | (
            {"landlock-scope"} if LANDLOCK_ABI >= 6 else set())
    if SECCOMP and "seccomp" not in deny:
        caps.add("seccomp")
    return caps


def expected_refusal(isolation: str):
    """The escape (as the sandbox's refusal names it) this mode cannot stop here, or None."""
    caps = expected_capabilities(isolation)
    if not caps & {"landlock-fs", "minimal-root"}:
        return "reads and writes outside its directory"
    if not caps & {"netns", "seccomp"}:
        return "the network"
    if not caps & {"pids-cgroup", "rlimit-nproc", "seccomp"}:
        return "new processes"
    if not caps & {"pidns", "landlock-scope"}:
        return "signals to the harness"
    return None


# Every escape test runs in each mode this platform can run; test_modes_below_the_floor_are_refused
# checks that the others are refused.
RUNNABLE = [mode for mode in ISOLATION if expected_refusal(mode) is None]


@pytest.fixture(params=RUNNABLE)
def isolation(request):
    return request.param


def run(program, tests=ADD_TESTS, limits=FAST, isolation="auto"):
    return run_program(program, tests, limits, isolation=isolation)


def supervisors_alive() -> list:
    """Processes still running this checkout's supervisor.py (the sandbox and everything it forked)."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if SUPERVISOR.encode() in f.read():
                    alive.append(int(pid))
        except OSError:
            pass
    return alive


def test_correct_wrong_and_broken_completions(isolation):
    ok = run(ADD, isolation=isolation)
    assert ok.passed and ok.error is None and ok.exit_code == 0
    wrong = run("def add(a, b):\n    return a - b\n", isolation=isolation)
    assert not wrong.passed and wrong.error == "AssertionError"
    syntax = run("def add(a, b)\n    return a + b\n", isolation=isolation)
    assert not syntax.passed and syntax.error.startswith("SyntaxError")
    missing = run("def plus(a, b):\n    return a + b\n", isolation=isolation)
    assert not missing.passed and missing.error == "NameError: name 'add' is not defined"
    crash = run(ADD + "raise ValueError('at import')\n", isolation=isolation)
    assert not crash.passed and crash.error == "ValueError: at import" and "Traceback" in crash.stderr
    printed = run(ADD + "print('hello from the completion')\n", isolation=isolation)
    assert printed.passed and printed.stdout == "hello from the completion\n"


def test_infinite_loops_are_killed(isolation):
    spin = run("def add(a, b):\n    while True:\n        pass\n", limits=SHORT, isolation=isolation)
    assert not spin.passed and ("CPU time limit" in spin.error or "wall-clock" in spin.error), spin
    sleep = run("import time\ndef add(a, b):\n    time.sleep(60)\n", limits=SHORT, isolation=isolation)
    assert not sleep.passed and sleep.timed_out and sleep.error == "timed out: wall-clock limit of 2 s"
    assert supervisors_alive() == []


def test_exit_before_the_asserts_fails(isolation):
    for program, error in [("import sys\nsys.exit(0)\n", "SystemExit: 0"),
                           ("raise SystemExit\n", "SystemExit"),
                           ("import os\nos._exit(0)\n", "exited with status 0 before the tests finished"),
                           ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed by SIGKILL")]:
        for place in ("module", "function"):
            code = program if place == "module" else "def add(a, b):\n" + "".join(
                "    " + line + "\n" for line in program.splitlines())
            out = run(code, isolation=isolation)
            assert not out.passed and out.error == error, (place, program, out)
    # The tests themselves exiting early (a completion that makes them do so) fails too.
    out = run(ADD + "import builtins\nbuiltins.add_done = True\n", "import sys\nsys.exit(0)\nassert False\n",
              isolation=isolation)
    assert not out.passed and out.error == "SystemExit: 0"


def test_a_forged_report_does_not_pass(isolation):
    forged = ("import json, os\nfor fd in (1, 2, 3):\n"
              "    os.write(fd, (json.dumps({'nonce': 'x' * 32, 'passed': True, 'error': None}) + '\\n').encode())\n"
              "os._exit(0)\n")
    out = run(forged, isolation=isolation)
    assert not out.passed and out.error.startswith("exited with status 0 before the tests finished")


@pytest.mark.parametrize("patch", [
    "builtins.abs = lambda x: 0",
    "builtins.isinstance = lambda *a: True",
    "builtins.len = lambda x: 3",
    "builtins.AssertionError = type('Quiet', (Exception,), {})",
    "builtins.print = None\nbuiltins.sorted = lambda x: [1, 2, 3]",
])
def test_patched_builtins_do_not_reach_the_tests(isolation, patch):
    program = "import builtins\n" + patch + "\ndef value(x):\n    return [x, x, x, x]\n"
    tests = ("assert abs(value(1)[0] - 2) < 1e-9\n" if "abs" in patch else
             "assert isinstance(value(1), dict)\n" if "isinstance" in patch else
             "assert len(value(1)) == 3\n" if "len" in patch else
             "assert sorted(value(1)) == [1, 2, 3]\n" if "sorted" in patch else "assert value(1) == 1\n")
    out = run(program, tests, isolation=isolation)
    assert not out.passed and out.error.startswith("AssertionError"), out


def test_values_that_equal_everything_are_refused(isolation):
    always = ("class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
              "def add(a, b):\n    return Any()\n")
    out = run(always, isolation=isolation)
    assert not out.passed and "a class it defined with __eq__" in out.error
    nested = ("class Zero(float):\n    def __sub__(self, other):\n        return 0.0\n"
              "def add(a, b):\n    return [Zero(0)]\n")
    assert not run(nested, "assert abs(add(1, 2)[0] - 3) < 1e-9\n", isolation=isolation).passed
    tracer = ("import sys\ndef skip(frame, event, arg):\n    frame.f_trace_lines = True\n    return skip\n"
              "sys.settrace(skip)\ndef add(a, b):\n    return 0\n")
    assert not run(tracer, isolation=isolation).passed
    # A class of its own without such methods is an honest value: a named tuple compares as a tuple.
    honest = ("from typing import NamedTuple\nclass Pair(NamedTuple):\n    a: int\n    b: int\n"
              "def add(a, b):\n    return Pair(a + b, 0)\n")
    assert run(honest, "assert add(1, 2) == (3, 0)\n", isolation=isolation).passed


def test_memory_hog_fails_with_memory_error(isolation):
    hog = "def add(a, b):\n    blocks = []\n    while True:\n        blocks.append(bytearray(50 << 20))\n"
    out = run(hog, isolation=isolation)
    assert not out.passed and out.error == "MemoryError"
    assert not run("def add(a, b):\n    return len(bytearray(4 << 30))\n", isolation=isolation).passed


def test_fork_storm_is_bounded_and_killed(isolation):
    storm = ("import os, sys, time\nmade = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
             "    except OSError:\n        break\n    if pid == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
             "            time.sleep(120)\n        time.sleep(120)\n    made += 1\n"
             "print(made, flush=True)\ntime.sleep(120)\n")
    out = run(storm, limits=SHORT, isolation=isolation)
    assert not out.passed and out.timed_out
    made = int(out.stdout.split()[0])
    # Each child forks a grandchild; all count against the limit, with the runner itself. Where nothing
    # counts processes for the sandbox alone, it may make none.
    counted = "no-new-processes" not in out.capabilities
    assert made <= FAST.max_processes if counted else made == 0
    assert counted == bool(expected_capabilities(isolation) & {"pids-cgroup", "rlimit-nproc"})
    assert supervisors_alive() == []
    many = "import subprocess\ndef add(a, b):\n    return int(subprocess.check_output(['echo', str(a + b)]))\n"
    assert run(many, isolation=isolation).passed == counted


def test_writes_stay_in_the_working_directory(isolation, tmp_path):
    targets = [str(tmp_path / f"escape-{uuid.uuid4().hex}"), f"/tmp/mftcore-escape-{uuid.uuid4().hex}",
               os.path.join(ROOT, f"escape-{uuid.uuid4().hex}"), "/dev/shm/mftcore-escape"]
    for target in targets:
        out = run(f"open({target!r}, 'w').write('x')\n" + ADD, isolation=isolation)
        # Landlock refuses (PermissionError); a minimal root has no such directory, or only read-only
        assert not out.passed and out.error.startswith(("PermissionError", "OSError", "FileNotFoundError")), out
        assert not os.path.exists(target)
    inside = ("import os, tempfile\nopen('note.txt', 'w').write('kept')\nos.mkdir('sub')\n"
              "with tempfile.NamedTemporaryFile(dir=None) as f:\n    f.write(b'x')\n" + ADD)
    assert run(inside, ADD_TESTS + "assert open('note.txt').read() == 'kept'\n", isolation=isolation).passed


def test_the_test_file_and_the_harness_are_out_of_reach(isolation, tmp_path):
    secret = tmp_path / "humaneval.jsonl"
    secret.write_text('{"test": "assert add(1, 2) == 3"}\n')
    reader = f"text = open({str(secret)!r}).read()\n" + ADD
    out = run(reader, isolation=isolation)
    assert not out.passed and out.error.startswith(("PermissionError", "FileNotFoundError")), out
    assert not run(f"import os\nos.listdir({str(tmp_path)!r})\n" + ADD, isolation=isolation).passed
    assert not run(f"open({os.path.join(ROOT, 'README.md')!r}).read()\n" + ADD, isolation=isolation).passed
    # The standard library still imports (and so would site-packages).
    assert run("import json, math, collections, re, heapq, itertools, fractions\n" + ADD, isolation=isolation).passed
    killer = f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n" + ADD
    out = run(killer, isolation=isolation)
    assert not out.passed and out.error.startswith(("PermissionError", "ProcessLookupError")), out


def test_no_network_and_no_inherited_descriptors(isolation):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(try_accept(server)), daemon=True).start()
    tcp = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + ADD
    out = run(tcp, isolation=isolation)
    assert not out.passed and out.error.startswith(("PermissionError", "OSError", "ConnectionRefused")), out
    udp = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('127.0.0.1', 9))\n"
    assert not run(udp + ADD, isolation=isolation).passed
    assert run("import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'\n" + ADD,
               isolation=isolation).passed  # AF_UNIX pairs stay allowed
    server.close()
    assert accepted in ([None], [])
    fds = "import os\nopen_fds = []\nfor fd in range(256):\n    try:\n        os.fstat(fd)\n" \
          "        open_fds.append(fd)\n    except OSError:\n        pass\n" + ADD
    assert run(fds, ADD_TESTS + "assert open_fds == [0, 1, 2, 3], open_fds\n", isolation=isolation).passed


def try_accept(server):
    try:
        return server.accept()
    except OSError:
        return None


def test_output_floods_are_cut(isolation):
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    out = run(flood, limits=Limits(wall_seconds=30, cpu_seconds=5, output_bytes=1 << 20), isolation=isolation)
    assert not out.passed and len(out.stdout) <= 4000


def test_pool_keeps_the_order_and_reports_capabilities(isolation):
    jobs = [(ADD if i % 3 else "def add(a, b):\n    return 0\n", ADD_TESTS) for i in range(9)]
    seen = []
    outcomes = SandboxPool(workers=2, limits=FAST, isolation=isolation).run(jobs, progress=seen.append)
    assert [o.passed for o in outcomes] == [bool(i % 3) for i in range(9)] and len(seen) == 9
    assert set(outcomes[0].capabilities) == expected_capabilities(isolation)
    with pytest.raises(SandboxError, match="memory_mb must be > 0"):
        SandboxPool(limits=Limits(memory_mb=0))


@pytest.mark.parametrize("mode", list(ISOLATION))
def test_modes_below_the_floor_are_refused(mode, tmp_path):
    """A mode that cannot stop every escape here raises before any untrusted code runs; the others run."""
    marker = tmp_path / "ran"
    program = f"open({str(marker)!r}, 'w').close()\n" + ADD
    reason = expected_refusal(mode)
    if reason is None:
        out = run(ADD, isolation=mode)
        assert out.passed and set(out.capabilities) == expected_capabilities(mode)
        assert set(check_platform(mode)) == expected_capabilities(mode)
    else:
        with pytest.raises(SandboxError, match=f"sandbox: this platform cannot confine {reason} "):
            run(program, isolation=mode)
        with pytest.raises(SandboxError, match="cannot confine"):
            SandboxPool(workers=2, limits=FAST, isolation=mode).run([(program, ADD_TESTS)] * 3)
        with pytest.raises(SandboxError, match=f"cannot confine {reason} "):
            check_platform(mode)
        assert not marker.exists()
    with pytest.raises(SandboxError, match="isolation must be one of auto, fallback"):
        run(ADD, isolation="none")


def test_a_failed_supervisor_is_an_error_and_a_hung_one_is_killed(tmp_path, monkeypatch):
    """Not the completion's fault: a supervisor that ends without a status raises; one that never
    reports is killed with its whole session once the backstop has passed, and the completion failed."""
    from mftcore.sandbox import executor

    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nsys.stderr.write('broken here\\n')\nsys.exit(3)\n")
    monkeypatch.setattr(executor, "SUPERVISOR", str(crash))
    with pytest.raises(SandboxError, match=r"supervisor ended \(status 3\) without a report: broken here"):
        run_program(ADD, ADD_TESTS, FAST)
    hang = tmp_path / "hang.py"
    hang.write_text("import os, time\nos.fork()\ntime.sleep(120)\n")
    monkeypatch.setattr(executor, "SUPERVISOR", str(hang))
    monkeypatch.setattr(executor, "BACKSTOP_SECONDS", 0.5)
    out = run_program(ADD, ADD_TESTS, Limits(wall_seconds=0.5))
    assert not out.passed and out.timed_out and out.error == "the sandbox did not report within 1 s"
    for _ in range(500):  # SIGKILL is delivered asynchronously: the forked child may take a moment to go
        if not processes_running(str(hang)):
            break
        time.sleep(0.01)
    assert processes_running(str(hang)) == []


def processes_running(script: str) -> list:
    """Live processes whose command line names `script` (a zombie's is empty)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found += [int(pid)] if script.encode() in f.read() else []
        except OSError:
            pass
    return found
