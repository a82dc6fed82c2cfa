"""`qd student`: student copies carry no solution, keep the outputs that give nothing away, are valid notebooks,
and their checks say "not attempted"."""

import subprocess
import sys

import nbformat
import pytest

from qdlib import paths
from qdlib.handouts import (HIDE_TAG, STUB, answer_leaks, solution_lines, strip_solutions, student_notebook,
                            write_student_copies)

NOTEBOOKS = sorted((paths.REPO_DIR / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_strip_keeps_indentation_and_drops_hidden_tests():
    src = ("def f(x):\n    ### BEGIN SOLUTION\n    y = 2 * x\n    return y\n    ### END SOLUTION\n"
           "### BEGIN HIDDEN TESTS\nassert f(1) == 2\n### END HIDDEN TESTS\nprint('visible')")
    assert strip_solutions(src) == f"def f(x):\n    {STUB}\nprint('visible')"
    assert solution_lines(src) == ["y = 2 * x", "return y", "assert f(1) == 2"]


@pytest.mark.parametrize("bad", ["### BEGIN SOLUTION\nx = 1", "x = 1\n### END SOLUTION",
                                 "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION"])
def test_unbalanced_markers_are_an_error(bad):
    with pytest.raises(ValueError, match="SOLUTION"):
        strip_solutions(bad)


def test_every_course_notebook_has_exercises_and_no_solution_leaks(tmp_path):
    written = write_student_copies(out=tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for src, dst in zip(NOTEBOOKS, written):
        teacher_nb = nbformat.read(src, as_version=4)
        student = nbformat.read(dst, as_version=4)
        nbformat.validate(student)
        secret = [line for c in teacher_nb.cells if c.cell_type == "code" for line in solution_lines(c.source)]
        assert secret, f"{src.name} has no exercise solutions"
        code = "\n".join(c.source for c in student.cells if c.cell_type == "code")
        assert "BEGIN SOLUTION" not in code and "HIDDEN TESTS" not in code
        stubs = code.count(STUB)
        assert stubs == sum(line.strip() == "### BEGIN SOLUTION" for c in teacher_nb.cells if c.cell_type == "code"
                            for line in c.source.split("\n")), dst.name
        # every solution line that is specific enough to give an answer away is gone
        leaks = [s for s in secret if len(s) > 12 and s in code and not s.startswith(("#", "return"))]
        assert not leaks, f"{dst.name} leaks {leaks[:3]}"
        # outputs: the ordinary cells keep theirs (figures included), no stored output says an answer was right
        pairs = [(a, b) for a, b in zip(teacher_nb.cells, student.cells) if a.cell_type == "code"]
        kept = [b for a, b in pairs if b.outputs]
        assert all(b.outputs == a.outputs for a, b in pairs if b.outputs)
        assert len(kept) >= len([a for a, _ in pairs if a.outputs]) // 2, f"{dst.name} lost most of its outputs"
        if any("image/png" in o.get("data", {}) for a, _ in pairs for o in a.outputs):
            assert any("image/png" in o.get("data", {}) for b in kept for o in b.outputs), f"{dst.name} lost its figures"
        shown = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for b in kept for o in b.outputs)
        assert "correct!" not in shown, f"{dst.name} shows a check's verdict"
        assert all(not b.outputs for a, b in pairs if a.metadata.get("nbgrader", {}).get("solution")
                   or a.metadata.get("nbgrader", {}).get("grade")), f"{dst.name} keeps an exercise cell's output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_check_cell_gives_an_answer_away(path):
    """Check cells stay in the student copy: none may compute the expected value by formula, write it down, or
    repeat an expression of the solution (they test properties, or compare with an independent function)."""
    leaks = answer_leaks(nbformat.read(path, as_version=4))
    assert not leaks, f"{path.name}: " + "; ".join(leaks)


def _exercise(check_source, solution="def residual(p, q):\n    ### BEGIN SOLUTION\n    r = (p - q).clamp(min=0)\n"
                                     "    return r / r.sum()\n    ### END SOLUTION"):
    return nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import torch"),
        _cell(solution, nbgrader={"solution": True, "grade": False}),
        _cell(check_source, nbgrader={"grade": True, "solution": False})])


FORMULA = "expected=(pp - qq).clamp(min=0) / (pp - qq).clamp(min=0).sum()"


@pytest.mark.parametrize("check_source, why", [
    (f"check('Ex', residual, pp, qq, {FORMULA})", "computes the answer by a formula"),
    ("want = torch.tensor([0.7, 0.0, 0.3])\ncheck('Ex', residual, pp, qq, expected=want)", "writes the answer down"),
    ("check('Ex', residual, pp, qq, expected=[0.7, 0.0, 0.3])", "writes the answer down"),
    ("check('Ex', best, expected=max(rows, key=lambda r: r['speed'])['gamma'])", "computes the answer in place"),
    ("check('Ex', count, expected=sum(p.numel() for p in m.parameters()))", "computes the answer in place (sum"),
    ("check_that('Ex', residual, pp, qq, rules=[(lambda r: torch.equal(r, (pp - qq).clamp(min=0)), 'no')])",
     "repeats the solution's expression (_ - _).clamp(min=0)"),
])
def test_the_leak_finder_finds_each_kind_of_leak(check_source, why):
    leaks = answer_leaks(_exercise(check_source))
    assert leaks and all(leak.startswith("cell 2:") for leak in leaks), leaks
    assert any(why in leak for leak in leaks), leaks


@pytest.mark.parametrize("check_source", [
    "check('Ex', residual, pp, qq, expected=qdlib_residual(pp, qq))",            # an independent function
    "check('Ex', layers, expected=qdlib.sample_layers(28, 5, 'geometric'))",
    "check_that('Ex', residual, pp, qq, rules=[(lambda r: bool((r >= 0).all()), 'no negative entry')])",
])
def test_the_leak_finder_lets_property_checks_pass(check_source):
    assert answer_leaks(_exercise(check_source)) == []


def test_an_old_check_cell_would_fail_the_leak_test():
    """Notebook 05's Exercise 2 as it was committed: its check cell held the residual's formula and its value."""
    old = ("pp = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])\n"
           "qq = torch.tensor([0.10, 0.40, 0.05, 0.25, 0.15, 0.05])\n"
           f"check('Exercise 2 (the distribution)', residual_dist, pp, qq, {FORMULA})\n"
           "_ = check('Exercise 2 (output follows p)', output_tv, residual_dist, expected=0.0)")
    solution = ("def residual_dist(p, q):\n    ### BEGIN SOLUTION\n    r = (p - q).clamp(min=0)\n"
                "    return r / r.sum()\n    ### END SOLUTION")
    leaks = answer_leaks(_exercise(old, solution))
    for why in ("by a formula", "writes the answer down", "(_ - _).clamp(min=0)"):
        assert any(why in leak for leak in leaks), (why, leaks)


def _cell(source, outputs=(), **metadata):
    return nbformat.v4.new_code_cell(source, outputs=list(outputs), metadata=metadata, execution_count=1)


def test_outputs_are_kept_except_those_that_reveal_an_answer():
    png = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    text = nbformat.v4.new_output("stream", text="0.73\n")
    nb = nbformat.v4.new_notebook(cells=[
        _cell("plot()", [png]),                                                          # 0 a figure: kept
        _cell("def best(a):\n    ### BEGIN SOLUTION\n    return 0.73\n    ### END SOLUTION", [text]),  # 1 solution
        _cell("check('Ex 1', best, 1)", [text], nbgrader={"grade": True}),            # 2 its check cell
        _cell("print(best(2))", [text]),                                                 # 3 prints the answer
        _cell("print(table)", [text], tags=[HIDE_TAG]),                                  # 4 marked by its author
        _cell("print(best_gamma_table)", [text]),                                        # 5 another name: kept
        nbformat.v4.new_markdown_cell("**Exercise**"),
    ])
    student = student_notebook(nb)
    assert [bool(c.get("outputs")) for c in student.cells[:6]] == [True, False, False, False, False, True]
    assert student.cells[0].outputs == [png] and student.cells[0].execution_count == 1
    assert all(c.execution_count is None for c in student.cells[1:5])
    assert nb.cells[3].outputs == [text], "the instructor's notebook is left as it was"


def test_a_name_defined_before_its_solution_hides_nothing_earlier():
    text = nbformat.v4.new_output("stream", text="x\n")
    nb = nbformat.v4.new_notebook(cells=[_cell("print(best)", [text]),
                                         _cell("def best():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION")])
    assert student_notebook(nb).cells[0].outputs == [text]


@pytest.mark.slow
def test_student_check_cells_say_not_attempted(tmp_path):
    """Run each student notebook's exercise part (stub + check cells after the Exercises heading) on top of the
    cells before it, in a real kernel, for the fastest notebook; the others are checked for the structure."""
    from nbclient import NotebookClient

    nb = student_notebook(nbformat.read(NOTEBOOKS[0], as_version=4))
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False).execute()
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    n_checks = sum("check(" in c.source for c in nb.cells if c.cell_type == "code")
    assert texts.count("not attempted yet") >= n_checks > 0
    assert "correct!" not in texts


def test_every_stub_is_followed_by_a_check_cell():
    for path in NOTEBOOKS:
        cells = [c for c in student_notebook(nbformat.read(path, as_version=4)).cells if c.cell_type == "code"]
        for i, c in enumerate(cells):
            if STUB in c.source:
                later = [d.source for d in cells[i + 1 : i + 3]]
                assert any("check(" in s or "check_that(" in s for s in later), f"{path.name}: a stub without a check cell after it"


def test_cli_writes_student_copies(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qdlib.cli", "student", "--out", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
