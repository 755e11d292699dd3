"""Which files a task directory holds, and what they contain: the one guarded way to find and fingerprint
data files.

`jsonl_files` walks a task directory itself instead of os.walk(followlinks=True), which follows a
symlink to an ancestor until the path is too long and counts every sample once per lap: each
directory is entered once, by its (device, inode); a link back to an ancestor, or two links to one
directory or file, is a DataError naming both paths. Only regular files count: a `*.jsonl` FIFO
would block the reader forever, a broken link or an unreadable directory is named in one line.

`content_digests` fingerprints the files by their bytes (SHA-256, ~1.1 GB/s on the 2-core CI CPU),
so a file rewritten in place with the same size and mtime gets a new cache entry. Re-reading every
file at every start would cost a full pass over the data, so the digests are remembered in
`<cache_dir>/digests.json` under each file's (size, mtime, ctime, inode): the kernel moves ctime on
every write and no tool can set it back, so an unchanged record means unchanged bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat

from mftcore.errors import DataError
from mftcore.io import JsonProblem, atomic_write_json, file_kind, open_regular, parse_json, read_regular_bytes

DIGESTS_FILE = "digests.json"
CHUNK = 1 << 20


def stat_or_error(path: str, shown: str | None = None) -> os.stat_result:
    """os.stat (following links) with the reasons a data path cannot be used, in one line."""
    shown = shown or path
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(f"{shown}: broken symbolic link (to {os.readlink(path)!r})") from None
        raise DataError(f"{shown}: data path does not exist") from None
    except PermissionError:
        raise DataError(f"{shown}: permission denied") from None
    except OSError as e:
        reason = "symbolic link loop" if e.errno == 40 else e.strerror
        raise DataError(f"{shown}: {reason}") from None


def jsonl_files(path: str) -> list:
    """Every *.jsonl below a task directory (sorted, recursive), or the path itself if it is a file.
    Hidden files and directories are left out, as MFTCoder's glob("**/*.jsonl") leaves them out."""
    st = stat_or_error(path)
    if not stat.S_ISDIR(st.st_mode):
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: not a regular file ({file_kind(st.st_mode)}); expected a task directory "
                            "or a .jsonl file")
        return [path]
    files, seen_files, seen_dirs = [], {}, {(st.st_dev, st.st_ino): path}
    walk(path, [(st.st_dev, st.st_ino)], seen_dirs, seen_files, files)
    if not files:
        raise DataError(f"{path}: no *.jsonl files in this task directory")
    return sorted(files)


def walk(directory: str, ancestors: list, seen_dirs: dict, seen_files: dict, files: list) -> None:
    try:
        entries = sorted(os.listdir(directory))
    except PermissionError:
        raise DataError(f"{directory}: permission denied (cannot list this data directory)") from None
    except OSError as e:
        raise DataError(f"{directory}: cannot list: {e.strerror}") from None
    for name in entries:
        if name.startswith("."):
            continue
        full = os.path.join(directory, name)
        is_data = name.endswith(".jsonl")
        try:
            st = os.stat(full)
        except OSError:
            if not is_data and not os.path.isdir(full):
                continue  # a broken link to something that is not data: not ours to judge
            st = stat_or_error(full)
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            if key in ancestors:
                raise DataError(f"{full}: symbolic link loop: it leads back to {seen_dirs[key]}, which contains it")
            if key in seen_dirs:
                raise DataError(f"{full}: the same directory as {seen_dirs[key]}: its samples would count twice")
            seen_dirs[key] = full
            walk(full, ancestors + [key], seen_dirs, seen_files, files)
        elif is_data:
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{full}: not a regular file ({file_kind(st.st_mode)}); data files must be files")
            if key in seen_files:
                raise DataError(f"{full}: the same file as {seen_files[key]}: its samples would count twice")
            seen_files[key] = full
            files.append(full)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open_regular(path, DataError, what="data file") as f:
        while True:
            try:
                block = f.read(CHUNK)
            except OSError as e:
                raise DataError(f"{path}: cannot read: {e.strerror}") from None
            if not block:
                return h.hexdigest()
            h.update(block)


def stat_record(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def content_digests(files: list, cache_dir: str, remember: bool = True) -> dict:
    """{path: SHA-256 of its bytes} (module docstring); remember: update the digests file (local rank 0)."""
    memo_path = os.path.join(cache_dir, DIGESTS_FILE)
    memo = read_memo(memo_path)
    out, changed = {}, False
    for f in files:
        record = stat_record(os.path.abspath(f))
        known = memo.get(os.path.abspath(f))
        if isinstance(known, list) and known[:4] == record and len(known) == 5:
            out[f] = known[4]
            continue
        out[f] = file_digest(f)
        if stat_record(os.path.abspath(f)) == record:  # not written to while we read it
            memo[os.path.abspath(f)] = record + [out[f]]
            changed = True
    if changed and remember:
        atomic_write_json(memo_path, memo, indent=0)
    return out


def read_memo(path: str) -> dict:
    """The remembered digests; a missing or damaged file is an empty memory (it is only a shortcut)."""
    if not os.path.isfile(path):
        return {}
    try:
        memo = parse_json(read_regular_bytes(path, DataError), max_depth=None)
    except (DataError, JsonProblem):
        return {}
    return memo if isinstance(memo, dict) else {}
