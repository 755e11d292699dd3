"""torch.compile applied to an untouched model, as torchtitan does: each decoder layer compiled on its own
(one graph, which every layer of the same structure reuses) and the loss (the LM head and the fused
cross-entropy, with its per-token scales) compiled as one function.

Both kernels are torch.library custom ops with fake implementations (mftcore/kernels), so the graphs hold
them without a break; what inductor fuses is everything around them (norms, rotary embeddings, MLPs, the
loss's scale and count arithmetic). Layers are compiled in place (`nn.Module.compile`), so state-dict
keys, checkpoints and the engines that wrap the model later see the same module tree.
"""

from __future__ import annotations

import torch

from mftcore.kernels import fused_linear_cross_entropy
from mftcore.model.decoder import decoder


def decoder_layers(model) -> list:
    """The decoder's repeated blocks (`layers` in Llama, Qwen, Mistral, DeepSeek; `h` in GPT-2 style)."""
    body = decoder(model)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(body, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return list(blocks)
    raise ValueError(f"torch_compile: no list of decoder layers found in {type(body).__name__}")


def compile_layers(model) -> int:
    """Compile each decoder layer in place; returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def compiled_loss():
    """The fused loss as a compiled function (fullgraph: the op and its scales trace in one graph)."""
    return torch.compile(fused_linear_cross_entropy, fullgraph=True)
