"""The decoder on packed rows: the block-diagonal mask of the stock backends, and attention that stays inside
each document (the same per-document loss as padding, through a tiny HF Llama)."""

import numpy as np
import pytest
import torch

from mftcore.data import IGNORE_INDEX, Sample, collate_packed, collate_padded
from mftcore.model.decoder import hidden_states, packed_attention_mask
from tests.helpers.paths import TINY_MODEL

X = IGNORE_INDEX


def test_block_diagonal_mask_from_cu_seqlens():
    a, b = Sample([1, 2, 3], [0, 1, 1], 0), Sample([4, 5], [0, 1], 0)
    batch = collate_packed([[a, b], [b]], pad_id=0)
    mask = packed_attention_mask(batch, "sdpa", torch.float32)
    T, F = True, False
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [[T, F, F, F, F], [T, T, F, F, F], [T, T, T, F, F], [F, F, F, T, F],
                                   [F, F, F, T, T]]
    assert mask[1, 0].tolist() == [[T, F, F, F, F], [T, T, F, F, F], [F, F, T, F, F], [F, F, T, T, F],
                                   [F, F, T, T, T]]  # the padding run attends only to itself
    eager = packed_attention_mask(batch, "eager", torch.float16)
    assert eager.dtype == torch.float16 and torch.equal(eager == 0, mask)
    assert packed_attention_mask(batch, "mftcore_varlen", torch.float32) is None  # varlen needs none


def token_losses(model, batch):
    """Cross-entropy of every position [B, L] (0 where there is no target)."""
    with torch.no_grad():
        logits = model.lm_head(hidden_states(model, batch)).float()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten().clamp(min=0),
                                           reduction="none").view(batch.labels.shape)
    return torch.where(batch.labels != X, ce, 0.0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_give_the_same_per_document_loss(attn):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    spec = {k: v for k, v in TINY_MODEL.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=97, **spec),
                                             attn_implementation=attn).eval()
    rng = np.random.default_rng(0)
    docs = []
    for i, n in enumerate([7, 12, 3, 20, 9, 15, 1, 11]):
        mask = (rng.random(n) < 0.7).astype(int)
        docs.append(Sample(rng.integers(1, 97, n).tolist(), mask.tolist(), task_id=i % 3))
    padded = collate_padded(docs, pad_id=0)
    rows = [[0, 1, 2], [3, 4], [5, 6, 7]]
    packed = collate_packed([[docs[i] for i in row] for row in rows], pad_id=0)

    pad_loss, pack_loss = token_losses(model, padded), token_losses(model, packed)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(docs[i].input_ids)
            torch.testing.assert_close(pack_loss[r, start:start + n], pad_loss[i, :n], rtol=1e-5, atol=1e-5)
            start += n
    # control: the same packed rows with one causal attention over the whole row do leak between documents
    leaky = collate_packed([[docs[i] for i in row] for row in rows], pad_id=0)
    leaky.attention_mask = torch.ones_like(leaky.input_ids)
    assert not torch.allclose(token_losses(model, leaky)[0, 7:19], pad_loss[1, :12], atol=1e-4)
