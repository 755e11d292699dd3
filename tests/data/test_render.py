"""Training strings and loss masks, against hand-written expectations (MFTCoder's rules)."""

import copy

import pytest

from mftcore.data.render import DEFAULT_ROLE_MARKERS as M
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


# --- the single-turn shapes, `text`, and the order MFTCoder tests them in ---

SINGLE_TURN = [("prompt", "answer"), ("prompt", "response"), ("input", "output"), ("instruction", "output"),
               ("instruction", "response"), ("question", "response"), ("question", "answer"), ("query", "answer")]


@pytest.mark.parametrize("prompt_key, answer_key", SINGLE_TURN)
def test_single_turn_shapes(prompt_key, answer_key):
    assert render_record({prompt_key: "List files", answer_key: "ls"}, M) == [
        Segment("<s>human\nList files\n<s>bot\n", False),
        Segment("ls\n", True, eos=True),  # no trailing "\n" segment, unlike chatML
    ]
    with_system = render_record({"system": "Be terse.", prompt_key: "q\u202fx", answer_key: "a\xa0b"}, M)
    assert with_system == [Segment("<s>system\nBe terse.\n<s>human\nq x\n<s>bot\n", False),
                           Segment("a b\n", True, eos=True)]
    # null or "" system: no system block at all (MFTCoder tests the value's truth)
    for system in (None, ""):
        assert render_record({"system": system, prompt_key: "q", answer_key: "a"}, M)[0].text == "<s>human\nq\n<s>bot\n"


def test_shape_precedence_is_mftcoders():
    chat = [{"role": "human", "content": "c"}, {"role": "bot", "content": "d"}]
    # a single-turn pair wins over chat_rounds, which wins over text
    assert render_record({"prompt": "p", "answer": "a", "chat_rounds": chat}, M)[0].text == "<s>human\np\n<s>bot\n"
    assert render_record({"chat_rounds": chat, "text": "t"}, M)[0].text == "<s>human\nc\n<s>bot\n"
    # earlier pairs win: Alpaca's instruction/input/output renders as input/output, as in MFTCoder
    assert render_record({"instruction": "i", "input": "n", "output": "o"}, M)[0].text == "<s>human\nn\n<s>bot\n"
    assert render_record({"prompt": "p", "response": "r", "answer": "a"}, M)[1].text == "a\n"
    # empty chat_rounds falls through to text
    assert render_record({"chat_rounds": [], "text": "t"}, M) == [Segment("t\n", True, eos=True)]


def test_text_trains_on_everything(tokenizer):
    segs = render_record({"text": "def f():\n    return 1"}, M)
    assert segs == [Segment("def f():\n    return 1\n", True, eos=True)]
    ids, mask = tokenize_segments(segs, tokenizer, tokenizer.eos_token_id)
    assert ids[-1] == tokenizer.eos_token_id and mask == [1] * len(ids)


def test_single_turn_ids_and_mask_with_custom_markers(tokenizer):
    markers = {"system": "### S:\n", "user": "### I:\n", "assistant": "### R:\n"}
    eos = tokenizer.eos_token_id
    ids, mask = tokenize_segments(render_record({"system": "s", "question": "q", "answer": "a"}, markers),
                                  tokenizer, eos)
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    prompt, answer = enc("### S:\ns\n### I:\nq\n### R:\n"), enc("a\n")
    assert ids == prompt + answer + [eos]
    assert mask == [0] * len(prompt) + [1] * (len(answer) + 1)


def test_batched_tokenization_equals_one_call_per_segment(tokenizer):
    """encode_texts batches the segments; each must get exactly the ids of its own encode() call."""
    from mftcore.data.render import encode_texts, plain_fast_tokenizer

    texts = ["<s>human\nq\u00e9 \U0001F600\n<s>bot\n", "  def f():\n\treturn 1\n", "\n", "SELECT * FROM t;\n"]
    expected = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert plain_fast_tokenizer(tokenizer) and encode_texts(tokenizer, texts) == expected
    # a backend that truncates by default (as some tokenizer.json files say) must not truncate here
    truncating = copy.deepcopy(tokenizer)
    truncating.backend_tokenizer.enable_truncation(max_length=2)
    assert encode_texts(truncating, texts) == expected


@pytest.mark.parametrize("record, message", [
    ({"prompt": "", "answer": "a"}, "empty content in prompt"),
    ({"prompt": "q", "answer": "  \n"}, "empty content in answer"),
    ({"text": ""}, "empty content in text"),
    ({"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": ""}]},
     r"empty content in chat_rounds\[1\].content"),
    ({"chat_rounds": [{"role": "system", "content": " "}, {"role": "human", "content": "q"}]},
     r"empty content in chat_rounds\[0\].content"),
    ({"prompt": 3, "answer": "a"}, "prompt must be a string"),
    ({"prompt": "q", "answer": "a", "system": ["s"]}, "system must be a string"),
    ({"chat_rounds": [{"role": "human", "content": None}]}, "must be a string"),
    ({"chat_rounds": "hello"}, "chat_rounds must be a non-empty list"),
    ({"chat_rounds": []}, "chat_rounds must be a non-empty list"),
    (["not", "an", "object"], "JSON object"),
])
def test_bad_content_is_rejected(record, message):
    with pytest.raises(RenderError, match=message):
        render_record(record, M)


def test_rendered_text_writes_eos_where_its_id_goes():
    from mftcore.data.render import render_text

    segs = render_record({"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]}, M)
    assert render_text(segs, "</s>") == "<s>human\nq\n<s>bot\na\n</s>\n"
