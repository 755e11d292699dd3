"""Training strings and loss masks, against hand-written expectations (MFTCoder's rules)."""

import pytest

from mftcore.config import DEFAULT_ROLE_MARKERS as M
from mftcore.data.render import RenderError, Segment, fmt, render_prompt, render_record, tokenize_segments


def test_fmt_replaces_narrow_spaces_and_appends_newline():
    assert fmt("a\u202fb\xa0c") == "a b c\n"


def test_chatml_system_and_two_rounds():
    record = {"chat_rounds": [
        {"role": "system", "content": "Be brief."},
        {"role": "human", "content": "Hi"},
        {"role": "bot", "content": "Hello"},
        {"role": "user", "content": "Sort [2,1]"},
        {"role": "assistant", "content": "[1, 2]"},
    ]}
    assert render_record(record, M) == [
        Segment("<s>system\nBe brief.\n", False),
        Segment("<s>human\nHi\n<s>bot\n", False),
        Segment("Hello\n", True, eos=True),
        Segment("\n", False),
        Segment("<s>human\nSort [2,1]\n<s>bot\n", False),
        Segment("[1, 2]\n", True, eos=True),
        Segment("\n", False),
    ]


def test_gpt_alias_and_custom_markers():
    markers = {"system": "### S:\n", "user": "### I:\n", "assistant": "### R:\n"}
    segs = render_record({"chat_rounds": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}, markers)
    assert [s.text for s in segs] == ["### I:\nq\n### R:\n", "a\n", "\n"]


@pytest.mark.parametrize("rounds, message", [
    ([{"role": "bot", "content": "a"}], "alternate"),
    ([{"role": "human", "content": "q"}, {"role": "human", "content": "q"}], "alternate"),
    ([{"role": "human", "content": "q"}, {"role": "robot", "content": "a"}], "unknown role"),
    ([{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}, {"role": "system", "content": "s"}],
     "alternate"),
    ([{"role": "human"}], "'role' and 'content'"),
])
def test_bad_chatml_is_rejected(rounds, message):
    with pytest.raises(RenderError, match=message):
        render_record({"chat_rounds": rounds}, M)


def test_unknown_shape_is_rejected():
    with pytest.raises(RenderError, match="no known shape"):
        render_record({"foo": 1}, M)


def test_tokenized_ids_and_mask(tokenizer):
    """Each segment tokenized alone, EOS appended as an id to bot turns, mask 1 exactly there."""
    eos = tokenizer.eos_token_id
    segs = render_record({"chat_rounds": [{"role": "human", "content": "Hi"}, {"role": "bot", "content": "ls"}]}, M)
    ids, mask = tokenize_segments(segs, tokenizer, eos)
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    prompt, answer, newline = enc("<s>human\nHi\n<s>bot\n"), enc("ls\n"), enc("\n")
    assert ids == prompt + answer + [eos] + newline
    assert mask == [0] * len(prompt) + [1] * (len(answer) + 1) + [0] * len(newline)
    assert tokenizer.decode(ids) == "<s>human\nHi\n<s>bot\nls\n<|endoftext|>\n"


def test_inference_prompt_matches_training_prefix():
    assert render_prompt("write quicksort", M) == "<s>human\nwrite quicksort\n<s>bot\n"
    assert render_prompt("q", M, system="s") == "<s>system\ns\n<s>human\nq\n<s>bot\n"
