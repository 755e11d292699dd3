"""The tokenizer worker processes (mftcore/data/workers.py): the same chunks as encoding in this process,
in job order; a worker that dies is one DataError line, not a wait forever; stopping early or on an
error leaves no process behind."""

import json
import os
import signal

import numpy as np
import pytest

from mftcore.data.cache import encoded_chunks
from mftcore.data.encode import EncodeSpec, encode_lines
from mftcore.data.render import DEFAULT_ROLE_MARKERS
from mftcore.data.workers import EncoderProcesses
from mftcore.errors import DataError


def jobs(n=7):
    """((lines, first_line, task), tag) jobs of different sizes, so that workers finish out of order."""
    out = []
    for k in range(n):
        rounds = [{"role": "human", "content": f"question {k} " * (1 + 5 * (k % 3))},
                  {"role": "bot", "content": f"answer {k}"}]
        out.append((([(json.dumps({"chat_rounds": rounds}) + "\n").encode()] * (1 + k), 1 + 10 * k, 0), f"tag{k}"))
    return out


def spec(tokenizer):
    return EncodeSpec(dict(DEFAULT_ROLE_MARKERS), tokenizer.eos_token_id, 256)


def test_workers_give_the_in_process_chunks_in_job_order(tokenizer):
    s = spec(tokenizer)
    got = list(encoded_chunks(iter(jobs()), tokenizer, s, workers=3))
    assert [tag for _, tag in got] == [tag for _, tag in jobs()]
    for (chunk, _), ((lines, first, task), _) in zip(got, jobs()):
        want = encode_lines(lines, first, tokenizer, s, task)
        assert np.array_equal(chunk.ids, want.ids) and np.array_equal(chunk.mask, want.mask)
        assert np.array_equal(chunk.lines, want.lines) and chunk.loss_tokens == want.loss_tokens > 0


def test_a_worker_killed_mid_build_is_one_error_not_a_hang(tokenizer):
    procs = EncoderProcesses(2, tokenizer, spec(tokenizer))
    os.kill(procs.procs[1].pid, signal.SIGKILL)  # what the OOM killer does
    with pytest.raises(DataError, match="tokenizer worker died.*exit code -9"):
        for _ in procs.map_ordered(iter(jobs())):
            pass
    procs.kill()
    assert all(p.exitcode is not None for p in procs.procs)


def test_stopping_early_leaves_no_worker(tokenizer):
    chunks = encoded_chunks(iter(jobs()), tokenizer, spec(tokenizer), workers=2)
    next(chunks)
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    assert before, "the workers run while chunks are pending"
    chunks.close()  # the consumer stops (an error in the data, a signal)
    assert not before & {p.pid for p in multiprocessing.active_children()}


def test_a_finished_build_ends_its_workers(tokenizer):
    procs = EncoderProcesses(2, tokenizer, spec(tokenizer))
    assert len(list(procs.map_ordered(iter(jobs(3))))) == 3
    procs.close()
    assert [p.exitcode for p in procs.procs] == [0, 0]
