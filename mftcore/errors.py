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
    """SIGTERM: the run saved a checkpoint at the end of the current step and stopped."""

    exit_code = 143  # 128 + SIGTERM, what a scheduler expects of a terminated job


class SandboxError(MftcoreError):
    """The code-execution sandbox cannot run here as asked (bad limits, a restriction that failed to apply)."""
