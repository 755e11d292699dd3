"""Raw JSONL lines -> token ids and loss masks: the work that `prepare` spreads over processes.

A chunk is a run of lines of one file. Each line is decoded, parsed and rendered; the segment texts
of the whole chunk are tokenized in one batched call (the same ids as one call per segment, which
the tests check), then the long-sample policy is applied. Bad lines are returned with their line
number and reason; the caller decides whether that stops the run or is counted and skipped.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import numpy as np

from mftcore.data.formats import render_samples
from mftcore.data.render import RenderError, encode_texts, join_pieces
from mftcore.data.template import TemplateText, tokenize_template_texts
from mftcore.errors import DataError
from mftcore.io import JsonProblem, open_regular, parse_json


@dataclass(frozen=True)
class EncodeSpec:
    """Everything the token ids depend on besides the data and the tokenizer (part of the cache key)."""

    markers: dict
    eos_id: int
    seq_length: int
    long_sample_policy: str = "truncate"
    # issue 17 (mftcore/data/formats.py): None/"mftcoder" or "model"; per-task TaskFormat; FIM tokens and seed
    template: str | None = None
    tasks: tuple = ()
    fim_tokens: object = None
    seed: int = 0


@dataclass
class EncodedChunk:
    ids: np.ndarray  # int32, the kept samples back to back
    mask: np.ndarray  # uint8, aligned with ids
    lengths: np.ndarray  # int64, tokens per kept sample
    lines: np.ndarray  # int64, source line of each kept sample
    truncated: int = 0
    dropped: int = 0
    bad: list = field(default_factory=list)  # (line, reason) of each bad line
    loss_tokens: int = 0  # targets after the shift (a sample's first token is never one)
    no_loss: int = 0  # kept samples without any target (no answer, or truncated before it)
    max_id: int = -1  # largest token id in the kept samples, and the line of a sample holding it
    max_id_line: int = 0


def parse_line(raw: bytes):
    """A JSON value from one raw line by the strict reader (mftcore.io.parse_json: UTF-8 with an optional
    byte-order mark, no duplicate keys, no lone surrogates, no nesting that overflows the parser), or
    RenderError with the reason. Records are not walked for depth: rendering reads only known keys."""
    try:
        return parse_json(raw, max_depth=None)
    except JsonProblem as e:
        raise RenderError(e.reason) from None


def encode_lines(lines, first_line: int, tokenizer, spec: EncodeSpec, task: int = 0) -> EncodedChunk:
    """Encode raw lines numbered first_line, first_line+1, ...; blank lines are ignored. `lines` may also
    be a dataset's RowSlice (mftcore/data/sources.py), whose rows are records already, numbered from first_line."""
    if hasattr(lines, "read"):
        lines = lines.read()
    rendered, bad = [], []
    for k, raw in enumerate(lines):
        if isinstance(raw, bytes) and not raw.strip():
            continue
        try:
            record = parse_line(raw) if isinstance(raw, bytes) else raw
            rendered += [(first_line + k, s) for s in render_samples(record, spec, tokenizer, task, first_line + k)]
        except RenderError as e:
            bad.append((first_line + k, str(e)))
    texts = [seg.text for _, segments in rendered if not isinstance(segments, TemplateText) for seg in segments]
    pieces = iter(encode_texts(tokenizer, texts))
    whole = iter(tokenize_template_texts(tokenizer, [s for _, s in rendered if isinstance(s, TemplateText)]))
    ids, mask, lengths, kept_lines = [], [], [], []
    truncated = dropped = loss_tokens = no_loss = 0
    max_id, max_id_line = -1, 0
    for line, segments in rendered:
        if isinstance(segments, TemplateText):
            s_ids, s_mask = next(whole)
        else:
            s_ids, s_mask = join_pieces(segments, [next(pieces) for _ in segments], spec.eos_id)
        if len(s_ids) > spec.seq_length:
            if spec.long_sample_policy == "drop":
                dropped += 1
                continue
            s_ids, s_mask, truncated = s_ids[:spec.seq_length], s_mask[:spec.seq_length], truncated + 1
        ids.extend(s_ids)
        mask.extend(s_mask)
        lengths.append(len(s_ids))
        kept_lines.append(line)
        targets = sum(s_mask[1:])
        loss_tokens, no_loss = loss_tokens + targets, no_loss + (targets == 0)
        top = max(s_ids, default=-1)
        if top > max_id:
            max_id, max_id_line = top, line
    return EncodedChunk(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8),
                        np.asarray(lengths, dtype=np.int64), np.asarray(kept_lines, dtype=np.int64),
                        truncated, dropped, bad, loss_tokens, no_loss, max_id, max_id_line)


# --- worker-process side (mftcore/data/workers.py) ---

def init_worker(tokenizer, spec: EncodeSpec) -> None:
    # A forked child must not start the tokenizer's own thread pool (it may inherit a locked one);
    # the processes are the parallelism here.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches the whole process group: the parent stops the pool and reports it in one line;
    # a worker printing its own KeyboardInterrupt traceback would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (a scheduler signalling the whole process group) ends the worker quietly; the parent
    # reports it in one line and stops the others with SIGKILL.
    signal.signal(signal.SIGTERM, exit_quietly)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # blocked by the parent


def exit_quietly(signum, frame):
    raise SystemExit(128 + signum)  # an int code: multiprocessing exits with it and prints nothing


def read_chunks(path: str, max_lines: int = 512, max_bytes: int = 1 << 22):
    """(lines, first_line, nbytes) runs of one file, in order; lines keep their raw bytes. The file is
    opened by the guarded path (regular files only); a read error names the file."""
    with open_regular(path, DataError, what="data file") as f, read_errors(path):
        lines, first, size = [], 1, 0
        for number, raw in enumerate(f, start=1):
            if not lines:
                first = number
            lines.append(raw)
            size += len(raw)
            if len(lines) >= max_lines or size >= max_bytes:
                yield lines, first, size
                lines, size = [], 0
        if lines:
            yield lines, first, size


class read_errors:
    """An OSError while reading a data file (EIO, a file truncated by NFS) as one DataError line."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, OSError):
            raise DataError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        return False
