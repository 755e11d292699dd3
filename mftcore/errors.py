"""User-facing errors. The CLI prints their message as one line and exits 2 (a traceback only with --debug)."""

from __future__ import annotations


class MftcoreError(Exception):
    """A user mistake (config, data, paths): the message says where, as file:line or the config key."""

    exit_code = 2


class ConfigError(MftcoreError):
    """A bad config file, key or value."""


class DataError(MftcoreError):
    """Bad training data: a missing path, a malformed line, a record of unknown shape."""


class TrainingError(MftcoreError):
    """The run stopped itself (e.g. too many non-finite steps in a row) after saving a checkpoint."""

    exit_code = 1


class TrainingInterrupted(MftcoreError):
    """SIGTERM or Ctrl-C: the run saved a checkpoint at the end of the current step and stopped."""

    exit_code = 143  # 128 + SIGTERM, what a scheduler expects of a terminated job; 130 for Ctrl-C (SIGINT)

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.exit_code = 128 + signum


class Interrupted(MftcoreError):
    """SIGTERM or Ctrl-C outside the training loop (tokenizing, loading, saving): what was being written
    is removed, nothing half-written stays; exit code 128 + the signal, as a shell reports it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class SandboxError(MftcoreError):
    """The code-execution sandbox cannot run here as asked (bad limits, a restriction that failed to apply)."""
