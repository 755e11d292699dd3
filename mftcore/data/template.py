"""`chat_template: "model"`: each conversation rendered by the tokenizer's own chat template, trained on the
assistant turns and the template's end-of-turn token(s).

Rendering is transformers' own (`render_jinja_template`, what `apply_chat_template` calls), so the text is
exactly what `tokenizer.apply_chat_template(messages, tokenize=False)` gives. The trained character spans:
- a template with `{% generation %}` markers: the spans it marks, as rendered;
- otherwise, successive prefixes: assistant turn i's span is
  render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True), i.e. everything the model
  has to write after the generation prompt (the content, and the template's end-of-turn token). Whitespace
  that the template puts after the turn's last special token (ChatML's "\\n" after `<|im_end|>`) separates
  turns and is not trained. This needs the template to be prefix-consistent: each prefix (with its
  generation prompt) renders as the start of the whole conversation.
- The documented rule for a template that is not (one that strips earlier turns' reasoning, or moves the
  system prompt to the last user turn): the conversation becomes one sample per assistant turn, each
  rendered up to that turn and trained on that turn only (exactly what the model sees at inference, when
  that turn is the one it writes). If even that fails, the record is an error naming the template's
  behaviour.
The whole text is then tokenized in one piece (special tokens as the template wrote them, no others added,
as apply_chat_template tokenizes), and a token is trained when it overlaps a trained span (as transformers
builds its assistant mask), from offsets without whitespace trimming.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mftcore.data.render import BOT_ROLES, USER_ROLES, RenderError, content_of, encode_texts, plain_fast_tokenizer

ROLES = {**{r: "user" for r in USER_ROLES}, **{r: "assistant" for r in BOT_ROLES}, "system": "system"}
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclass(frozen=True)
class TemplateText:
    """One sample: the rendered text and its trained [start, end) character spans, in order."""

    text: str
    spans: tuple


class ChatTemplate:
    """The tokenizer's template with what rendering needs: the special-token variables it reads
    (bos_token, eos_token, ...) and the special tokens' texts (for the end of a trained span)."""

    def __init__(self, tokenizer, template: str | None = None):
        template = template or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if not isinstance(template, str) or not template.strip():
            raise RenderError("chat_template \"model\": the tokenizer has no chat template "
                              "(its tokenizer_config.json has no \"chat_template\", nor is there chat_template.jinja)")
        self.template = template
        self.markers = bool(GENERATION_MARKER.search(template))
        self.variables = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        specials = {str(t) for t in tokenizer.all_special_tokens}
        specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)

    def render(self, messages: list, generation_prompt: bool = False, track: bool = False):
        """The rendered text (and, with track, the generation-marked spans)."""
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, indices = render_jinja_template(conversations=[messages], chat_template=self.template,
                                                   add_generation_prompt=generation_prompt,
                                                   return_assistant_tokens_mask=track, **self.variables)
        except (jinja2.TemplateError, TypeError, ValueError, IndexError, KeyError) as e:
            raise RenderError(f"the chat template failed on this conversation: {e}") from None
        return (texts[0], tuple(indices[0])) if track else texts[0]

    def end_of_turn(self, text: str, start: int, end: int) -> int:
        """`end`, or the end of the span's last special token when only whitespace follows it."""
        best = -1
        for s in self.specials:
            k = text.rfind(s, start, end)
            if k >= 0 and k + len(s) > best:
                best = k + len(s)
        return best if best > 0 and not text[best:end].strip() else end

    def samples(self, messages: list) -> list:
        """The TemplateText samples of one conversation (one, unless the template is not prefix-consistent)."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise RenderError("the conversation has no assistant turn to train on")
        if self.markers:
            text, spans = self.render(messages, track=True)
            spans = tuple(s for s in spans if s[1] > s[0])
            if not spans:
                raise RenderError("the chat template's {% generation %} blocks mark nothing in this conversation")
            return [TemplateText(text, spans)]
        full = self.render(messages)
        spans = []
        for i in turns:
            before, after = self.render(messages[:i], generation_prompt=True), self.render(messages[:i + 1])
            if not (after.startswith(before) and full.startswith(after)):
                return self.split_per_turn(messages, turns)
            spans.append((len(before), self.end_of_turn(after, len(before), len(after))))
        return [TemplateText(full, tuple(spans))]

    def split_per_turn(self, messages: list, turns: list) -> list:
        out = []
        for i in turns:
            before, after = self.render(messages[:i], generation_prompt=True), self.render(messages[:i + 1])
            if not after.startswith(before):
                raise RenderError(f"the chat template is not prefix-consistent: adding assistant turn {i} changes "
                                  "how the turns before it render (with the generation prompt), so its trained "
                                  "span cannot be told apart")
            out.append(TemplateText(after, ((len(before), self.end_of_turn(after, len(before), len(after))),)))
        return out

    def end_of_turn_tokens(self) -> list:
        """The special tokens that end an assistant turn (generation stops at them): those inside the
        trained span of a one-turn probe conversation."""
        sample = self.samples(PROBE)[0]
        text = "".join(sample.text[a:b] for a, b in sample.spans)
        return [s for s in self.specials if s in text]


def to_messages(rounds: list) -> list:
    """chat_rounds (MFTCoder's roles too) -> the template's messages: roles system/user/assistant."""
    messages = []
    for i, r in enumerate(rounds):
        if not isinstance(r, dict) or "role" not in r or "content" not in r:
            raise RenderError(f"chat_rounds[{i}] needs 'role' and 'content'")
        role = ROLES.get(r["role"]) if isinstance(r["role"], str) else None
        if role is None:
            raise RenderError(f"chat_rounds[{i}]: unknown role {r['role']!r} "
                              "(expected system, human/user or bot/assistant/gpt)")
        messages.append({"role": role, "content": content_of(r["content"], f"chat_rounds[{i}].content")})
    return messages


def record_messages(record: dict, shape) -> list:
    """A chat record (chat_rounds, or a single-turn pair with optional system) as template messages."""
    if shape == "chatml":
        return to_messages(record["chat_rounds"])
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise RenderError(f"system must be a string, got {type(system).__name__}")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": content_of(record[shape[0]], shape[0])},
                   {"role": "assistant", "content": content_of(record[shape[1]], shape[1])}]


# --- tokenizing whole texts: ids, and the mask from the trained spans -----------------------------
_BACKENDS = {}


def offsets_backend(tokenizer):
    """The tokenizer's Rust backend without its post-processor: the same ids (we never add special
    tokens here), and offsets that no ByteLevel trim_offsets has shrunk (a trimmed whitespace token has an
    empty span, which would leave code indentation out of the mask)."""
    key = id(tokenizer)
    if key not in _BACKENDS:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.post_processor = None
        backend.no_truncation()
        backend.no_padding()
        _BACKENDS[key] = (tokenizer, backend)  # the tokenizer is kept so that its id is never reused
    return _BACKENDS[key][1]


def span_mask(offsets, spans) -> list:
    """1 for each token whose [start, end) overlaps a span (spans and offsets both in order)."""
    mask, k = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = 1
    return mask


def tokenize_template_texts(tokenizer, samples: list) -> list:
    """[(ids, mask)] of TemplateText samples, in one batched call. Without a Rust backend (no offsets),
    the documented fallback: the text split at the span boundaries, each piece tokenized on its own."""
    if not samples:
        return []
    if plain_fast_tokenizer(tokenizer):
        encodings = offsets_backend(tokenizer).encode_batch([s.text for s in samples], add_special_tokens=False)
        return [(e.ids, span_mask(e.offsets, s.spans)) for e, s in zip(encodings, samples)]
    out = []
    for s in samples:
        cuts = sorted({0, len(s.text), *(x for span in s.spans for x in span)})
        pieces = [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        ids, mask = [], []
        for (a, b), piece in zip(pieces, encode_texts(tokenizer, [s.text[a:b] for a, b in pieces])):
            trained = any(x <= a and b <= y for x, y in s.spans)
            ids += piece
            mask += [int(trained)] * len(piece)
        out.append((ids, mask))
    return out


def generation_prompt_ids(tokenizer, messages: list) -> list:
    """Token ids of a conversation ending with a user turn, with the generation prompt: the prefix that
    training tokenized the same way (whole text, no special tokens added)."""
    text = ChatTemplate(tokenizer).render(messages, generation_prompt=True)
    return tokenize_template_texts(tokenizer, [TemplateText(text, ())])[0][0]
