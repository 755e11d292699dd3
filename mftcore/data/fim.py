"""Fill-in-the-middle (FIM) for plain-code samples (`text` records), at tokenization time.

With probability `fim_rate` a document (MFTCoder's `text` rendering: the text and "\\n", then EOS) is cut at
two character positions drawn uniformly in [0, len] into prefix, middle and suffix, and rearranged with
the tokenizer's FIM tokens (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
Middle"; the bigcode-Megatron layout):
    PSM  <PRE> prefix <SUF> suffix <MID> middle <EOS>
    SPM  <PRE> <SUF> suffix <MID> prefix middle <EOS>       (with probability fim_spm_rate; StarCoder's variant)
Each piece is tokenized on its own (the cut never merges tokens across it); the FIM tokens go in as ids.
The loss is on the middle and EOS only: what the model must write when it fills a hole. The draws come
from a hash of (seed, task, line, text), so a cache build is the same on any number of workers, and the
result is cached like every other sample (seed and rates are part of the cache key).

FIM tokens (prefix, suffix, middle): `fim_tokens` from the config, else the model family's spellings
below, else the first set of known spellings that the vocabulary holds; none: a one-line error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mftcore.data.render import Segment, fmt
from mftcore.errors import ConfigError

STARCODER = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
QWEN = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
DEEPSEEK = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
CODE_LLAMA = ("▁<PRE>", "▁<SUF>", "▁<MID>")
# model_type (MFTCoder's names, as mftcore/model/families.py) -> its FIM tokens (prefix, suffix, middle).
FAMILY_FIM = {"starcoder": STARCODER, "gpt_bigcode": STARCODER, "starcoder2": STARCODER, "qwen2": QWEN,
              "deepseek": DEEPSEEK, "code_llama": CODE_LLAMA}
KNOWN = (STARCODER, QWEN, DEEPSEEK, CODE_LLAMA)


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int
    texts: tuple  # their spellings, for display


def token_id(tokenizer, text: str):
    vocab = tokenizer.get_vocab()
    return vocab.get(text)


def resolve_fim_tokens(tokenizer, model_type, configured=None) -> FimTokens:
    """The FIM token ids for this tokenizer: configured, else the family's, else known spellings."""
    if configured is not None:
        ids = [token_id(tokenizer, t) for t in configured]
        missing = [t for t, i in zip(configured, ids) if i is None]
        if missing:
            raise ConfigError(f"fim_tokens: {', '.join(map(repr, missing))} not in the tokenizer's vocabulary")
        return FimTokens(*ids, tuple(configured))
    family = FAMILY_FIM.get((model_type or "").lower())
    for spelling in ((family,) if family else ()) + KNOWN:
        ids = [token_id(tokenizer, t) for t in spelling]
        if all(i is not None for i in ids):
            return FimTokens(*ids, spelling)
    raise ConfigError("fim_rate: the tokenizer has no fill-in-the-middle tokens (none of "
                      + "; ".join("/".join(k) for k in KNOWN) + "): set fim_tokens to its [prefix, suffix, middle]")


def draws(seed: int, task: int, line: int, text: str) -> tuple:
    """Four uniforms in [0, 1) from the sample's identity: apply?, SPM?, and the two cut points."""
    h = hashlib.blake2b(f"{seed}\0{task}\0{line}\0".encode() + text.encode("utf-8", "surrogatepass"),
                        digest_size=32).digest()
    return tuple(int.from_bytes(h[8 * k:8 * k + 8], "little") / 2 ** 64 for k in range(4))


def fim_segments(text: str, tokens: FimTokens, rate: float, spm_rate: float, seed: int, task: int, line: int):
    """The segments of one `text` record: FIM-rearranged with probability `rate`, else None (the record
    keeps MFTCoder's text rendering)."""
    doc = fmt(text)
    u_apply, u_spm, u_a, u_b = draws(seed, task, line, doc)
    if u_apply >= rate:
        return None
    a, b = sorted((int(u_a * (len(doc) + 1)), int(u_b * (len(doc) + 1))))
    prefix, middle, suffix = doc[:a], doc[a:b], doc[b:]
    pre, suf, mid = (Segment(t, False, token=i) for t, i in zip(tokens.texts, (tokens.prefix, tokens.suffix,
                                                                                 tokens.middle)))
    if u_spm < spm_rate:
        return [pre, suf, Segment(suffix, False), mid, Segment(prefix, False), Segment(middle, True, eos=True)]
    return [pre, Segment(prefix, False), suf, Segment(suffix, False), mid, Segment(middle, True, eos=True)]
