"""`qd student`: student copies carry no solution, are valid notebooks, and their checks say "not attempted"."""

import subprocess
import sys

import nbformat
import pytest

from qdlib import paths
from qdlib.student import STUB, solution_lines, strip_solutions, student_notebook, write_student_copies

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
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in student.cells if c.cell_type == "code")


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
