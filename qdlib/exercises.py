"""Friendly checks for notebook exercises (learntools style).

A student writes a function between nbgrader's ``### BEGIN SOLUTION`` /
``### END SOLUTION`` markers; the student copy replaces the body with
``raise NotImplementedError()``. The check cell calls :func:`check`, which
tells "not attempted" apart from "incorrect" and says what is wrong:

    >>> def answer():
    ...     raise NotImplementedError()
    >>> check("exercise 1", answer, expected=3)
    exercise 1: not attempted yet - replace `raise NotImplementedError()` with your code.
    False
    >>> check("exercise 1", lambda: 3, expected=3)
    exercise 1: correct!
    True

Under nbgrader's autograder (or validator), which sets ``NBGRADER_EXECUTION``, a check that
fails also raises ``AssertionError``, so the grade cell scores zero instead of full marks.
"""

from __future__ import annotations

import os
from typing import Any, Callable

GRADING_ENV = "NBGRADER_EXECUTION"  # "autograde" or "validate" while nbgrader runs a notebook


def _equal(a: Any, b: Any) -> bool:
    try:
        import torch

        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            a_t, b_t = torch.as_tensor(a), torch.as_tensor(b)
            return a_t.shape == b_t.shape and bool(torch.allclose(a_t.double(), b_t.double(), rtol=1e-5, atol=1e-6))
    except ImportError:
        pass
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
        except (TypeError, ValueError):
            return False
    return a == b


def _verdict(ok: bool, message: str) -> bool:
    print(message)
    if not ok and os.environ.get(GRADING_ENV):
        raise AssertionError(message)
    return ok


def check(name: str, fn: Callable, *args, expected: Any, equal: Callable[[Any, Any], bool] = _equal,
          hint: str = "", **kwargs) -> bool:
    """Call ``fn(*args, **kwargs)`` and compare with ``expected``; print a friendly verdict."""
    try:
        got = fn(*args, **kwargs)
    except NotImplementedError:
        return _verdict(False, f"{name}: not attempted yet - replace `raise NotImplementedError()` with your code.")
    except Exception as exc:  # a student's bug: say what it was
        return _verdict(False, f"{name}: your code raised {type(exc).__name__}: {exc}")
    if got is None:
        return _verdict(False, f"{name}: your function returned None - did you forget `return`?")
    if equal(got, expected):
        return _verdict(True, f"{name}: correct!")
    return _verdict(False, f"{name}: not quite - expected {expected!r}, got {got!r}." + (f" Hint: {hint}" if hint else ""))
