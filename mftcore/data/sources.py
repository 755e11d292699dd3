"""Where a task's records come from: one `data_paths` entry -> its sources.

An entry is a path or Hub name, or an object {"path", "split", "subset", "columns"}:
- a directory of *.jsonl files, or one .jsonl file: MFTCoder's data, read line by line by the cache's own
  JSONL path (mftcore/data/cache.py; `.json` files beside them are left alone, as MFTCoder leaves them);
- a .parquet / .arrow / .csv / .json file, or a directory of such files (recursively, sorted; one format
  per directory: *.jsonl mixed with parquet/arrow/csv is an error, never a silent choice);
- a `datasets.save_to_disk` directory (a Dataset, or a DatasetDict whose `split` is taken, default train);
- a Hub dataset name ("owner/name", not an existing path) with optional `subset` and `split` (default
  train), loaded by `datasets.load_dataset`: offline from the local Hugging Face cache when HF_HUB_OFFLINE=1
  (the tests do so, with the cache in a temporary directory), else as datasets does.
Everything but JSONL is read through the `datasets` library, one DatasetSource per file (so that a bad
row names its file and row: `x.parquet: row 17`, or `owner/name[train]: index 17` for a Hub dataset).
A source's rows come out as records in slices (RowSlice, which a worker process reads itself: only the
slice's bounds cross the process boundary), and its cache key holds the dataset's fingerprint.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mftcore.data.columns import check_mapping
from mftcore.errors import ConfigError, DataError

DATA_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
ENTRY_KEYS = ("path", "split", "subset", "columns")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
ROWS_PER_SLICE = 512  # as the JSONL path's 512 lines per chunk
_OPEN = {}  # source identity -> its open datasets.Dataset, per process (forked workers inherit it)


@dataclass(frozen=True)
class TaskSpec:
    """One data_paths entry."""

    path: str
    split: str | None = None
    subset: str | None = None
    columns: dict | None = None


def task_spec(entry, where: str = "data_paths") -> TaskSpec:
    if isinstance(entry, str):
        return TaskSpec(entry)
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ConfigError(f"{where}: each entry is a path (string) or an object with a \"path\", got "
                          f"{str(entry)[:80]}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: {entry['path']}: unknown keys {unknown} (allowed: {', '.join(ENTRY_KEYS)})")
    for key in ("split", "subset"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ConfigError(f"{where}: {entry['path']}: {key} must be a string")
    columns = entry.get("columns")
    if columns is not None and (not isinstance(columns, dict) or not columns
                                or not all(isinstance(v, str) for v in columns.values())):
        raise ConfigError(f"{where}: {entry['path']}: columns must map fields to column names, e.g. "
                          "{\"prompt\": \"question\", \"answer\": \"solution\"}")
    return TaskSpec(entry["path"], entry.get("split"), entry.get("subset"), columns)


def task_path(entry) -> str:
    """The path (or Hub name) of a data_paths entry: what names the task."""
    return entry if isinstance(entry, str) else entry["path"]


def is_saved_dataset(path: str) -> bool:
    """A `save_to_disk` directory: a Dataset (state.json + dataset_info.json) or a DatasetDict."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def is_hub_name(path: str) -> bool:
    return not os.path.exists(path) and HUB_NAME.fullmatch(path) is not None and ".." not in path


def files_by_extension(path: str) -> dict:
    """extension -> sorted files below a directory (recursive; hidden files and directories left out)."""
    found = {}
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            ext = os.path.splitext(n)[1].lower()
            if not n.startswith(".") and (ext in DATA_EXTENSIONS or ext == ".jsonl"):
                found.setdefault(ext, []).append(os.path.join(root, n))
    return {ext: sorted(files) for ext, files in found.items()}


def dataset_sources(entry) -> list | None:
    """The DatasetSources of a task, or None for a JSONL task (and for a missing path, which the JSONL
    path reports)."""
    spec = task_spec(entry)
    path = spec.path
    if is_hub_name(path):
        return [DatasetSource("hub", path, spec.split, spec.subset, spec.columns)]
    if spec.subset is not None:
        raise ConfigError(f"data_paths: {path}: subset is for Hub datasets only")
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        builder = DATA_EXTENSIONS.get(os.path.splitext(path)[1].lower())
        return None if builder is None else [DatasetSource("file", path, None, None, spec.columns)]
    if is_saved_dataset(path):
        return [DatasetSource("disk", path, spec.split, None, spec.columns)]
    if spec.split is not None:
        raise ConfigError(f"data_paths: {path}: split is for save_to_disk directories and Hub datasets only")
    found = files_by_extension(path)
    formats = sorted(ext for ext in found if ext not in (".jsonl", ".json"))
    if ".jsonl" in found:
        if formats:
            raise DataError(f"{path}: holds *.jsonl and *{formats[0]} files: one format per task directory "
                            "(move one of them into a task of its own)")
        return None
    formats = sorted(found)
    if len(formats) > 1:
        raise DataError(f"{path}: holds *{formats[0]} and *{formats[1]} files: one format per task directory")
    return [DatasetSource("file", f, None, None, spec.columns) for f in found[formats[0]]] if formats else None


class DatasetSource:
    """One dataset read through `datasets`: a file, a save_to_disk directory, or a Hub dataset."""

    def __init__(self, kind: str, ref: str, split: str | None, subset: str | None, columns: dict | None):
        self.kind, self.ref, self.split, self.subset, self.columns = kind, ref, split, subset, columns
        self.ident = (kind, os.path.abspath(ref) if kind != "hub" else ref, split, subset)
        if kind == "hub":
            self.name = ref + (f"/{subset}" if subset else "") + f"[{split or 'train'}]"
        else:
            self.name = ref + (f"[{split}]" if split else "")

    def __str__(self) -> str:
        return self.name

    def __getstate__(self):  # a worker reopens the dataset (or finds it inherited): never pickle its tables
        return {k: v for k, v in self.__dict__.items() if k != "_dataset"}

    def location(self, row: int) -> str:
        return f"{self.name}: {'index' if self.kind == 'hub' else 'row'} {row}"

    def stamp(self) -> tuple:
        """Size and mtime of what a local source reads: a rewritten file is opened afresh."""
        if self.kind == "hub":
            return ()
        paths = [self.ref] if self.kind == "file" else [os.path.join(self.ref, n) for n in sorted(os.listdir(self.ref))]
        return tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))

    @property
    def dataset(self):
        key = (self.ident, self.stamp())
        ds = _OPEN.get(key)
        if ds is None:
            ds = _OPEN[key] = self.open()
        return ds

    def open(self):
        import datasets
        from datasets.utils import logging as ds_logging

        ds_logging.set_verbosity_error()
        ds_logging.disable_progress_bar()
        try:
            if self.kind == "file":
                builder = DATA_EXTENSIONS[os.path.splitext(self.ref)[1].lower()]
                ds = datasets.load_dataset(builder, data_files=[os.path.abspath(self.ref)], split="train")
            elif self.kind == "disk":
                ds = datasets.load_from_disk(self.ref)
                if isinstance(ds, datasets.DatasetDict):
                    split = self.split or "train"
                    if split not in ds:
                        raise DataError(f"{self.ref}: no split {split!r} in this DatasetDict (splits: "
                                        f"{', '.join(ds)}); set \"split\" in its data_paths entry")
                    ds = ds[split]
                elif self.split is not None:
                    raise DataError(f"{self.ref}: split {self.split!r}: this save_to_disk directory holds one "
                                    "dataset, not a DatasetDict")
            else:
                ds = datasets.load_dataset(self.ref, self.subset, split=self.split or "train")
        except DataError:
            raise
        except Exception as e:  # datasets raises many types; the user needs the one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.kind == "hub":
                raise DataError(f"{self.name}: not a local path, and datasets cannot load it as a Hub dataset "
                                f"(offline, only from the local cache): {reason}") from None
            raise DataError(f"{self.name}: cannot be read as a dataset: {reason}") from None
        if isinstance(ds, datasets.IterableDataset) or not hasattr(ds, "column_names"):
            raise DataError(f"{self.name}: not a map-style dataset")
        check_mapping(self.columns, list(ds.column_names), self.name)
        return ds

    def key(self) -> dict:
        """What the tokens depend on: the dataset's fingerprint, its size and (files) their stats."""
        ds = self.dataset
        key = {"kind": self.kind, "ref": self.ident[1], "split": self.split, "subset": self.subset,
               "columns": self.columns, "fingerprint": ds._fingerprint, "rows": len(ds)}
        if self.kind == "file":
            st = os.stat(self.ref)
            key["stat"] = [st.st_size, st.st_mtime_ns]
        return key

    @property
    def nbytes(self) -> int:
        return int(self.dataset.data.nbytes)

    def chunks(self, rows: int = ROWS_PER_SLICE):
        """(RowSlice, first row, approximate bytes) runs of the source, in order."""
        n, total = len(self.dataset), self.nbytes
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            yield RowSlice(self, start, stop), start, total * (stop - start) // max(n, 1)

    def read(self, start: int, stop: int) -> list:
        """Rows [start, stop) as records; null cells left out (a dataset row holds every column)."""
        key = (self.ident, self.stamp(), "arrow")
        formatted = _OPEN.get(key)
        if formatted is None:  # formatting makes a new Dataset object: once per process, not per slice
            formatted = _OPEN[key] = self.dataset.with_format("arrow")
        table = formatted[start:stop]
        return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


@dataclass(frozen=True)
class RowSlice:
    source: DatasetSource
    start: int
    stop: int

    def read(self) -> list:
        return self.source.read(self.start, self.stop)


def location(source, line: int) -> str:
    """Where a bad record is: `file:line` for JSONL, `file: row N` / `name[split]: index N` for datasets."""
    return source.location(line) if isinstance(source, DatasetSource) else f"{source}:{line}"
