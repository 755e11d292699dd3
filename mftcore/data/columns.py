"""Column mapping: the common record shapes of chat and instruction data -> the shapes render.py reads.

render.py reads MFTCoder's shapes (`chat_rounds`, the single-turn pairs such as prompt/answer, `text`).
Besides those, a record (a JSONL line, a parquet/arrow/csv/json row, a Hub dataset's row) may be
- `messages` or `conversations`: a list of turns with role/content (OpenAI, HF chat datasets) or
  ShareGPT's from/value (`human`/`gpt`/`system`), which become `chat_rounds`;
- alpaca's instruction/input/output: the prompt is the instruction, then a blank line and the input when
  the input is not empty. It is recognised before MFTCoder's pairs: MFTCoder would match its
  `input`/`output` pair first and train without the instruction (and stop at an empty input).
A task may also map its own column names onto these (`columns` in its data_paths entry, e.g.
{"prompt": "question", "answer": "solution"} or {"text": "content"}); then only the mapped columns are read.

`record_shape` names the shape of a set of keys (a dataset's columns are checked once, up front: a mapping
that matches nothing is one error listing the columns found); `map_record` rewrites one record.
"""

from __future__ import annotations

from mftcore.data.render import SINGLE_TURN_SHAPES, RenderError
from mftcore.errors import ConfigError, DataError

ALPACA = ("instruction", "input", "output")
CONVERSATION_KEYS = ("messages", "conversations")
# The fields a `columns` mapping may name: what render.py and the conversation shapes read.
MAPPABLE = tuple(dict.fromkeys(("chat_rounds", *CONVERSATION_KEYS, *ALPACA, "system", "text",
                                *(k for pair in SINGLE_TURN_SHAPES for k in pair))))
EXPECTED = ("messages or conversations (role/content or from/value), chat_rounds, instruction/input/output, "
            + ", ".join("/".join(p) for p in SINGLE_TURN_SHAPES) + ", or text")


def record_shape(keys) -> str | None:
    """The shape a record (or a dataset with these columns) is read as, in the order map_record tries
    them: "alpaca", a "prompt/answer"-like pair, "chat_rounds", "messages", "conversations", "text"."""
    keys = set(keys)
    if set(ALPACA) <= keys:
        return "alpaca"
    for pair in SINGLE_TURN_SHAPES:
        if set(pair) <= keys:
            return "/".join(pair)
    for key in ("chat_rounds", *CONVERSATION_KEYS, "text"):
        if key in keys:
            return key
    return None


def check_mapping(columns: dict | None, found: list, where: str) -> None:
    """A dataset's columns against the task's mapping (or the shapes recognised by default): a mapping
    that matches nothing is a DataError naming `where` and listing the columns found."""
    listed = ", ".join(found) or "none"
    if columns:
        for field, column in columns.items():
            if field not in MAPPABLE:
                raise ConfigError(f"{where}: columns: unknown field {field!r} (map onto one of {', '.join(MAPPABLE)})")
            if column not in found:
                raise DataError(f"{where}: columns: {column!r} (for {field}) is not a column; columns found: {listed}")
        keys = list(columns)
    else:
        keys = found
    if record_shape(keys) is None:
        raise DataError(f"{where}: no column mapping matches the columns found ({listed}); expected {EXPECTED}, "
                        "or name yours with \"columns\" in the data_paths entry")


def map_record(record, columns: dict | None = None):
    """One record in a shape render.py reads. MFTCoder's own shapes come back unchanged (the same object),
    so its training strings stay byte for byte. (A dataset row's null cells are left out before this:
    mftcore/data/sources.py.)"""
    if not isinstance(record, dict):
        return record
    if columns:
        record = {field: record[column] for field, column in columns.items() if record.get(column) is not None}
    elif "instruction" not in record and "messages" not in record and "conversations" not in record:
        return record  # no shape of ours can match: MFTCoder's (the fast path of its data, ~1 us a record)
    shape = record_shape(record)
    if shape == "alpaca":
        return alpaca_record(record)
    if shape in CONVERSATION_KEYS:
        return {"chat_rounds": conversation_rounds(record[shape], shape)}
    return record


def alpaca_record(record: dict) -> dict:
    instruction, extra = record["instruction"], record["input"]
    for key in ALPACA:
        if not isinstance(record[key], str):
            raise RenderError(f"{key} must be a string, got {type(record[key]).__name__}")
    prompt = instruction + ("\n\n" + extra if extra.strip() else "")
    out = {"prompt": prompt, "answer": record["output"]}
    if record.get("system") is not None:
        out["system"] = record["system"]
    return out


def conversation_rounds(turns, key: str) -> list:
    """role/content or from/value turns -> chat_rounds turns (role names are checked by the renderer)."""
    if not isinstance(turns, list) or not turns:
        raise RenderError(f"{key} must be a non-empty list of turns")
    rounds = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and "role" in turn and "content" in turn:
            rounds.append({"role": turn["role"], "content": turn["content"]})
        elif isinstance(turn, dict) and "from" in turn and "value" in turn:
            rounds.append({"role": turn["from"], "content": turn["value"]})
        else:
            raise RenderError(f"{key}[{i}] needs 'role' and 'content' (or ShareGPT's 'from' and 'value')")
    return rounds
