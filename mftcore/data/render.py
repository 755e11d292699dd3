"""Render one JSONL record to MFTCoder's training string, as segments with trainable flags.

Byte-for-byte what `mftcoder_accelerate` builds (see ../shared/reference/mftcoder-notes.md): each
segment is tokenized on its own without special tokens, and a segment with `eos` gets the
tokenizer's EOS id appended (as an id, never as text).
"""

from __future__ import annotations

from dataclasses import dataclass

USER_ROLES = ("human", "user")
BOT_ROLES = ("bot", "assistant", "gpt")


class RenderError(ValueError):
    """The record's shape or content is invalid; the caller adds file:line."""


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool
    eos: bool = False


def fmt(content: str) -> str:
    """MFTCoder's content_format: U+202F and U+00A0 become spaces, then one "\\n" is appended."""
    return content.replace("\u202f", " ").replace("\xa0", " ") + "\n"


def render_chatml(rounds: list, markers: dict) -> list[Segment]:
    """`chat_rounds` -> segments: an optional first system turn, then alternating user/bot turns."""
    if not isinstance(rounds, list) or not rounds:
        raise RenderError("chat_rounds must be a non-empty list")
    for i, r in enumerate(rounds):
        if not isinstance(r, dict) or not isinstance(r.get("role"), str) or not isinstance(r.get("content"), str):
            raise RenderError(f"chat_rounds[{i}] needs string 'role' and 'content'")
    segments = []
    if rounds[0]["role"] == "system":
        segments.append(Segment(markers["system"] + fmt(rounds[0]["content"]), False))
        rounds = rounds[1:]
    for i, r in enumerate(rounds):
        role = r["role"]
        if (role in USER_ROLES) != (i % 2 == 0):
            raise RenderError(f"turn {i} has role {role!r}: roles must alternate human/bot (system only first)")
        if role in USER_ROLES:
            segments.append(Segment(markers["user"] + fmt(r["content"]) + markers["assistant"], False))
        elif role in BOT_ROLES:
            segments.append(Segment(fmt(r["content"]), True, eos=True))
            segments.append(Segment("\n", False))
        else:
            raise RenderError(f"unknown role {role!r} (expected system, human/user or bot/assistant/gpt)")
    return segments


def render_record(record: dict, markers: dict) -> list[Segment]:
    if not isinstance(record, dict):
        raise RenderError("each line must be a JSON object")
    if record.get("chat_rounds"):
        return render_chatml(record["chat_rounds"], markers)
    raise RenderError("record has no known shape (expected a non-empty 'chat_rounds')")


def render_prompt(question: str, markers: dict, system: str | None = None) -> str:
    """The inference prompt in the training format: `<s>human\\n{q}\\n<s>bot\\n`."""
    prefix = markers["system"] + fmt(system) if system else ""
    return prefix + markers["user"] + fmt(question) + markers["assistant"]


def tokenize_segments(segments: list[Segment], tokenizer, eos_id: int) -> tuple[list[int], list[int]]:
    """Token ids and the loss mask aligned with them (1 = this token is a training target)."""
    ids, mask = [], []
    for seg in segments:
        piece = tokenizer.encode(seg.text, add_special_tokens=False)
        if seg.eos:
            piece = piece + [eos_id]
        ids.extend(piece)
        mask.extend([int(seg.trainable)] * len(piece))
    return ids, mask
