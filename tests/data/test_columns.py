"""Column mapping of the common record shapes onto the ones render.py reads."""

import pytest

from mftcore.data.columns import map_record, record_shape
from mftcore.data.render import DEFAULT_ROLE_MARKERS, RenderError, render_record

TURNS = [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]


@pytest.mark.parametrize("record", [
    {"chat_rounds": TURNS}, {"prompt": "q", "answer": "a", "system": "s"}, {"input": "q", "output": "a"},
    {"text": "code"}, {"question": "q", "response": "a", "extra": 1},
])
def test_mftcoder_shapes_come_back_unchanged(record):
    assert map_record(record) is record  # the same object: its training string is MFTCoder's byte for byte


def test_messages_sharegpt_and_alpaca():
    expected = render_record({"chat_rounds": TURNS}, DEFAULT_ROLE_MARKERS)
    openai = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    for record in (openai, sharegpt):
        assert render_record(map_record(record), DEFAULT_ROLE_MARKERS) == expected
    # alpaca before MFTCoder's input/output pair, which would drop the instruction
    assert map_record({"instruction": "Sort", "input": "[3, 1]", "output": "[1, 3]"}) == {
        "prompt": "Sort\n\n[3, 1]", "answer": "[1, 3]"}
    assert map_record({"instruction": "Sort", "input": " ", "output": "x", "system": "s"}) == {
        "prompt": "Sort", "answer": "x", "system": "s"}
    assert record_shape(["instruction", "input", "output"]) == "alpaca"
    assert record_shape(["foo"]) is None
    with pytest.raises(RenderError, match=r"conversations\[1\] needs 'role' and 'content'"):
        map_record({"conversations": [{"from": "human", "value": "q"}, {"speaker": "gpt"}]})


def test_explicit_columns_read_only_the_mapped_ones():
    record = {"question": "q", "solution": "a", "text": "ignored"}
    assert map_record(record, {"prompt": "question", "answer": "solution"}) == {"prompt": "q", "answer": "a"}
