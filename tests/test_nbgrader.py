"""nbgrader's own round trip on the course, in a temporary course folder.

Every exercise's solution cell and the check cell after it carry nbgrader metadata; ``nbgrader
generate_assignment`` releases copies with no solution line in them; ``nbgrader autograde`` gives notebook 00's
reference solutions full marks, and (on a two-exercise notebook, to keep it quick) an untouched released copy
none, because a failing check raises under nbgrader.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest

from qdlib import paths
from qdlib.handouts import solution_lines

NOTEBOOKS = sorted((paths.REPO_DIR / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BEGIN = "### BEGIN SOLUTION"


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def exercise_pairs(nb_cells):
    """(solution cell, the code cell after it) for every code cell with a solution region."""
    code = [c for c in nb_cells if c["cell_type"] == "code"]
    return [(c, code[i + 1]) for i, c in enumerate(code) if BEGIN in "".join(c["source"])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercise_cells_carry_nbgrader_metadata(path):
    pairs = exercise_pairs(cells(path))
    assert len(pairs) >= 2, path.name
    ids = []
    for solution, grade in pairs:
        s, g = solution["metadata"].get("nbgrader", {}), grade["metadata"].get("nbgrader", {})
        assert s.get("solution") is True and s.get("grade") is False, (path.name, "".join(solution["source"])[:60])
        assert g.get("grade") is True and g.get("locked") is True and g.get("points", 0) > 0, (path.name, g)
        assert "check(" in "".join(grade["source"]) or "check_that(" in "".join(grade["source"]), "the grade cell is the exercise's check cell"
        ids += [s["grade_id"], g["grade_id"]]
    assert len(ids) == len(set(ids)), f"{path.name}: grade ids must be unique"


LABEL = re.compile(r"\*\*Exercise \d+ \((implementation|derivation|conceptual)\)\.\*\*")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_asks_for_an_implementation_and_a_derivation_or_concept(path):
    """At least three exercises; one that needs real code (its reference solution is 8 or more lines) and one
    conceptual or derivation question with a checked answer (a solution cell and its check cell)."""
    nb_cells = cells(path)
    assert len(exercise_pairs(nb_cells)) >= 3, f"{path.name}: fewer than three exercises"
    kinds = {}
    for i, c in enumerate(nb_cells):
        found = LABEL.search("".join(c["source"])) if c["cell_type"] == "markdown" else None
        if found:
            solution = next((d for d in nb_cells[i + 1:] if d["cell_type"] == "code"), None)
            assert solution is not None and BEGIN in "".join(solution["source"]), \
                f"{path.name}: {found.group(0)} is not followed by a solution cell"
            kinds.setdefault(found.group(1), []).append(len(solution_lines("".join(solution["source"]))))
    assert max(kinds.get("implementation", [0])) >= 8, f"{path.name}: no implementation exercise of 8+ lines ({kinds})"
    assert kinds.keys() & {"derivation", "conceptual"}, f"{path.name}: no derivation or conceptual exercise"


def nbgrader(course, *args):
    result = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture()
def course(tmp_path):
    pytest.importorskip("nbgrader", reason="nbgrader is in the dev extra: pip install -e '.[dev]'")
    (tmp_path / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        "c.CourseDirectory.course_id = 'qdlib'\n"
        "c.Execute.timeout = 600\n"  # the notebooks' cells are slow on a busy 2-core machine
        "c.ClearSolutions.code_stub = {'python': 'raise NotImplementedError()'}\n", encoding="utf-8")
    return tmp_path


@pytest.mark.slow  # 7 s: nbgrader's generate_assignment over every notebook
def test_released_copies_carry_no_solution(course):
    source = course / "source" / "ps1"
    source.mkdir(parents=True)
    for path in NOTEBOOKS:
        shutil.copy(path, source / path.name)
    nbgrader(course, "generate_assignment", "ps1", "--force")
    for path in NOTEBOOKS:
        released = course / "release" / "ps1" / path.name
        code = "\n".join("".join(c["source"]) for c in cells(released) if c["cell_type"] == "code")
        secret = [line for c in cells(path) if c["cell_type"] == "code" for line in solution_lines("".join(c["source"]))]
        leaked = [line for line in secret if line in code]
        assert secret and not leaked, f"{path.name}: solution lines in the released copy: {leaked[:3]}"
        assert BEGIN not in code and code.count("raise NotImplementedError()") >= len(exercise_pairs(cells(path)))


def autograde(course, name, submissions):
    """Release ``name`` from source/ps1, submit each (student, folder) copy, autograde; {student: (score, max)}."""
    from nbgrader.api import Gradebook

    nbgrader(course, "generate_assignment", "ps1", "--force")
    for student, origin in submissions.items():
        (course / "submitted" / student / "ps1").mkdir(parents=True)
        shutil.copy(course / origin / "ps1" / name, course / "submitted" / student / "ps1" / name)
    nbgrader(course, "autograde", "ps1", "--create", "--force")
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        return {s: (gb.find_submission("ps1", s).score, gb.find_submission("ps1", s).max_score) for s in submissions}


@pytest.mark.slow  # 15-25 s each: the full tier runs both autograde checks
def test_autograde_scores_a_failing_check_zero(course):
    """The mechanism, on a two-exercise notebook: nbgrader gives points to a grade cell that does not raise."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                          "display_name": "Python 3 (ipykernel)"}})
    nb.cells = [nbformat.v4.new_code_cell("from qdlib.exercises import check")]
    for n, value in ((1, 3), (2, 5)):
        solution = nbformat.v4.new_code_cell(f"def f{n}():\n    {BEGIN}\n    return {value}\n    ### END SOLUTION")
        solution.metadata["nbgrader"] = {"grade": False, "grade_id": f"ex{n}", "locked": False, "schema_version": 3,
                                         "solution": True, "task": False}
        grade = nbformat.v4.new_code_cell(f"_ = check('Exercise {n}', f{n}, expected={value})")
        grade.metadata["nbgrader"] = {"grade": True, "grade_id": f"ex{n}_check", "locked": True, "points": 1,
                                      "schema_version": 3, "solution": False, "task": False}
        nb.cells += [solution, grade]
    (course / "source" / "ps1").mkdir(parents=True)
    nbformat.write(nb, course / "source" / "ps1" / "tiny.ipynb")
    scores = autograde(course, "tiny.ipynb", {"reference": "source", "untouched": "release"})
    assert scores == {"reference": (2.0, 2.0), "untouched": (0.0, 2.0)}


@pytest.mark.slow
def test_autograde_gives_the_reference_solutions_full_marks(course):
    name = "00_the_teacher.ipynb"
    (course / "source" / "ps1").mkdir(parents=True)
    shutil.copy(paths.REPO_DIR / "notebooks" / name, course / "source" / "ps1" / name)
    exercises = len(exercise_pairs(cells(paths.REPO_DIR / "notebooks" / name)))
    assert autograde(course, name, {"reference": "source"}) == {"reference": (exercises, exercises)}


def test_a_failing_check_raises_only_under_nbgrader(monkeypatch, capsys):
    from qdlib.exercises import GRADING_ENV, check

    def todo():
        raise NotImplementedError()

    monkeypatch.delenv(GRADING_ENV, raising=False)
    assert check("ex", lambda: 2, expected=1) is False and check("ex", todo, expected=1) is False
    monkeypatch.setenv(GRADING_ENV, "autograde")
    assert check("ex", lambda: 1, expected=1) is True
    for wrong in (lambda: 2, todo, lambda: None, lambda: 1 / 0):
        with pytest.raises(AssertionError, match="ex: "):
            check("ex", wrong, expected=1)
    assert "not attempted" in capsys.readouterr().out  # the student still reads the verdict
