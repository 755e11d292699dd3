"""Tokenizer worker processes: each has a private pipe to the parent and nothing else shared.

multiprocessing.Pool shares one task queue and its lock among the workers, and Pool.terminate() takes
that lock and then signals the workers: on the loaded 2-core machine a worker that lost the SIGTERM kept
`prepare` waiting forever (seen in tests/faults; reproduced within 150 builds stopped early), and a worker
killed by the OOM killer leaves its job unanswered, so the parent waits forever too. Here every worker
owns its pipe: stopping is SIGKILL (nothing shared can be left locked), a worker that dies is an
EOFError on its pipe (one line), and a worker whose parent died sees EOF and exits.

Job k goes to worker k % n and at most one job is in flight per worker, so neither side can block the
other on a full pipe: the parent only sends to an idle worker (blocked in recv) and only reads from a
worker that is encoding or sending."""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque

from mftcore.data.encode import EncodeSpec, encode_lines, init_worker
from mftcore.errors import DataError


def serve(conn, tokenizer, spec: EncodeSpec) -> None:
    """A worker's life: (lines, first_line, task) jobs in, ("ok", chunk) or ("error", exception) out, until
    None or the parent's end of the pipe closes."""
    init_worker(tokenizer, spec)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if job is None:
            return
        try:
            lines, first_line, *task = job
            reply = ("ok", encode_lines(lines, first_line, tokenizer, spec, *task))
        except Exception as e:  # an error of ours, re-raised in the parent as Pool did
            reply = ("error", e)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


class EncoderProcesses:
    """`n` forked workers; `map_ordered(jobs)` takes ((lines, first_line, task), tag) jobs and yields
    (chunk, tag) in job order; `close()` on success, `kill()` on anything else."""

    def __init__(self, n: int, tokenizer, spec: EncodeSpec):
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        self.procs, self.conns = [], []
        # Born with SIGTERM and SIGINT blocked: a worker forked with the parent's Python handlers, and
        # signalled before init_worker replaced them, would run the parent's handler; init_worker unblocks.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            for _ in range(n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=serve, args=(child, tokenizer, spec), daemon=True)
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
        except BaseException:
            self.kill()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def receive(self, w: int):
        try:
            status, value = self.conns[w].recv()
        except (EOFError, OSError):
            self.procs[w].join(timeout=5)
            raise DataError(f"a tokenizer worker died while encoding (exit code {self.procs[w].exitcode}; "
                            "out of memory?); set tokenize_workers=1 to tokenize in this process") from None
        if status == "error":
            raise value
        return value

    def map_ordered(self, jobs):
        n, pending = len(self.conns), deque()  # (worker, tag) of the jobs in flight, oldest first
        for k, (job, tag) in enumerate(jobs):
            w = k % n
            if len(pending) == n:  # every worker busy: the oldest (worker w) answers first
                done_w, done_tag = pending.popleft()
                yield self.receive(done_w), done_tag
            self.conns[w].send(job)
            pending.append((w, tag))
        while pending:
            done_w, done_tag = pending.popleft()
            yield self.receive(done_w), done_tag

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, conn in zip(self.procs, self.conns):
            proc.join()
            conn.close()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
        for proc, conn in zip(self.procs, self.conns):
            proc.join()
            conn.close()
