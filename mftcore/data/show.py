"""`mftcore prepare --show N`: the first N cached samples as the model sees them, with the trained spans
marked, in every format (MFTCoder's string, the model's chat template, FIM, any source).

Everything comes from the cache, never from the source again: "text" is the decoded token ids (special
tokens written out, nothing cleaned up), "marked" the same text with each run of trained tokens (loss
mask 1) between TRAINED_OPEN and TRAINED_CLOSE, and "input_ids" / "loss_mask" the ids and mask themselves.
"""

from __future__ import annotations

import json

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"  # U+27E6 / U+27E7: next to never in code or chat data


def decode(tokenizer, ids: list) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def marked_text(tokenizer, ids: list, mask: list) -> str:
    """The decoded text with each run of trained tokens between the markers (runs decode on their own, so a
    multi-byte character split across a run boundary shows as U+FFFD there only)."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            text = decode(tokenizer, ids[start:k])
            out.append(TRAINED_OPEN + text + TRAINED_CLOSE if mask[start] else text)
            start = k
    return "".join(out)


def show_samples(store, n: int, tokenizer, valid_indices=()) -> list:
    """The first n samples in data order as JSON lines {"task", "split", "text", "marked", "input_ids",
    "loss_mask"}; "split" is "valid" for the indices of `valid_indices` (data_split's share), else "train"."""
    out, valid = [], {int(i) for i in valid_indices}
    for i in range(min(n, len(store))):
        ids, mask, task_id = store.sample(i)
        ids, mask = ids.tolist(), mask.tolist()
        out.append(json.dumps({"task": store.meta["tasks"][task_id]["name"],
                               "split": "valid" if i in valid else "train", "text": decode(tokenizer, ids),
                               "marked": marked_text(tokenizer, ids, mask), "input_ids": ids, "loss_mask": mask},
                              ensure_ascii=False))
    return out
