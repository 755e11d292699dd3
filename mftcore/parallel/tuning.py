"""Kernel tuning in a run of many ranks: rank 0 measures, every rank uses its choices.

The kernels pick launch configurations by timing them on first use of each key (mftcore/kernels/autotune.py).
Left to themselves, all ranks would time the same keys at once (and could pick differently where two
candidates are close), and a collective inside a kernel could not be matched safely: ranks meet keys in
different orders (padded batches differ per rank, an empty micro-batch runs no kernel). So before the
first step every rank calls `share_kernel_tuning`: rank 0 runs one forward and backward of each op at the
run's shapes on random data (`tune_shapes`), the records are broadcast, and every rank installs them with
on_miss="nearest", so a key met later (a shorter padded batch) takes the nearest tuned key's choice on
every rank alike and nothing measures or communicates inside a step. A single process tunes on first use.
The run's options are part of the keys, so they are part of the shapes too: the fused loss runs with the
head's logit transform (families.loss_options: Gemma2's softcap, Cohere's logit_scale; options have their own
candidates and key), and attention once per distinct (window, softcap) of the model's layers (Gemma2's
attention softcap is in the kernel's key).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from mftcore.kernels import autotune, fused_linear_cross_entropy, varlen_attention
from mftcore.kernels.dispatch import interpreted
from mftcore.model.decoder import layer_windows
from mftcore.model.families import loss_options
from mftcore.parallel.comm import broadcast_object, is_distributed


@dataclass(frozen=True)
class RunShapes:
    """What the kernels will see: tokens per training and evaluation micro-batch, the LM head, attention."""
    train_tokens: int
    eval_tokens: int
    hidden: int
    vocab: int
    bias: bool
    weight_dtype: torch.dtype
    dtype: torch.dtype  # the compute dtype (autocast's)
    varlen: bool  # attention runs mftcore_varlen
    heads: int
    kv_heads: int
    head_dim: int
    seq_length: int
    loss_options: tuple = ()  # sorted (keyword, value) pairs of the fused loss's options (loss_options)
    attention: tuple = (((-1, -1), 0.0),)  # distinct (window_size, softcap) over the layers


def attention_options(config) -> tuple:
    """The distinct (window_size, softcap) the model's layers pass to varlen_attention (as attention.py maps
    HF's window, which counts the current token: (w - 1, w - 1))."""
    windows = layer_windows(config) or [getattr(config, "sliding_window", None)]
    softcap = float(getattr(config, "attn_logit_softcapping", None) or 0.0)
    return tuple(dict.fromkeys(((-1, -1) if w is None else (int(w) - 1, int(w) - 1), softcap) for w in windows))


def run_shapes(cfg, lm, dtype: torch.dtype) -> RunShapes:
    """The shapes of a run from its config and the (unwrapped) HF causal LM."""
    head, conf = lm.get_output_embeddings(), lm.config
    heads = conf.num_attention_heads
    return RunShapes(
        train_tokens=cfg.per_device_train_batch_size * cfg.seq_length,
        eval_tokens=cfg.per_device_eval_batch_size * cfg.seq_length, hidden=head.weight.shape[1],
        vocab=head.weight.shape[0], bias=head.bias is not None, weight_dtype=head.weight.dtype, dtype=dtype,
        varlen=conf._attn_implementation == "mftcore_varlen", heads=heads,
        kv_heads=getattr(conf, "num_key_value_heads", None) or heads,
        head_dim=getattr(conf, "head_dim", None) or conf.hidden_size // heads, seq_length=cfg.seq_length,
        loss_options=tuple(sorted(loss_options(conf).items())), attention=attention_options(conf))


def tune_shapes(shapes: RunShapes, device: torch.device) -> None:
    """One forward and backward of each op at the run's shapes, on random data: each key's first use times
    its candidates (or reads the disk cache). Nothing to tune off CUDA (CPU tensors take the references),
    except in Triton's interpreter with MFTCORE_AUTOTUNE=1 (the tests)."""
    if device.type != "cuda" and not interpreted():
        return
    print("kernel tuning on rank 0 (first run on this GPU: seconds to a minute; cached under "
          f"{autotune.cache_root()})", file=sys.stderr, flush=True)
    g = torch.Generator(device).manual_seed(0)  # on the device: no host-to-device copy of random data
    H, V = shapes.hidden, shapes.vocab
    weight = (torch.randn(V, H, generator=g, device=device) / H ** 0.5).to(shapes.weight_dtype).requires_grad_()
    bias = torch.zeros(V, device=device, dtype=shapes.weight_dtype, requires_grad=True) if shapes.bias else None
    for tokens, grad in ((shapes.train_tokens, True), (shapes.eval_tokens, False)):
        hidden = torch.randn(tokens, H, generator=g, device=device).to(shapes.dtype).requires_grad_(grad)
        labels = torch.randint(0, V, (tokens,), generator=g, device=device)
        with torch.set_grad_enabled(grad):
            out = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, num_tasks=1, reduction="sum",
                                             **dict(shapes.loss_options))
            if grad:
                out.loss.backward()
    del weight, bias, hidden
    if shapes.varlen:
        T = shapes.train_tokens
        cu = torch.arange(0, T + 1, shapes.seq_length, dtype=torch.int32, device=device)
        q, k, v = (torch.randn(T, h, shapes.head_dim, generator=g, device=device).to(shapes.dtype).requires_grad_()
                   for h in (shapes.heads, shapes.kv_heads, shapes.kv_heads))
        for window, softcap in shapes.attention:
            o = varlen_attention(q, k, v, cu, shapes.seq_length, causal=True, window_size=window, softcap=softcap)
            o.backward(torch.randn_like(o))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def share_kernel_tuning(env, shapes: RunShapes, tune=tune_shapes) -> int:
    """Every rank of a distributed run calls this before the first step (see the module docstring);
    returns the number of shared records. A single process returns 0 at once: it tunes on first use."""
    if not is_distributed():
        return 0
    if env.rank == 0:
        tune(shapes, env.device)
    table = broadcast_object(autotune.snapshot() if env.rank == 0 else None)
    autotune.install(table, on_miss="nearest")
    return len(table)
