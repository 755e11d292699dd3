"""Packed rows on the stock sdpa/eager backends keep the model's sliding windows (mftcore/model/decoder.py
`packed_attention_mask`): a packed row equals each document run alone with HF's own masks, for windows
shorter than the documents, and a windowed family whose mask layout we do not know is a ConfigError."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mftcore.data import Sample, collate_packed
from mftcore.errors import ConfigError
from mftcore.model import decoder as decoder_module
from mftcore.model.decoder import decoder, hidden_states, packed_attention_mask
from tests.model.test_attention import VOCAB, WINDOWED, packed_batch

# Gemma2 has no sdpa in transformers ("_supports_sdpa = False"): eager only, and sdpa is refused at load.
CASES = [("mistral", "sdpa"), ("mistral", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager"), ("starcoder2", "sdpa"),
         ("gemma2", "eager")]


def make_model(family, attn):
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    config = AutoConfig.for_model(family, **{**sizes, **WINDOWED[family]})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("family, attn", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_packed_row_keeps_the_window_of_each_layer(family, attn, monkeypatch):
    """Windows of 4 tokens (the current one counted), documents of 9/1/17/5: the packed row (run_decoder's
    mask) equals each document alone (HF's own sliding masks), in outputs and parameter gradients."""
    model = make_model(family, attn)
    assert model.config._attn_implementation == attn and model.config.sliding_window == 4
    if family in ("qwen2", "gemma2"):  # mixed layers: the dict of masks, one per layer type
        assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    torch.manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,)) for n in (9, 1, 17, 5)]
    params = list(model.parameters())
    packed = model.lm_head(hidden_states(model, packed_batch(docs)))[0]
    probe = torch.randn_like(packed)
    start = 0
    for i, doc in enumerate(docs):
        part = slice(start, start + len(doc))
        alone = model.lm_head(decoder(model)(input_ids=doc[None]).last_hidden_state)[0]
        torch.testing.assert_close(packed[part], alone, atol=1e-5, rtol=1e-5, msg=lambda m: f"doc {i}: {m}")
        g_packed = torch.autograd.grad((packed[part] * probe[part]).sum(), params, retain_graph=True,
                                       allow_unused=True)
        g_alone = torch.autograd.grad((alone * probe[part]).sum(), params, allow_unused=True)
        for a, b in zip(g_packed, g_alone):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"doc {i} grad: {m}")
        start += len(doc)
    # control: the window binds (the 17-token document differs under the unwindowed block-diagonal mask)
    plain = SimpleNamespace(model_type=model.config.model_type, sliding_window=None, num_hidden_layers=3)
    monkeypatch.setattr(decoder_module, "packed_attention_mask", lambda b, a, d, c: packed_attention_mask(b, a, d, plain))
    unwindowed = model.lm_head(hidden_states(model, packed_batch(docs)))[0]
    assert not torch.allclose(unwindowed[10:27], packed[10:27].detach(), atol=1e-4)


def test_gemma2_refuses_sdpa_in_transformers():
    """Why CASES has no gemma2-sdpa (and load.resolve_attn_implementation picks eager for it)."""
    with pytest.raises(ValueError, match="does not support .*scaled_dot_product_attention"):
        make_model("gemma2", "sdpa")


def test_windowed_mask_layout():
    a, b = Sample([1, 2, 3, 4], [0, 1, 1, 1], 0), Sample([5, 6, 7], [0, 1, 1], 0)
    batch = collate_packed([[a, b]], pad_id=0)
    T, F = True, False
    mistral = SimpleNamespace(model_type="mistral", sliding_window=2, num_hidden_layers=2)  # the current token and one before
    mask = packed_attention_mask(batch, "sdpa", torch.float32, mistral)
    assert mask[0, 0].tolist() == [[T, F, F, F, F, F, F], [T, T, F, F, F, F, F], [F, T, T, F, F, F, F],
                                   [F, F, T, T, F, F, F], [F, F, F, F, T, F, F], [F, F, F, F, T, T, F],
                                   [F, F, F, F, F, T, T]]
    qwen2 = SimpleNamespace(model_type="qwen2", sliding_window=2, num_hidden_layers=3,
                            layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    masks = packed_attention_mask(batch, "eager", torch.float16, qwen2)
    assert list(masks) == ["full_attention", "sliding_attention"]
    assert torch.equal(masks["sliding_attention"] == 0, mask)
    assert torch.equal(masks["full_attention"] == 0, packed_attention_mask(batch, "sdpa", torch.float32))
    assert packed_attention_mask(batch, "mftcore_varlen", torch.float32, mistral) is None


def test_a_windowed_family_of_unknown_mask_layout_is_a_config_error():
    phi3 = SimpleNamespace(model_type="phi3", sliding_window=8, num_hidden_layers=2)
    batch = collate_packed([[Sample([1, 2], [0, 1], 0)]], pad_id=0)
    with pytest.raises(ConfigError, match="^attn_implementation: sdpa cannot keep packed rows of a phi3 model "
                                          "inside its sliding_window=8; use mftcore_varlen"):
        packed_attention_mask(batch, "sdpa", torch.float32, phi3)
    # and at load, before any weights (packed rows only: padded rows take HF's own masks)
    from mftcore.config import TrainConfig
    from mftcore.model.load import load_model

    spec = {"model_type": "phi3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "sliding_window": 8, "pad_token_id": 0}
    base = {"data_paths": ["a"], "tokenizer_path": "t", "model_config": spec, "attn_implementation": "eager"}
    with pytest.raises(ConfigError, match="^attn_implementation: eager cannot keep packed rows of a phi3"):
        load_model(TrainConfig.from_dict({**base, "padding_mode": "pack"}), vocab_size=64)
    assert load_model(TrainConfig.from_dict(base), vocab_size=64).config.sliding_window == 8
    # no window: the plain block-diagonal mask, whatever the family
    assert packed_attention_mask(batch, "sdpa", torch.float32, SimpleNamespace(model_type="phi3", sliding_window=None,
                                                                                  num_hidden_layers=2)
                                 ).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("family", decoder_module.ONE_WINDOW_FAMILIES + decoder_module.LAYER_TYPE_FAMILIES)
def test_family_lists_match_the_installed_transformers(family):
    """Each family's decoder, as transformers writes it: one mask for all layers, or a dict by layer type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(family))]
    source = inspect.getsource(inspect.getmodule(cls))
    takes_dict = "isinstance(causal_mask_mapping := attention_mask, dict)" in source
    assert "create_sliding_window_causal_mask" in source
    assert takes_dict == (family in decoder_module.LAYER_TYPE_FAMILIES)
    if not takes_dict:  # every layer takes config.sliding_window
        assert 'sliding_window=getattr(self.config, "sliding_window", None)' in source


@pytest.mark.parametrize("family, padded, packed", [("gemma2", "eager", "mftcore_varlen"),
                                                    ("cohere", "sdpa", "mftcore_varlen"),
                                                    ("llama", "sdpa", "mftcore_varlen")])
def test_default_attention_is_one_the_family_runs(family, padded, packed):
    """attn_implementation null/auto: padded rows take sdpa where transformers has it for the family, else eager
    (Gemma2); packed rows mftcore_varlen. load_model resolves it from the model's config."""
    from mftcore.config import TrainConfig
    from mftcore.model.load import load_model, resolve_attn_implementation
    from tests.helpers.tiny_models import TINY_CONFIGS

    config = AutoConfig.for_model(family)
    for auto in (None, "auto"):
        assert resolve_attn_implementation(auto, "padding", config) == padded
        assert resolve_attn_implementation(auto, "pack", config) == packed
    assert resolve_attn_implementation("sdpa", "padding", config) == "sdpa"  # what the user wrote stays
    cfg = TrainConfig.from_dict({"data_paths": ["a"], "tokenizer_path": "t", "model_config": TINY_CONFIGS[family]})
    assert load_model(cfg, vocab_size=64).config._attn_implementation == padded
