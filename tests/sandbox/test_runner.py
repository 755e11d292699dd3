"""The runner's guard on returned values, on its own (the executor tests run it inside the sandbox)."""

import pytest

from mftcore.sandbox.runner import ForgedValue, check_value, guard


def test_plain_values_and_honest_classes_pass():
    for value in (1, 2.5, "s", None, [1, (2, {"k": {3}})], frozenset({1}), {"a": [1, 2]}, range(3)):
        check_value(value, "__main__")

    class Point(tuple):  # a class of the program without comparison methods of its own
        pass

    Point.__module__ = "__main__"
    check_value([Point((1, 2))], "__main__")


def test_program_classes_with_forging_methods_are_refused_anywhere_in_the_value():
    class Any:
        def __eq__(self, other):
            return True

    Any.__module__ = "__main__"
    for value in (Any(), [1, Any()], {"k": (Any(),)}, ((Any(),),)):
        with pytest.raises(ForgedValue, match="a class it defined with __eq__"):
            check_value(value, "__main__")
    check_value(Any(), "some_library")  # a library's class is not the program's

    class Sub(Any):
        pass

    Sub.__module__ = "__main__"
    with pytest.raises(ForgedValue):
        guard(lambda: Sub(), "__main__")()
    assert guard(lambda x: x + 1, "__main__")(1) == 2
