"""The Linux interfaces the sandbox confines a process with, through ctypes (standard library only: this
file is imported by supervisor.py inside an interpreter started with -S, before any untrusted code).

Each function either applies its restriction or raises OSError; the supervisor decides what a missing
one means and reports which were applied (the capability names in CAPABILITIES).

- namespaces: a user namespace (the uid maps to itself, so files stay readable) with its own network
  (no interface but a loopback that is down: no network at all), PIDs (the sandbox's first process is
  its init: when it dies the kernel kills every other process in it), mounts, IPC and hostname.
- mounts: every mount read-only, then a size-limited tmpfs as the working directory; where Landlock is
  missing, a minimal root to chroot into (the readable directories and the working directory alone).
- Landlock: reads only below the Python installation and the system's library directories, writes only
  below the working directory, no TCP, no signals or abstract UNIX sockets outside the sandbox.
- seccomp: sockets other than AF_UNIX, ptrace and io_uring (which opens sockets past a socket filter)
  refused; optionally every new process (threads stay allowed).
- capabilities: none left (the user namespace grants all of them inside it).
"""

from __future__ import annotations

import ctypes
import os
import struct

MACHINE = os.uname().machine  # not platform.machine(): importing platform costs this process ~10 ms
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_THREAD = 0x00010000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER = 38, 24, 22, 36
PR_GET_SECCOMP = 21

# Syscall numbers: the ones added since 4.x are shared by every architecture.
SYS_MOUNT_SETATTR, SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD, SYS_LANDLOCK_RESTRICT = 442, 444, 445, 446
ARCH = {
    "x86_64": {"audit": 0xC000003E, "capset": 126, "socket": 41, "clone": 56, "fork": 57, "vfork": 58,
               "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311},
    "aarch64": {"audit": 0xC00000B7, "capset": 91, "socket": 198, "clone": 220, "fork": None, "vfork": None,
                "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271},
}.get(MACHINE)
IO_URING = (425, 426, 427)
CLONE3 = 435

# Landlock access rights by ABI version (include/uapi/linux/landlock.h).
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1


def check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def syscall(number: int, *args) -> int:
    return LIBC.syscall(ctypes.c_long(number), *args)


# --- namespaces and mounts -----------------------------------------------------------------------

def enter_namespaces() -> list:
    """A user namespace whose uid and gid map to this process's own (files keep their owners), then new
    network, PID, mount, IPC and UTS namespaces owned by it, one at a time: returns the names of those
    entered ("userns", "netns", "pidns", "mountns"), so that a platform that allows only some of them
    (a container refusing CLONE_NEWUSER, an LSM refusing mounts) gets those. PID: only this process's
    children live in the new one. Never raises."""
    uid, gid = os.geteuid(), os.getegid()
    if LIBC.unshare(CLONE_NEWUSER) < 0:
        return []
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return ["userns"]  # ids unmapped: ask no more of it (the runner drops its capabilities all the same)
    entered = ["userns"]
    for flag, name in ((CLONE_NEWNET, "netns"), (CLONE_NEWPID, "pidns"), (CLONE_NEWNS, "mountns"),
                       (CLONE_NEWIPC | CLONE_NEWUTS, None)):
        if LIBC.unshare(flag) == 0 and name:
            entered.append(name)
    return entered


def make_mounts_read_only() -> None:
    """Every mount of this (new) mount namespace read-only, and none of it shared with the host's."""
    check(LIBC.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "mount --make-rprivate /")
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)  # attr_set, attr_clr, propagation, userns_fd
    check(syscall(SYS_MOUNT_SETATTR, ctypes.c_int(AT_FDCWD), b"/", ctypes.c_uint(AT_RECURSIVE), attr,
                  ctypes.c_size_t(len(attr))), "mount_setattr / read-only")


def mount_tmpfs(path: str, size_mb: int) -> None:
    """A private, size-limited tmpfs on `path`, owned by this process's uid (the working directory)."""
    options = f"size={size_mb}m,mode=0700,uid={os.geteuid()},gid={os.getegid()}".encode()
    check(LIBC.mount(b"tmpfs", path.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV), options),
          f"mount tmpfs on {path}")


def build_minimal_root(root: str, sources, workdir: str) -> None:
    """A tmpfs on `root` holding only `sources` (recursive bind mounts, read-only as every mount is by
    then; symbolic links copied as links) and `workdir` (its writable tmpfs), at their own paths, and
    then made read-only itself: what a process that chroots into it (and then holds no capability) can
    reach where Landlock cannot limit reads. Call after make_mounts_read_only and mount_tmpfs."""
    check(LIBC.mount(b"tmpfs", root.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV), b"size=1m,mode=0755"),
          f"mount tmpfs on {root}")
    done = []
    for source in sorted({os.path.abspath(p) for p in [*sources, workdir]}):
        if not os.path.lexists(source) or any(source.startswith(d + "/") for d in done):
            continue  # absent here, or already inside a bound directory
        target = root + source
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
            continue
        if os.path.isdir(source):
            os.mkdir(target)
            done.append(source)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
        check(LIBC.mount(source.encode(), target.encode(), None, ctypes.c_ulong(MS_BIND | MS_REC), None),
              f"bind mount {source}")
    attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)
    check(syscall(SYS_MOUNT_SETATTR, ctypes.c_int(AT_FDCWD), root.encode(), ctypes.c_uint(0), attr,
                  ctypes.c_size_t(len(attr))), f"mount_setattr {root} read-only")


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process, so that it can find and kill all of them."""
    check(LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


# --- capabilities, no_new_privs ------------------------------------------------------------------

def drop_capabilities() -> None:
    """No capability left, now or after an exec (bounding set emptied first, while CAP_SETPCAP is held)."""
    for cap in range(64):
        if LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() == 22:  # EINVAL: past the last cap
            break
    if ARCH is None:
        raise OSError(0, f"capset: unknown architecture {MACHINE}")
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = bytes(24)  # two {effective, permitted, inheritable} u32 triples, all zero
    check(syscall(ARCH["capset"], header, data), "capset")


def set_no_new_privs() -> None:
    check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


# --- Landlock ------------------------------------------------------------------------------------

def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is absent or disabled."""
    version = syscall(SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint(1))  # ..._VERSION flag
    return max(int(version), 0)


def apply_landlock(read_paths, write_paths, rw_files=()) -> list:
    """Restrict this process and its future children: read (and execute) below `read_paths`, everything
    below `write_paths`, read and write of the files `rw_files`; no TCP bind or connect (ABI >= 4); no
    signals to and no abstract UNIX sockets of processes outside (ABI >= 6). Returns the capability
    names applied. Needs no_new_privs (or CAP_SYS_ADMIN)."""
    abi = landlock_abi()
    if abi < 1:
        raise OSError(0, "Landlock is not available")
    fs = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("QQQ", fs, net, scoped)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = check(syscall(SYS_LANDLOCK_CREATE, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint(0)),
                    "landlock_create_ruleset")
    try:
        read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
        rules = [(p, read) for p in read_paths] + [(p, fs) for p in write_paths]
        rules += [(p, FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)) for p in rw_files]
        for path, access in rules:
            add_landlock_rule(ruleset, path, access)
        check(syscall(SYS_LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + (["landlock-net"] if net else []) + (["landlock-scope"] if scoped else [])


def add_landlock_rule(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path this system does not have
    try:
        if not os.path.isdir(path):
            access &= FILE_RIGHTS  # directory rights on a file are EINVAL
        rule = struct.pack("=Qi", access, fd)  # struct landlock_path_beneath_attr is packed
        check(syscall(SYS_LANDLOCK_ADD, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint(0)),
              f"landlock_add_rule {path}")
    finally:
        os.close(fd)


# --- seccomp -------------------------------------------------------------------------------------

def seccomp_program(no_new_processes: bool) -> bytes:
    """A classic-BPF seccomp filter (struct sock_filter[]) for this architecture, described above."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, eacces, enosys = 0x00050000 | 1, 0x00050000 | 13, 0x00050000 | 38
    a = ARCH
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, a["audit"]), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if MACHINE == "x86_64":  # x32 syscall numbers would slip past the table below
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]
    denied = [a["ptrace"], a["process_vm_readv"], a["process_vm_writev"], *IO_URING]
    if no_new_processes:
        denied += [n for n in (a["fork"], a["vfork"]) if n is not None]
        prog += [(jeq, 0, 1, CLONE3), (ret, 0, 0, enosys)]  # glibc then falls back to clone for threads
    for number in denied:
        prog += [(jeq, 0, 1, number), (ret, 0, 0, eperm)]
    # socket(domain, ...): AF_UNIX (1) only; args[0] is at offset 16 (low word on little endian).
    prog += [(jeq, 0, 4, a["socket"]), (ld, 0, 0, 16), (jeq, 0, 1, 1), (ret, 0, 0, allow), (ret, 0, 0, eacces)]
    if no_new_processes:  # clone(flags, ...): threads only
        prog += [(jeq, 0, 4, a["clone"]), (ld, 0, 0, 16), (jset, 0, 1, CLONE_THREAD), (ret, 0, 0, allow),
                 (ret, 0, 0, eperm)]
    prog.append((ret, 0, 0, allow))
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def seccomp_available() -> bool:
    """Whether this kernel has seccomp (PR_GET_SECCOMP fails with EINVAL without it) for a known architecture."""
    return ARCH is not None and LIBC.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0


def apply_seccomp(no_new_processes: bool) -> None:
    """Install the filter of seccomp_program on this thread and its future children (needs no_new_privs)."""
    if ARCH is None:
        raise OSError(0, f"seccomp: unknown architecture {MACHINE}")
    code = seccomp_program(no_new_processes)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxP", len(code) // 8, ctypes.addressof(buffer))  # struct sock_fprog
    check(LIBC.prctl(PR_SET_SECCOMP, 2, fprog, 0, 0), "prctl(PR_SET_SECCOMP)")
