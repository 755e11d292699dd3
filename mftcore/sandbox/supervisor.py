"""The sandbox's first process: `python -S -s -P supervisor.py`, started by executor.py in a new session
with nothing open but stdin (the job, JSON), stdout and stderr (files of the harness) and the status
pipe (job["status_fd"], where this process writes its status, JSON). Standard library only.

It joins the job's pids cgroup (if the harness made one), enters new namespaces where the platform
allows (confine.enter_namespaces), makes every mount read-only and mounts a tmpfs as the working
directory (and, without Landlock, builds a minimal root), then forks the new PID namespace's init
(be_init), which forks the runner. The runner confines itself further (chroot, rlimits, no
capabilities, Landlock, seccomp) before it runs any untrusted code. Where what the platform allows
(less what the job denies) leaves a line of FLOOR open, nothing is forked: the status says why.
This process stays outside all of that: it enforces the wall-clock limit, then kills every process the
runner left (the PID namespace's init dying takes them all; without one, the subreaper's descendants
and the cgroup's members, until none is left) and reports.
"""

import json
import os
import resource
import select
import signal
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import confine  # noqa: E402
import runner  # noqa: E402

RESULT_FD = 3  # the result pipe's number in the runner
RESULT_BYTES = 8192


def set_limits(limits: dict, count_processes: bool) -> None:
    """The runner's resource limits: address space, CPU seconds (SIGKILL one second after the soft limit,
    which a PID namespace's init ignores), file size (what it writes, its stdout and stderr included),
    open files, no core dumps, and processes (only where the kernel counts them for this sandbox alone)."""
    cpu = limits["cpu_seconds"]
    pairs = [(resource.RLIMIT_AS, limits["memory_mb"] << 20), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
             (resource.RLIMIT_FSIZE, limits["output_bytes"]), (resource.RLIMIT_NOFILE, limits["open_files"]),
             (resource.RLIMIT_CORE, 0)]
    if count_processes:
        pairs.append((resource.RLIMIT_NPROC, limits["max_processes"]))
    for which, value in pairs:
        resource.setrlimit(which, value if isinstance(value, tuple) else (value, value))


def runner_capabilities(userns: bool, deny) -> list:
    """What confine_runner will apply on this platform (it fails rather than apply less); `deny`: the
    features the job asks to do without ("landlock", "seccomp"; executor.ISOLATION)."""
    abi = 0 if "landlock" in deny else confine.landlock_abi()
    caps = ["no-capabilities"] if userns or os.geteuid() == 0 else []
    if abi >= 1:
        caps += ["landlock-fs"] + (["landlock-net"] if abi >= 4 else []) + (["landlock-scope"] if abi >= 6 else [])
    return caps + (["seccomp"] if confine.seccomp_available() and "seccomp" not in deny else [])


# What a sandbox must stop, and the capabilities of which any one does (a run where none applies is
# refused before any untrusted code runs, rather than run less confined). Landlock also confines ptrace
# and process_vm_readv to the sandbox's own processes.
FLOOR = (
    ("reads and writes outside its directory", ("landlock-fs", "minimal-root")),
    ("the network", ("netns", "seccomp")),
    ("new processes", ("pids-cgroup", "rlimit-nproc", "seccomp")),
    ("signals to the harness", ("pidns", "landlock-scope")),
)


def find_refusal(caps: list):
    """None when every line of FLOOR holds for these capabilities, else the one-line reason it does not."""
    for what, means in FLOOR:
        if not set(means) & set(caps):
            return (f"sandbox: this platform cannot confine {what} (it needs one of: {', '.join(means)}; "
                    f"available: {', '.join(caps) or 'none'})")
    return None


def confine_runner(job: dict, userns: bool, bound: str) -> None:
    """Everything the runner applies to itself before the untrusted code: the rlimits, then what
    runner_capabilities names. Any failure is fatal (OSError): no untrusted code runs less confined."""
    if job.get("root"):  # the minimal root of isolate(); the capabilities it takes to leave are dropped below
        os.chroot(job["root"])
    os.chdir(job["workdir"])
    set_limits(job["limits"], count_processes=bound == "rlimit-nproc")
    confine.set_no_new_privs()
    caps = runner_capabilities(userns, job["deny"])
    if "no-capabilities" in caps:
        confine.drop_capabilities()
    if "landlock-fs" in caps:
        confine.apply_landlock(job["read_roots"], [job["workdir"]], ["/dev/null"])
    if "seccomp" in caps:
        confine.apply_seccomp(no_new_processes=bound == "no-new-processes")


def run_runner(job: dict, result_w: int, userns: bool, bound: str) -> None:
    """The forked runner: confine, then run the program and its tests. Never returns."""
    try:
        os.dup2(result_w, RESULT_FD)  # replaces the status pipe: the runner never holds it
        os.closerange(RESULT_FD + 1, 1 << 16)
        confine_runner(job, userns, bound)
        sys.path[:] = job["sys_path"]
    except BaseException as e:
        sys.stderr.write(f"sandbox: could not confine the runner: {e}\n")
        sys.stderr.flush()
        os._exit(111)
    runner.run(job["program"], job["tests"], job["nonce"], RESULT_FD)


def be_init(job: dict, result_w: int, bound: str, status_w: int) -> None:
    """PID 1 of the new PID namespace: fork the runner, reap whatever is orphaned to it, and when the
    runner ends pass its wait status on and exit (which kills everything left in the namespace). The
    runner is not init itself because init ignores the signals a process may send itself (and SIGXCPU,
    SIGXFSZ), which would change how a program ends. Never returns."""
    runner_pid = os.fork()
    if runner_pid == 0:
        os.close(status_w)
        run_runner(job, result_w, True, bound)  # a PID namespace is entered only inside a user namespace
    os.close(result_w)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if pid == runner_pid:
            os.write(status_w, struct.pack("i", status))
            os._exit(0)


def find_descendants(root: int) -> set:
    """Every live process below `root`, from the parent links in /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found, todo = set(), [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            if pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def list_cgroup_members(cgroup) -> set:
    if not cgroup:
        return set()
    try:
        with open(os.path.join(cgroup, "cgroup.procs")) as f:
            return {int(line) for line in f if line.strip()} - {os.getpid()}
    except OSError:
        return set()


def kill_all(cgroup) -> int:
    """SIGKILL every descendant (and cgroup member) and reap them, until none is left; returns how many."""
    killed = 0
    for _ in range(1000):
        victims = find_descendants(os.getpid()) | list_cgroup_members(cgroup)
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        reap()
        time.sleep(0.002)
    return killed


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wait_for(pid: int, seconds: float):
    """(wait status, rusage, timed_out): the runner's end, or SIGKILL once `seconds` have passed."""
    deadline = time.monotonic() + seconds
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                return status, usage, False
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                return status, usage, True
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def read_result(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while sum(map(len, chunks)) < RESULT_BYTES:
            chunk = os.read(fd, RESULT_BYTES)
            if not chunk:
                break
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)[:RESULT_BYTES].decode("utf-8", "replace")


def isolate(job: dict) -> tuple:
    """(capabilities, the namespaces entered, how processes are bounded) for what this platform allowed
    and the job did not deny."""
    host_uid = os.geteuid()  # the kernel never counts processes for uid 0, inside a namespace or not
    caps = []
    try:
        if job.get("cgroup"):
            with open(os.path.join(job["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            caps.append("pids-cgroup")
    except OSError:  # made but not joinable (a delegation the harness cannot use): bound otherwise
        job["cgroup"] = None
    entered = [] if "namespaces" in job["deny"] else confine.enter_namespaces()
    caps += entered
    if "mountns" in entered:
        try:
            confine.make_mounts_read_only()
            caps.append("readonly-mounts")
            confine.mount_tmpfs(job["workdir"], job["limits"]["disk_mb"])
            caps.append("tmpfs-workdir")
            if "landlock" in job["deny"] or confine.landlock_abi() < 1:
                confine.build_minimal_root(job["root"], job["read_roots"] + ["/dev/null"], job["workdir"])
                caps.append("minimal-root")
        except OSError:
            pass  # what was applied stays; what failed is not claimed
    confine.become_subreaper()
    if "pids-cgroup" in caps:
        bound = "pids-cgroup"
    elif "userns" in entered and host_uid != 0:  # RLIMIT_NPROC counts per user namespace
        bound = "rlimit-nproc"
    else:
        bound = "no-new-processes"
    return caps, entered, bound


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    caps, entered, bound = isolate(job)
    if "minimal-root" not in caps:
        job["root"] = None
    userns, pidns = "userns" in entered, "pidns" in entered
    caps += ([] if bound == "pids-cgroup" else [bound]) + runner_capabilities(userns, job["deny"])
    refusal = find_refusal(caps)
    if refusal is not None:
        os.write(job["status_fd"], json.dumps({"refused": refusal, "capabilities": caps}).encode())
        return
    result_r, result_w = os.pipe()
    init_r, init_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(result_r)
        os.close(init_r)
        if pidns:
            be_init(job, result_w, bound, init_w)
        os.close(init_w)
        run_runner(job, result_w, userns, bound)
    os.close(result_w)
    os.close(init_w)
    status, usage, timed_out = wait_for(pid, job["limits"]["wall_seconds"])
    wall = time.monotonic() - started
    leftover = kill_all(job.get("cgroup"))
    runner_status = os.read(init_r, 4) if pidns else b""
    if len(runner_status) == 4:  # init's own status says only that it passed the runner's on
        status = struct.unpack("i", runner_status)[0]
    report = {
        "capabilities": caps, "exit_code": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
        "wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "killed_leftovers": leftover,
        "result": read_result(result_r),
    }
    os.write(job["status_fd"], json.dumps(report).encode())


if __name__ == "__main__":
    main()
