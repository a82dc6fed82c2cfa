"""The course package itself: README commands, CI script, notebook skeleton."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    cmds = readme_commands()
    test_cmd = [c for c in cmds if "pytest" in c]
    assert len(test_cmd) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd[0] in ci
    assert any(c.startswith("pip install torch==2.13.0") for c in cmds)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_skeleton(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    md = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert md.lstrip().startswith(f"# {path.name[:2]} ")  # numbered title
    for heading in ("Learning objectives", "Prerequisites", "## Summary", "## Exercises", "## 1."):
        assert heading in md, f"{path.name} lacks {heading!r}"
    solutions = [c for c in code if "### BEGIN SOLUTION" in c]
    assert solutions and all("### END SOLUTION" in c for c in solutions)
    assert any("check(" in c or "check_that(" in c for c in code), "exercises need a check cell"
    assert all(c.get("outputs") is not None for c in cells if c["cell_type"] == "code")
    executed = [c for c in cells if c["cell_type"] == "code" and c.get("execution_count")]
    assert executed, f"{path.name} is committed without outputs"
    for c in cells:
        for out in c.get("outputs", []):
            assert out.get("output_type") != "error", f"{path.name} has an error output"
