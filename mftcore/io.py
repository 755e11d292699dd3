"""Files: the one way mftcore writes them (whole or not at all), the one way it opens and parses what it
reads, and their names.

Writes. Every writer goes through `atomic_dir` (a directory) or `atomic_write_text` (a file): the
content is written under a temporary name beside the target and renamed over it once complete, so a
reader (or a run resumed after a SIGKILL) never sees half of one. Temporary names start with ".tmp-",
so that `remove_leftovers` can clear what a killed writer left behind. A write that fails because the
disk is full, over quota, read-only or failing (ENOSPC, EDQUOT, EROFS, EIO, EFBIG, EACCES), or that
fails in a C++/Rust writer (torch.save, safetensors) on a filesystem with no room left, is one
`WriteError` line naming the path and the free space, with its temporary removed. `AppendFile` is the
one append path (metrics.jsonl): a record is written whole or cut back off.

Reads. `open_regular` opens regular files only (a FIFO would block, a device never ends), names a
broken symlink, a loop or a permission problem in one line; `parse_json` is strict: UTF-8 (a BOM is
allowed), no duplicate keys, nesting at most MAX_JSON_DEPTH deep, no lone surrogates, problems as
line numbers. `read_json` / `read_json_object` combine the two for every JSON file mftcore reads.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import stat
import uuid

from mftcore.errors import ConfigError, MftcoreError

CONFIG_FILE = "mftcore_config.json"  # the training config, saved in checkpoints, final/ and merged models
STATE_FILE = "trainer_state.json"  # a checkpoint's step, engine and loop state
METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
MANIFEST_FILE = "manifest.json"  # a checkpoint's files and their sizes, written last
LOCK_FILE = ".mftcore.lock"  # in output_dir: which process is training there
TEMP_PREFIXES = (".tmp-", ".old-", ".del-")  # in-flight writes, replacements and deletes
OWNER_FILE = "owner"  # in an owned temporary directory: "host pid" of its writer
MAX_JSON_DEPTH = 64  # configs and states nest 4 deep; json's C parser itself overflows near 1000
MAX_JSON_BYTES = 1 << 28  # a JSON file mftcore reads whole (configs, states, indexes): 256 MiB


class WriteError(MftcoreError):
    """A write failed for a reason outside mftcore (full disk, quota, read-only or failing device)."""


# --- reading -----------------------------------------------------------------------------------

def open_regular(path: str, error=ConfigError, missing: str | None = None, what: str = "file"):
    """A binary file object for a regular file (symlinks followed); one-line `error` otherwise.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, so that fstat can
    refuse it; it is cleared before reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{path}: broken symbolic link (to {os.readlink(path)!r})") from None
        raise error(missing or f"{path}: {what} not found") from None
    except PermissionError:
        raise error(f"{path}: permission denied (cannot read this {what})") from None
    except OSError as e:
        reason = "symbolic link loop" if e.errno == errno.ELOOP else e.strerror
        raise error(f"{path}: cannot open: {reason}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: not a regular file ({file_kind(mode)}); expected a {what}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def read_regular_bytes(path: str, error=ConfigError, missing: str | None = None, what: str = "file",
                       limit: int = MAX_JSON_BYTES) -> bytes:
    with open_regular(path, error, missing, what) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {limit >> 20} MiB; not a {what} mftcore reads whole")
    return data


class JsonProblem(ValueError):
    """Why a JSON text was refused, and the line (1-based) where, if known."""

    def __init__(self, reason: str, line: int | None = None):
        super().__init__(reason)
        self.reason, self.line = reason, line

    def where(self, path: str) -> str:
        return f"{path}:{self.line}: {self.reason}" if self.line else f"{path}: {self.reason}"


class DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return out


def decode_utf8(data: bytes) -> str:
    """UTF-8 text (a leading BOM dropped); UTF-16/32 and invalid bytes are a JsonProblem with the line."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise JsonProblem("invalid UTF-8: a UTF-16/UTF-32 byte-order mark (save the text as UTF-8)", 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonProblem(f"invalid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                          data.count(b"\n", 0, e.start) + 1) from None


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json(data, *, max_depth: int | None = MAX_JSON_DEPTH):
    """A JSON value from bytes or text, strictly (module docstring); raises JsonProblem."""
    text = decode_utf8(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise JsonProblem(f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None
    except DuplicateKey as e:
        raise JsonProblem(f"duplicate key {e.args[0]!r} (JSON readers disagree on which one counts)",
                          second_key_line(text, e.args[0])) from None
    except RecursionError:
        raise JsonProblem("nested too deeply (JSON arrays/objects inside each other)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise JsonProblem(f"invalid JSON: {e}"[:200]) from None
    if max_depth is not None and depth_exceeds(value, max_depth):
        raise JsonProblem(f"nested more than {max_depth} levels deep")
    if SURROGATE_ESCAPE.search(text):
        check_unicode(value, text)
    return value


def second_key_line(text: str, key: str) -> int | None:
    hits = [m.start() for m in re.finditer(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:", text)]
    return text.count("\n", 0, hits[1]) + 1 if len(hits) > 1 else None


def depth_exceeds(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return True
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def check_unicode(value, text: str) -> None:
    """A \\udXXX escape that is not half of a pair leaves a lone surrogate, which no UTF-8 encoder
    (tokenizers, json.dumps to a file) accepts: refuse it here, with its line."""
    stack = [value]
    while stack:
        v = stack.pop()
        items = [*v.keys(), *v.values()] if isinstance(v, dict) else v if isinstance(v, list) else [v]
        for item in items:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as e:
                    bad = f"\\u{ord(item[e.start]):04x}"
                    pos = text.lower().find(bad)
                    raise JsonProblem(f"lone surrogate {bad} (not a Unicode character)",
                                      text.count("\n", 0, pos) + 1 if pos >= 0 else None) from None
            elif isinstance(item, (dict, list)) and item is not v:
                stack.append(item)


def read_json(path: str, missing: str | None = None, error=ConfigError, what: str = "JSON file"):
    """The JSON value of a regular file, strictly parsed; every problem one `error` line with path:line."""
    data = read_regular_bytes(path, error, missing, what)
    try:
        return parse_json(data)
    except JsonProblem as p:
        raise error(p.where(path)) from None


def read_json_object(path: str, missing: str | None = None, error=ConfigError) -> dict:
    """A JSON object from a file; one-line errors: `missing` (or "path: file not found") if absent,
    path:line if it is not valid JSON, and a note when it holds something other than an object."""
    raw = read_json(path, missing, error)
    if not isinstance(raw, dict):
        raise error(f"{path}: must hold a JSON object")
    return raw


# --- writing -----------------------------------------------------------------------------------

WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for this filesystem or process limit",
                errno.EROFS: "read-only file system", errno.EIO: "input/output error (failing device?)",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.ENOTDIR: "a parent of it is not a directory", errno.ENAMETOOLONG: "name too long"}
SPACE_REASONS = ("no space left on device", "disk quota exceeded",
                 "file too large for this filesystem or process limit")
# What torch.save (C++) and safetensors (Rust) say when the OS refuses a write: they raise RuntimeError
# or their own error types, not OSError, so the errno is in the text if anywhere.
NATIVE_WRITE_FAILURE = re.compile(r"(?i)no space left|file write failed|failed writing|quota|storagefull|"
                                  r"os error (28|122|27|5)\b|code: (28|122|27|5)\b|file too large")
LOW_SPACE = 1 << 20  # a filesystem with less free is full for our purposes (tmpfs rounds to pages)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str) -> int | None:
    """Free bytes for an unprivileged writer on path's filesystem (its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_size
    return total


def write_failure(exc: BaseException, path: str) -> str | None:
    """The reason, when `exc` is the OS refusing a write (see WRITE_ERRNOS), else None."""
    if isinstance(exc, MftcoreError) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return WRITE_ERRNOS[exc.errno]
    if isinstance(exc, OSError) and exc.errno is not None:
        return None
    free = free_bytes(path)
    if NATIVE_WRITE_FAILURE.search(str(exc)) or (free is not None and free < LOW_SPACE):
        return "no space left on device" if free is not None and free < LOW_SPACE else "the write failed"
    return None


def write_error(path: str, reason: str, written: int = 0, need: int | None = None) -> WriteError:
    free = free_bytes(path)
    parts = [f"{human_bytes(free)} free" if free is not None and reason in SPACE_REASONS else None]
    if reason not in SPACE_REASONS:
        pass
    elif need:
        parts.append(f"needs about {human_bytes(need)}")
    elif written:
        parts.append(f"needs more than the {human_bytes(written)} written before it failed")
    detail = "; ".join(p for p in parts if p)
    advice = "; nothing was left half-written: free space, then run again" if reason in SPACE_REASONS else ""
    return WriteError(f"{path}: cannot write: {reason}" + (f" ({detail})" if detail else "") + advice)


@contextlib.contextmanager
def write_guard(path: str, need: int | None = None, partial: str | None = None):
    """Turn the OS refusing a write inside the block into one WriteError line about `path`.
    partial: a file or directory the block was writing, measured for the message."""
    try:
        yield
    except BaseException as e:
        reason = write_failure(e, path)
        if reason is None:
            raise
        written = tree_size(partial) if partial and os.path.exists(partial) else 0
        raise write_error(path, reason, written, need) from None


def temp_sibling(path: str, prefix: str = ".tmp-") -> str:
    """A fresh name in path's directory for a file or directory that will replace (or remove) `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.join(parent, f"{prefix}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")


def make_parent(path: str) -> None:
    with write_guard(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str, *, replace: bool = True, owned: bool = False, need: int | None = None):
    """Yield a temporary sibling directory; on success it becomes `path`, on error it is removed.

    replace=False: the first writer wins: when `path` appeared meanwhile (another process finished the
    same content first), ours is dropped, and a reader of the existing one is never disturbed.
    owned=True: the temporary directory names its writer (host and pid) until it is renamed, so that
    `remove_abandoned` can tell a killed writer's from a live one's in a directory that runs share.
    need: the expected size, for the message when the disk is full (e.g. the previous checkpoint's)."""
    make_parent(path)
    tmp = temp_sibling(path)
    try:
        with write_guard(path, need, partial=tmp):
            os.makedirs(tmp)
            if owned:
                with open(os.path.join(tmp, OWNER_FILE), "w") as f:
                    f.write(f"{socket.gethostname()} {os.getpid()}\n")
            yield tmp
            if owned:
                os.remove(os.path.join(tmp, OWNER_FILE))
            follow_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(path):
                raise
        return
    old = None
    if os.path.exists(path):
        old = temp_sibling(path, ".old-")
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """The process umask, read without changing it (os.umask sets one: another thread writing meanwhile
    would create its file with the temporary value); /proc/self/status has it on Linux 4.7+."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: str) -> None:
    """Give every file under `directory` the mode a plain open() would (0666 less the umask). safetensors
    (through save_pretrained) writes model.safetensors 0600, so a team sharing a run directory could
    not read the weights that every other file of it lets them read."""
    umask = current_umask()
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            want = (0o777 if st.st_mode & 0o100 else 0o666) & ~umask  # an executable stays executable
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != want:
                os.chmod(path, want)


def remove_abandoned(directory: str) -> None:
    """Owned temporary directories whose writer died (SIGKILL, power loss) on this host; a live writer's,
    or another host's on a shared file system, are left alone."""
    host = socket.gethostname()
    for tmp in glob.glob(os.path.join(directory, ".tmp-*")):
        try:
            with open(os.path.join(tmp, OWNER_FILE)) as f:
                owner_host, pid = f.read().split()
        except (OSError, ValueError):
            continue  # just created, not owned, or not a directory: leave it
        if owner_host == host and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` (UTF-8) under a temporary name, then rename it over `path`."""
    make_parent(path)
    tmp = temp_sibling(path)
    try:
        with write_guard(path, partial=tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, value, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent, default=str) + "\n")


class AppendFile:
    """A text file that grows by whole records: each `append` is one os.write of complete lines, and a
    write the OS refuses part-way is cut back off (ftruncate), so a full disk never leaves half a line."""

    def __init__(self, path: str, truncate: bool = False):
        self.path = path
        make_parent(path)
        with write_guard(path):
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
                              | getattr(os, "O_CLOEXEC", 0), 0o644)

    def append(self, text: str) -> None:
        data = text.encode("utf-8")
        start = os.fstat(self.fd).st_size
        try:
            with write_guard(self.path, need=len(data)):
                done = 0
                while done < len(data):
                    done += os.write(self.fd, data[done:])
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, start)
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_dir(path: str) -> None:
    """Rename out of the way first, so that a kill mid-delete leaves no half directory under `path`."""
    doomed = temp_sibling(path, ".del-")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


TEMP_NAME = re.compile(r"^\.(tmp|old|del)-(.+)-[0-9a-f]{8}$")  # what temp_sibling makes, and nothing else


def remove_leftovers(directory: str) -> None:
    """The temporary files and directories of writes or deletes that a killed process did not finish:
    only names temp_sibling makes, and never an owned one whose writer is alive (a cache build sharing
    the directory). A replaced directory (.old-NAME-xxxxxxxx) whose replacement never arrived is put
    back as NAME."""
    if not os.path.isdir(directory):
        return
    names = sorted(os.listdir(directory))
    for n in names:
        m = TEMP_NAME.match(n)
        if m and m.group(1) == "old" and not os.path.lexists(os.path.join(directory, m.group(2))):
            with contextlib.suppress(OSError):
                os.replace(os.path.join(directory, n), os.path.join(directory, m.group(2)))
    for n in names:
        path = os.path.join(directory, n)
        if not TEMP_NAME.match(n) or not os.path.lexists(path) or owned_by_live_writer(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def owned_by_live_writer(path: str) -> bool:
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            host, pid = f.read().split()
    except (OSError, ValueError):
        return False
    return host != socket.gethostname() or process_alive(int(pid))
