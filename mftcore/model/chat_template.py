"""A Jinja chat template that renders MFTCoder's training string with the model's own role markers.

Saved in the tokenizer of a merged (and a trained) model, so that plain transformers users get exactly
what the model was trained on:

    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    == render_prompt(question, markers, system)               # the training prefix, byte for byte

A whole conversation renders as the concatenation of the training segments (EOS as its token text):
`{SYS}{s}\\n{USER}{q}\\n{BOT}{a}\\n<eos>\\n...`; contents go through the same U+202F / U+00A0 -> space
replacement as training (`render.fmt`). Roles and their order follow `render_chatml`.
"""

from __future__ import annotations

import os

from mftcore.data.render import BOT_ROLES, DEFAULT_ROLE_MARKERS, USER_ROLES
from mftcore.io import CONFIG_FILE, read_json_object


def jinja_literal(text: str) -> str:
    """A Jinja string literal for any text: every character outside [A-Za-z0-9 _] escaped, so that
    markers holding quotes, braces or `{%` can never break out of the literal."""
    out = []
    for ch in text:
        if ch.isascii() and (ch.isalnum() or ch in " _"):
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def build_chat_template(markers: dict) -> str:
    """The template for role markers {system, user, assistant} (MFTCoder's `<s>human\\n` ... by default)."""
    sys_m, user_m, bot_m = (jinja_literal(markers[k]) for k in ("system", "user", "assistant"))
    users, bots = list(USER_ROLES), list(BOT_ROLES)
    return (
        "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
        "{%- for message in messages -%}"
        "{%- set content = message['content'] | replace('\\u202f', ' ') | replace('\\u00a0', ' ') -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if not loop.first -%}{{ raise_exception('the system message must come first') }}{%- endif -%}"
        f"{{{{ {sys_m} + content + '\\n' }}}}"
        f"{{%- elif (message['role'] in {users}) != ((loop.index0 - offset) % 2 == 0) -%}}"
        "{{ raise_exception('roles must alternate user/assistant (system only first)') }}"
        f"{{%- elif message['role'] in {users} -%}}"
        f"{{{{ {user_m} + content + '\\n' }}}}"
        f"{{%- elif message['role'] in {bots} -%}}"
        f"{{{{ {bot_m} + content + '\\n' + eos_token + '\\n' }}}}"
        "{%- else -%}"
        "{{ raise_exception('unknown role ' + message['role'] + "
        "': expected system, user/human or bot/assistant/gpt') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {bot_m} }}}}{{%- endif -%}}"
    )


def saved_role_markers(*dirs) -> tuple[dict, str | None]:
    """The role markers a model was trained with: the first of `dirs` holding an mftcore_config.json
    (written by `train` and `merge`) wins; else MFTCoder's defaults. Returns (markers, that file or None)."""
    for d in dirs:
        path = os.path.join(d, CONFIG_FILE) if d else None
        if path and os.path.isfile(path):
            return {**DEFAULT_ROLE_MARKERS, **(read_json_object(path).get("role_markers") or {})}, path
    return dict(DEFAULT_ROLE_MARKERS), None


# --- chat_template "model": the tokenizer's own template (mftcore/data/template.py renders with it) ---

def saved_chat_format(*dirs) -> tuple[str, dict, str | None]:
    """(chat_template, role markers, the config file read) of a trained or merged model: "model" when it
    was trained in the tokenizer's own template, else "mftcoder" with its role markers."""
    markers, path = saved_role_markers(*dirs)
    fmt = (read_json_object(path).get("chat_template") if path else None) or "mftcoder"
    return fmt, markers, path


def set_training_template(tokenizer, chat_format: str | None, markers: dict) -> None:
    """The template saved with a model renders what it was trained on: MFTCoder's string from its role
    markers, or (chat_template "model") the tokenizer's own, left as it is."""
    if chat_format != "model":
        tokenizer.chat_template = build_chat_template(markers)


def stop_token_ids(tokenizer, chat_format: str | None) -> list:
    """EOS, and with the model's own template its end-of-turn tokens (e.g. <|im_end|>, <|eot_id|>)."""
    ids = [tokenizer.eos_token_id]
    if chat_format == "model":
        from mftcore.data.template import ChatTemplate

        for token in ChatTemplate(tokenizer).end_of_turn_tokens():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    return ids


def set_stop_tokens(model, tokenizer, chat_format: str | None) -> None:
    """generation_config.eos_token_id of the saved model: plain `model.generate` stops where training ended
    each turn (the tokenizer's EOS, and the template's end-of-turn ids; transformers reads a list). A model
    built from a config alone would otherwise keep its architecture's default id."""
    config = getattr(model, "generation_config", None)
    ids = stop_token_ids(tokenizer, chat_format)
    if config is not None:
        config.eos_token_id = ids if len(ids) > 1 else ids[0]
