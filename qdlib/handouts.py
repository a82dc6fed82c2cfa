"""Handouts: student copies of the course notebooks (`qd student`).

Every exercise solution in ``notebooks/`` sits between nbgrader's markers::

    def answer(x):
        ### BEGIN SOLUTION
        return 2 * x
        ### END SOLUTION

A student copy replaces each such block with ``raise NotImplementedError()`` at the
same indentation and drops ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS``
blocks, so the check cell that follows tells the student "not attempted yet" until
they write their own code. It keeps the stored outputs (figures, tables, printed
numbers), so a student can read a notebook before running it, except where an output
would give an answer away (:func:`reveals_answer`): those of

- a solution cell (one with a solution or hidden-test block),
- a check cell (nbgrader's grade cell after each solution),
- any later cell that uses a name a solution cell defines (it would print the
  instructor's result, e.g. ``print(alpha_needed(2.0, ...))``),
- a cell tagged ``hide-output-in-student`` (an author's mark for anything else, e.g.
  a cell above an exercise that prints its answer).

    qd student                       # -> outputs/runs/student/NN_topic.ipynb
    qd student --out handout/        # another folder

    >>> strip_solutions("def f():\\n    ### BEGIN SOLUTION\\n    return 1\\n    ### END SOLUTION\\n")
    'def f():\\n    raise NotImplementedError()\\n'
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import paths

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
STUB = "raise NotImplementedError()"
HIDE_TAG = "hide-output-in-student"


def _blocks(lines: list[str], begin: str, end: str):
    """Yield (start, stop) line indices of marker blocks, markers included; unbalanced markers are an error."""
    start = None
    for i, line in enumerate(lines):
        s = line.strip()
        if s == begin:
            if start is not None:
                raise ValueError(f"line {i + 1}: {begin!r} inside another block (missing {end!r})")
            start = i
        elif s == end:
            if start is None:
                raise ValueError(f"line {i + 1}: {end!r} without {begin!r}")
            yield start, i
            start = None
    if start is not None:
        raise ValueError(f"line {start + 1}: {begin!r} is never closed with {end!r}")


def strip_solutions(source: str) -> str:
    """The cell source with solutions stubbed out and hidden tests removed."""
    lines = source.split("\n")
    out, keep_from = [], 0
    for a, b in list(_blocks(lines, BEGIN_HIDDEN, END_HIDDEN)):
        out += lines[keep_from:a]
        keep_from = b + 1
    lines = out + lines[keep_from:]
    out, keep_from = [], 0
    for a, b in list(_blocks(lines, BEGIN_SOLUTION, END_SOLUTION)):
        indent = re.match(r"\s*", lines[a]).group(0)
        out += lines[keep_from:a] + [indent + STUB]
        keep_from = b + 1
    return "\n".join(out + lines[keep_from:])


def solution_lines(source: str) -> list[str]:
    """The non-empty lines inside solution and hidden-test blocks (what must never reach a student)."""
    lines = source.split("\n")
    inner = []
    for begin, end in ((BEGIN_SOLUTION, END_SOLUTION), (BEGIN_HIDDEN, END_HIDDEN)):
        for a, b in _blocks(lines, begin, end):
            inner += [line.strip() for line in lines[a + 1 : b] if line.strip()]
    return inner


def defined_names(source: str) -> set[str]:
    """Names a cell defines at its top level (functions, classes, assignments).

    >>> sorted(defined_names("def alpha(p, q):\\n    return 1\\nx, y = 1, 2"))
    ['alpha', 'x', 'y']
    """
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics: no names to follow
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def reveals_answer(cell, answers: set[str]) -> bool:
    """Whether a code cell's stored output could give an exercise away (see the module's docstring).

    ``answers`` holds the names that earlier solution cells define.
    """
    if HIDE_TAG in cell.metadata.get("tags", ()) or cell.metadata.get("nbgrader", {}).get("grade"):
        return True
    if solution_lines(cell.source) or BEGIN_SOLUTION in cell.source:
        return True
    return any(re.search(rf"\b{re.escape(name)}\b", cell.source) for name in answers)


def student_notebook(nb):
    """A copy of an ``nbformat`` notebook with solutions stubbed and the outputs that reveal an answer cleared."""
    import copy

    nb = copy.deepcopy(nb)
    answers: set[str] = set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            hide = reveals_answer(cell, answers)
            if BEGIN_SOLUTION in cell.source:
                answers |= defined_names(cell.source)
            cell.source = strip_solutions(cell.source)
        except ValueError as exc:
            raise ValueError(f"cell {i}: {exc}") from exc
        if hide:
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    return nb


def write_student_copies(src: str | os.PathLike | None = None, out: str | os.PathLike | None = None) -> list[Path]:
    """Write a student copy of every ``NN_*.ipynb`` in ``src`` (default: the course's notebooks) into ``out``."""
    import nbformat

    src = Path(src) if src else paths.REPO_DIR / "notebooks"
    out = Path(out) if out else paths.runs_dir() / "student"
    notebooks = sorted(src.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no course notebooks (NN_topic.ipynb) in {src}")
    if out.resolve() == src.resolve():
        raise ValueError("the student folder must not be the notebooks folder (it would overwrite the solutions)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        nb = student_notebook(nbformat.read(path, as_version=4))
        nbformat.validate(nb)
        target = out / path.name
        tmp = target.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, target)
        written.append(target)
    return written
