"""Run untrusted Python (a model's completion and its tests) confined: `run_program` for one,
`SandboxPool` for many. executor.py is the harness side; supervisor.py, runner.py and confine.py run
inside the sandbox's own interpreter and use the standard library only."""

from mftcore.sandbox.executor import Limits, Outcome, SandboxPool, check_platform, run_program

__all__ = ["Limits", "Outcome", "SandboxPool", "check_platform", "run_program"]
