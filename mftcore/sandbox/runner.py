"""Inside the sandbox: run a program, then its tests, and report on the result pipe (standard library only).

What counts as a pass is decided here, and only here: the tests' code ran to its end without raising.
The report is one JSON line carrying the job's nonce, written with functions captured before any
untrusted code ran, and the process ends right after it (os._exit: no atexit handler or lingering
thread can run after the verdict). So a program that exits early, with any status and by any means
(sys.exit, os._exit, a signal), writes no report and has failed; the exit status means nothing.

Hardening against a program that makes its tests pass without solving them:
- the builtins module is put back as it was before the program ran once the program has run, and the
  tests run in their own namespace (a copy of the program's names) with their own pristine copy of
  it: replacing `builtins.abs`, `isinstance`, `print`, ... in the program, even from a function the
  tests call, changes nothing the tests look up;
- tracing and profiling hooks the program set (sys.settrace can skip the lines of an assert) are
  cleared before the tests;
- every function the program defined is called from the tests through a guard: a value it returns
  whose type the program defined with comparison, truth or arithmetic methods of its own (an object
  equal to everything) is an error, not an answer.
A program that reads this process's own memory (frame introspection, ctypes) can still forge a
report; the sandbox around this process bounds what it can do to the machine, not what it can make
Python's comparisons mean.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import traceback
import types

# Special methods through which a value could make an assert succeed without being the right value.
FORGING_METHODS = frozenset({
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__hash__",
    "__contains__", "__iter__", "__getitem__", "__sub__", "__rsub__", "__add__", "__radd__", "__abs__",
    "__float__", "__int__", "__index__", "__round__", "__str__", "__format__", "__getattribute__",
    "__getattr__", "__class__", "__instancecheck__", "__subclasscheck__",
})
PLAIN_CONTAINERS = (list, tuple, set, frozenset)
GUARD_BUDGET = 100_000  # values inspected per returned value (a huge result is walked only this far)


class ForgedValue(Exception):
    """A returned value could make a comparison succeed by itself."""


def forging_class(t: type, program_module: str):
    """The first class in t's MRO that the program defined with one of FORGING_METHODS, else None."""
    for cls in t.__mro__:
        if getattr(cls, "__module__", None) == program_module and FORGING_METHODS & set(vars(cls)):
            return cls
    return None


def check_value(value, program_module: str) -> None:
    stack, seen = [value], 0
    while stack and seen < GUARD_BUDGET:
        v = stack.pop()
        seen += 1
        t = type(v)
        bad = forging_class(t, program_module)
        if bad is not None:
            raise ForgedValue(f"the program returned a {t.__name__}, a class it defined with "
                              f"{sorted(FORGING_METHODS & set(vars(bad)))[0]}: not a value the tests can compare")
        if t in PLAIN_CONTAINERS:
            stack.extend(v)
        elif t is dict:
            stack.extend(v.keys())
            stack.extend(v.values())


def guard(fn, program_module: str):
    """fn, with every value it returns checked by check_value."""
    def guarded(*args, **kwargs):
        result = fn(*args, **kwargs)
        check_value(result, program_module)
        return result

    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(guarded, attr, getattr(fn, attr, None))
    return guarded


def run(program: str, tests: str, nonce: str, result_fd: int) -> None:
    """Run `program`, then `tests`, report the verdict on result_fd and end the process. Never returns."""
    write, exit_now, dumps = os.write, os._exit, json.dumps
    stdout, stderr = sys.stdout, sys.stderr
    pristine = dict(builtins.__dict__)
    clear_builtins, update_builtins = builtins.__dict__.clear, builtins.__dict__.update
    format_exception = traceback.format_exception

    def restore_builtins() -> None:  # for the tests, and for this function's own json and traceback calls
        clear_builtins()
        update_builtins(pristine)

    def report(passed: bool, error) -> None:
        restore_builtins()
        for stream in (stdout, stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        write(result_fd, (dumps({"nonce": nonce, "passed": passed, "error": error}) + "\n").encode())
        exit_now(0)

    module = "__main__"
    try:
        names = {"__name__": module, "__builtins__": builtins}
        exec(compile(program, "<program>", "exec"), names)
        restore_builtins()
        sys.settrace(None)
        sys.setprofile(None)
        checked = dict(names)
        checked["__builtins__"] = dict(pristine)
        for name, value in names.items():
            if isinstance(value, types.FunctionType) and value.__globals__ is names:
                checked[name] = guard(value, module)
        exec(compile(tests, "<tests>", "exec"), checked)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the tests did not finish
        restore_builtins()
        lines = format_exception(type(e), e, e.__traceback__)
        try:
            stderr.write("".join(lines))
        except BaseException:
            pass
        last = lines[-1].strip() if lines else type(e).__name__
        report(False, last[:500])
    report(True, None)
