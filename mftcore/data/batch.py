"""The Batch of DESIGN.md, and the padding collator that builds it.

Every attention backend and every loss reads only this. A padded batch holds one document per row,
right-padded to the longest row (MFTCoder's dynamic padding). cu_seqlens covers the flattened B*L
tokens: each document is one segment and each run of padding is a segment of its own, so a varlen
kernel can run on the flat tensor while no real token ever attends to or from padding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64, next token within the document, IGNORE_INDEX = no loss
    task_ids: torch.Tensor  # [B, L] int64, -1 on padding
    position_ids: torch.Tensor  # [B, L] int64, restart at 0 at each document
    cu_seqlens: torch.Tensor  # [S+1] int32 over the flattened B*L tokens
    max_seqlen: int  # longest segment, a host int so no kernel launch needs a sync
    attention_mask: Optional[torch.Tensor] = None  # [B, L], 1 = real token; padded batches only

    def to(self, device) -> "Batch":
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        return Batch(**moved)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens. Syncs when the batch is on a GPU: call it before moving."""
        return int((self.task_ids >= 0).sum())


def shift_labels(ids: list[int], mask: list[int]) -> list[int]:
    """labels[j] = ids[j+1] where token j+1 is a target, else IGNORE_INDEX; the last token has none."""
    out = [ids[j + 1] if mask[j + 1] else IGNORE_INDEX for j in range(len(ids) - 1)]
    return out + [IGNORE_INDEX] if ids else out


def collate_padded(samples, pad_id: int) -> Batch:
    """samples: objects with input_ids, loss_mask (lists aligned) and task_id. One per row."""
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    B = len(samples)
    L = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    task_ids = torch.full((B, L), -1, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    seglens = []
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[b, :n] = torch.as_tensor(s.input_ids, dtype=torch.long)
        labels[b, :n] = torch.as_tensor(shift_labels(list(s.input_ids), list(s.loss_mask)), dtype=torch.long)
        task_ids[b, :n] = s.task_id
        position_ids[b, :n] = torch.arange(n)
        attention_mask[b, :n] = 1
        seglens.append(n)
        if n < L:
            seglens.append(L - n)
    cu = torch.zeros(len(seglens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seglens, dtype=torch.int32), 0)
    return Batch(input_ids, labels, task_ids, position_ids, cu, max(seglens), attention_mask)
