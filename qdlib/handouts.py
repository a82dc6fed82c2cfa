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

A check cell stays in the student copy, so it must test what an answer satisfies without containing the answer:
:func:`answer_leaks` lists the check cells that compute the expected value by formula, write it down, or repeat
an expression of the solution (``tests/test_handouts.py`` runs it on every course notebook).

    >>> strip_solutions("def f():\\n    ### BEGIN SOLUTION\\n    return 1\\n    ### END SOLUTION\\n")
    'def f():\\n    raise NotImplementedError()\\n'
"""

from __future__ import annotations

import ast
import copy
import os
import re
import textwrap
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


# ----------------------------------------------------------------------------- answers a check cell gives away

_BUILTINS_THAT_COMPUTE = {"sum", "max", "min", "sorted", "len", "round", "abs", "any", "all"}
_STEPS = (ast.BinOp, ast.Call, ast.Compare, ast.BoolOp, ast.GeneratorExp, ast.ListComp)  # what an expression computes


def _parse(source: str):
    try:
        return ast.parse(source)
    except SyntaxError:  # IPython magics: nothing to read
        return None


def _written_down(node: ast.AST) -> bool:
    """A constant, or a list/tuple/set of constants (``-1`` included)."""
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_written_down(e) for e in node.elts)
    return isinstance(node, ast.Constant) or isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant)


def _computes(node: ast.AST) -> str | None:
    """Why an ``expected=`` value computes or states the answer itself, or None when it is a name or a call of a
    function (whose arguments are the exercise's inputs).

    >>> _computes(ast.parse("costs.mlp_macs(cfg)", mode="eval").body) is None
    True
    >>> _computes(ast.parse("layer_macs(c) + 2 * c.hidden_size", mode="eval").body)
    'it computes the answer by a formula'
    >>> _computes(ast.parse("torch.tensor([0.7, 0.3])", mode="eval").body)
    'it writes the answer down'
    """
    if _written_down(node) or isinstance(node, ast.Dict) or (
            isinstance(node, ast.Call) and any(isinstance(a, (ast.List, ast.Tuple)) and _written_down(a)
                                               for a in node.args)):
        return "it writes the answer down"
    if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp)):
        return "it computes the answer by a formula"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _BUILTINS_THAT_COMPUTE:
        return f"it computes the answer in place ({node.func.id}(...))"
    if not isinstance(node, (ast.Name, ast.Attribute, ast.Call)):
        return f"it computes the answer in place ({type(node).__name__.lower()})"
    return None


def _shape(node: ast.AST) -> str:
    """An expression with its variables renamed ``_`` (the functions and methods it calls keep their names)."""
    called = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    roots = set()
    for n in ast.walk(node):  # the root name of a called attribute chain (torch in torch.minimum) is kept
        if id(n) in called:
            while isinstance(n, ast.Attribute):
                n = n.value
            roots.add(id(n))

    class Rename(ast.NodeTransformer):
        def visit_Name(self, n):
            return n if id(n) in called or id(n) in roots else ast.copy_location(ast.Name("_", n.ctx), n)

    return ast.unparse(Rename().visit(node))


def _expressions(tree: ast.AST) -> set[str]:
    """The shapes of every expression in ``tree`` with at least two steps (operations, calls, comparisons)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.expr) and sum(isinstance(n, _STEPS) for n in ast.walk(node)) >= 2:
            out.add(_shape(copy.deepcopy(node)))
    return out


def _expected_values(tree: ast.AST) -> list[ast.AST]:
    """The ``expected=`` values of the ``check(...)`` calls in a cell, a name replaced by what the cell assigned it."""
    assigned = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
    values = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "check":
            for kw in n.keywords:
                if kw.arg == "expected":
                    v = kw.value
                    values.append(assigned.get(v.id, v) if isinstance(v, ast.Name) else v)
    return values


def answer_leaks(nb) -> list[str]:
    """What the student copy of an ``nbformat`` notebook would give away, one line per leak (empty: nothing).

    For each exercise (a solution cell, then the cells up to the next one): a check cell whose ``expected=`` value
    is a formula, a loop or a written-down value rather than a name or a call of an independent function; and any
    of those cells that repeats an expression of the solution (variables renamed, so ``(p - q).clamp(min=0)``
    is found as ``(pp - qq).clamp(min=0)``).
    """
    student = student_notebook(nb)
    code = [(i, c, s) for i, (c, s) in enumerate(zip(nb.cells, student.cells)) if c.cell_type == "code"]
    starts = [k for k, (_, c, _) in enumerate(code) if BEGIN_SOLUTION in c.source]
    leaks = []
    for n, k in enumerate(starts):
        lines = code[k][1].source.split("\n")
        secret = set()  # only what the student copy replaces is secret
        for a, b in _blocks(lines, BEGIN_SOLUTION, END_SOLUTION):
            block = _parse(textwrap.dedent("\n".join(lines[a + 1 : b])))
            secret |= _expressions(block) if block else set()
        for i, teacher_cell, student_cell in code[k + 1 : starts[n + 1] if n + 1 < len(starts) else None]:
            tree = _parse(student_cell.source)
            if tree is None:
                continue
            if teacher_cell.metadata.get("nbgrader", {}).get("grade"):
                for value in _expected_values(tree):
                    why = _computes(value)
                    if why:
                        leaks.append(f"cell {i}: expected={ast.unparse(value)[:60]}: {why}")
            for shape in sorted(secret & _expressions(tree)):
                leaks.append(f"cell {i}: repeats the solution's expression {shape[:60]}")
    return leaks


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
