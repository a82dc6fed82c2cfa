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

A wrong answer is described in words, never by printing the expected value (the student copy
keeps the check cell, and an answer printed there would be copied, not derived):

    >>> check("exercise 1", lambda: 4.5, expected=3)
    exercise 1: not quite - your number is too large.
    False
    >>> check("exercise 1", lambda: [1, 2], expected=[1, 2, 3])
    exercise 1: not quite - your list has 2 items, it should have 3.
    False

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
    return _verdict(False, f"{name}: not quite - {describe_difference(got, expected)}." + (f" Hint: {hint}" if hint else ""))


def describe_difference(got: Any, expected: Any) -> str:
    """What is wrong with ``got``, in words that do not give ``expected`` away.

    >>> describe_difference("3", 3)
    'you returned a str where a number is wanted'
    >>> describe_difference((0, 5, 11), (0, 5, 12))
    'your tuple first differs at position 2'
    """
    import numbers

    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the course
        torch = None
    if torch is not None and isinstance(expected, torch.Tensor):
        got_t = torch.as_tensor(got) if not isinstance(got, torch.Tensor) else got
        if tuple(got_t.shape) != tuple(expected.shape):
            return f"your tensor has shape {tuple(got_t.shape)}, which is not the shape wanted"
        wrong = (~torch.isclose(got_t.double(), expected.double(), rtol=1e-5, atol=1e-6)).sum().item()
        return f"{wrong} of {expected.numel()} entries are wrong"
    if isinstance(expected, numbers.Number) and not isinstance(expected, bool):
        if not isinstance(got, numbers.Number) or isinstance(got, bool):
            return f"you returned a {type(got).__name__} where a number is wanted"
        return "your number is too large" if got > expected else "your number is too small"
    if isinstance(expected, (list, tuple)):
        kind = type(got).__name__
        if not isinstance(got, (list, tuple)):
            return f"you returned a {kind} where a {type(expected).__name__} is wanted"
        if len(got) != len(expected):
            return f"your {kind} has {len(got)} items, it should have {len(expected)}"
        first = next(i for i, (a, b) in enumerate(zip(got, expected)) if not _equal(a, b))
        return f"your {kind} first differs at position {first}"
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(got) != set(expected):
            return "your dict has other keys than the ones wanted"
        return f"your dict's values differ at keys {sorted(k for k in got if not _equal(got[k], expected[k]))}"
    if type(got) is not type(expected):
        return f"you returned a {type(got).__name__} where a {type(expected).__name__} is wanted"
    return "that is not the answer"


def check_that(name: str, fn: Callable, *args, rules, hint: str = "", **kwargs) -> bool:
    """Call ``fn(*args, **kwargs)`` and test the answer against ``rules``, ``(predicate, what is wrong)`` pairs:
    for an exercise whose answer is judged by what it must satisfy rather than compared with one value.

    >>> rules = [(lambda x: x > 0, "it must be positive"), (lambda x: x * x < 10, "its square must stay below 10")]
    >>> check_that("exercise 2", lambda: 5, rules=rules)
    exercise 2: not quite - its square must stay below 10.
    False
    >>> check_that("exercise 2", lambda: 3, rules=rules)
    exercise 2: correct!
    True
    """
    try:
        got = fn(*args, **kwargs)
    except NotImplementedError:
        return _verdict(False, f"{name}: not attempted yet - replace `raise NotImplementedError()` with your code.")
    except Exception as exc:
        return _verdict(False, f"{name}: your code raised {type(exc).__name__}: {exc}")
    for ok, words in rules:
        try:
            passed = bool(ok(got))
        except Exception as exc:  # the answer has the wrong kind for the rule
            passed, words = False, f"{words} (checking it raised {type(exc).__name__}: {exc})"
        if not passed:
            return _verdict(False, f"{name}: not quite - {words}." + (f" Hint: {hint}" if hint else ""))
    return _verdict(True, f"{name}: correct!")
