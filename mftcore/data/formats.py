"""One record -> the samples it trains as: the column mapping, then MFTCoder's format, the model's own
chat template, or fill-in-the-middle for `text` records, as the task and the config ask.

The default (MFTCoder's format, no FIM, no column mapping, a record in one of MFTCoder's shapes) is
exactly render.render_record: the same segments, so the same ids and masks byte for byte. A sample is
either a list of Segments (each tokenized on its own, MFTCoder's way; FIM too) or a TemplateText (the
template's whole text with its trained spans, tokenized in one piece).
"""

from __future__ import annotations

from dataclasses import dataclass

from mftcore.data.columns import map_record
from mftcore.data.fim import fim_segments
from mftcore.data.render import RenderError, Segment, content_of, detect_shape, fmt, render_record
from mftcore.data.template import ChatTemplate, record_messages

TEMPLATES = ("mftcoder", "model")  # chat_template values: MFTCoder's string format, or the tokenizer's own


@dataclass(frozen=True)
class TaskFormat:
    """What one task's records need besides the global EncodeSpec."""

    columns: dict | None = None  # field -> column (data_paths entry's "columns")
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.0


DEFAULT_TASK = TaskFormat()
_TEMPLATES = {}


def chat_template_of(tokenizer) -> ChatTemplate:
    """The tokenizer's ChatTemplate, built once per process (it is used for every record)."""
    key = id(tokenizer)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = (tokenizer, ChatTemplate(tokenizer))  # the tokenizer keeps its id from being reused
    return _TEMPLATES[key][1]


def render_samples(record, spec, tokenizer, task: int = 0, line: int = 0) -> list:
    """The samples of one parsed record for task `task` (line: its line or row, which seeds FIM)."""
    tasks = getattr(spec, "tasks", ())
    fmt_task = tasks[task] if task < len(tasks) else DEFAULT_TASK
    record = map_record(record, fmt_task.columns)
    template = getattr(spec, "template", None)
    if template in (None, "mftcoder") and not fmt_task.fim_rate:
        return [render_record(record, spec.markers)]
    if not isinstance(record, dict):
        raise RenderError("each line must be a JSON object")
    shape = detect_shape(record)
    if shape == "text":
        text = content_of(record["text"], "text")
        if fmt_task.fim_rate:
            segments = fim_segments(text, spec.fim_tokens, fmt_task.fim_rate, fmt_task.fim_spm_rate, spec.seed,
                                    task, line)
            if segments is not None:
                return [segments]
        return [[Segment(fmt(text), True, eos=True)]]
    if template == "model":
        return chat_template_of(tokenizer).samples(record_messages(record, shape))
    return [render_record(record, spec.markers)]


def per_task(value, n: int) -> list:
    """A number for every task, or a list of one per task (validated by the config)."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value or 0.0)] * n


def encode_options(cfg, tokenizer) -> dict:
    """The EncodeSpec fields of issue 17 for this config: the template, per-task formats, FIM tokens, seed.
    Defaults (MFTCoder's format, no FIM, no column mapping) give empty values, which change nothing."""
    from mftcore.data.fim import resolve_fim_tokens
    from mftcore.data.sources import task_spec
    from mftcore.errors import ConfigError

    n = len(cfg.data_paths)
    template = getattr(cfg, "chat_template", None)
    template = None if template in (None, "mftcoder") else template
    if template == "model":
        try:
            chat_template_of(tokenizer)
        except RenderError as e:
            raise ConfigError(f"chat_template: {e}") from None
    rates, spm = per_task(getattr(cfg, "fim_rate", 0.0), n), per_task(getattr(cfg, "fim_spm_rate", 0.0), n)
    tasks = tuple(TaskFormat(task_spec(p).columns, r, s) for p, r, s in zip(cfg.data_paths, rates, spm))
    fim = any(rates)
    return {"template": template, "tasks": tasks if any(t != DEFAULT_TASK for t in tasks) else (),
            "fim_tokens": resolve_fim_tokens(tokenizer, cfg.model_type, getattr(cfg, "fim_tokens", None))
            if fim else None, "seed": int(cfg.seed) if fim else 0}


def format_key(options: dict, tokenizer) -> dict:
    """The cache-key entries of encode_options: none at all for the defaults (so their entries keep their
    digests), else the template's text, the per-task formats, the FIM tokens and the seed."""
    key = {}
    if options["template"] == "model":
        key["chat_template"] = chat_template_of(tokenizer).template
    if options["tasks"]:
        key["task_formats"] = [[t.columns, t.fim_rate, t.fim_spm_rate] for t in options["tasks"]]
    if options["fim_tokens"] is not None:
        key["fim_tokens"] = [options["fim_tokens"].prefix, options["fim_tokens"].suffix, options["fim_tokens"].middle]
        key["fim_seed"] = options["seed"]
    return key
