"""The Batch of DESIGN.md, and the collators (padded, packed) that build it.

Every attention backend and every loss reads only this. A padded batch holds one document per row,
right-padded to the longest row (MFTCoder's dynamic padding); a packed batch holds several whole
documents per row (padding_mode "pack"), again padded to the longest row. cu_seqlens covers the
flattened B*L tokens: each document is one segment and each run of padding is a segment of its own,
so a varlen kernel can run on the flat tensor while no real token ever attends to or from padding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
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

    def pin_memory(self) -> "Batch":
        """The same batch in page-locked host memory, so that .to(cuda, non_blocking=True) is asynchronous."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() if isinstance(getattr(self, f.name), torch.Tensor)
                        else getattr(self, f.name) for f in fields(self)})

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens. Syncs when the batch is on a GPU: call it before moving."""
        return int((self.task_ids >= 0).sum())

    def sum_squared_doc_lengths(self) -> int:
        """sum over documents of length^2 = sum over real tokens of (2 * position + 1), for the attention
        FLOPs; on the host, before the batch moves."""
        real = self.task_ids >= 0
        return int(((2 * self.position_ids + 1) * real).sum())


def shift_labels(ids, mask) -> list[int]:
    """labels[j] = ids[j+1] where token j+1 is a target, else IGNORE_INDEX; the last token has none."""
    return shifted_labels(np.asarray(ids, dtype=np.int64), np.asarray(mask)).tolist()


def shifted_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    out[:-1] = np.where(np.asarray(mask[1:]) != 0, ids[1:], IGNORE_INDEX)
    return out


def collate_padded(samples, pad_id: int) -> Batch:
    """samples: objects with input_ids, loss_mask (aligned) and task_id. One per row, right-padded."""
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    batch = collate_packed([[s] for s in samples], pad_id)
    batch.attention_mask = (batch.task_ids >= 0).long()
    return batch


def empty_batch(pad_id: int) -> Batch:
    """One padding token and no loss token: the micro-batch (or evaluation batch) of a rank whose share
    came up empty, so that every rank runs the same forwards and backwards (their collectives must
    match) while the loss and the gradients stay exactly those of the real batches. The token is
    attended to (a fully masked row would give NaN activations, and NaN * 0 is not 0)."""
    one = torch.ones(1, 1, dtype=torch.int64)
    return Batch(input_ids=one * pad_id, labels=one * IGNORE_INDEX, task_ids=-one, position_ids=one * 0,
                 cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), max_seqlen=1, attention_mask=one)


def collate_packed(rows, pad_id: int) -> Batch:
    """rows: lists of samples; each row holds its documents back to back, then padding up to the
    longest row. Labels are shifted and positions restart inside each document; a trailing padding
    run is a segment of cu_seqlens of its own. attention_mask is None: attention is given by
    cu_seqlens (or the block-diagonal mask built from it, see mftcore.model)."""
    if not rows or not all(rows):
        raise ValueError("collate_packed needs at least one row, and no empty row")
    docs = [[np.asarray(s.input_ids, dtype=np.int64) for s in row] for row in rows]
    B, L = len(rows), max(sum(len(d) for d in row) for row in docs)
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    task_ids = np.full((B, L), -1, dtype=np.int64)
    position_ids = np.zeros((B, L), dtype=np.int64)
    seglens = []
    for b, (row, row_docs) in enumerate(zip(rows, docs)):
        pos = 0
        for s, ids in zip(row, row_docs):
            n = len(ids)
            input_ids[b, pos:pos + n] = ids
            labels[b, pos:pos + n] = shifted_labels(ids, s.loss_mask)
            task_ids[b, pos:pos + n] = s.task_id
            position_ids[b, pos:pos + n] = np.arange(n)
            seglens.append(n)
            pos += n
        if pos < L:
            seglens.append(L - pos)
    cu = torch.zeros(len(seglens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seglens, dtype=torch.int32), 0)
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(task_ids),
                 torch.from_numpy(position_ids), cu, max(seglens), None)
