"""The shape of qdlib, read from its source: imports follow the pipeline (no cycle), functions fit a screen.

Static reading only (``ast``), so these run in a fraction of a second and import nothing.
Each check is shown to catch the mistake it is meant to catch on a small made-up package.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qdlib"
MAX_FUNCTION_LINES = 100

# Function-level imports of qdlib's own modules that are allowed, each with its reason.
# Anything else imports at the top of the module, where a cycle cannot hide.
ALLOWED_FUNCTION_LEVEL = {
    # every `qd` command imports its stage inside the command, so `qd --help` and a failing
    # argument check answer without loading torch and transformers (issue 14, item 3)
    "qdlib.cli": "*",
}

# Functions allowed over MAX_FUNCTION_LINES for now, each with its reason.
KNOWN_LONG_FUNCTIONS: set = set()  # none left (speculative_generate became a loop over a drafter)


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def qdlib_imports(path: Path, package: Path) -> list[tuple[str, bool, int]]:
    """``(imported module, at function level, line)`` for every import of the package's own modules in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = package.name
    here = module_name(path, package)
    pkg_of_here = here if path.name == "__init__.py" else here.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name == name or a.name.startswith(name + ".")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_of_here.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg_of_here
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod == name or mod.startswith(name + "."):
                # `from . import paths` imports the module qdlib.paths; `from . import __version__` the package
                subs = [f"{mod}.{a.name}" for a in node.names if (package.parent / f"{mod}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()]
                targets = subs if len(subs) == len(node.names) else [mod] + subs
        for t in targets:
            out.append((t, id(node) not in top, node.lineno))
    return out


def import_graph(package: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Edges between the package's modules (function-level imports included) and the disallowed function-level ones."""
    graph, bad = {}, []
    for path in sorted(package.glob("*.py")):
        here = module_name(path, package)
        graph.setdefault(here, set())
        for target, in_function, line in qdlib_imports(path, package):
            if target != here:
                graph[here].add(target)
            allowed = ALLOWED_FUNCTION_LEVEL.get(here, ())
            if in_function and allowed != "*" and target not in allowed:
                bad.append(f"{path.name}:{line} imports {target} inside a function")
    return graph, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``{"module.function": lines}`` for every function or method longer than ``limit`` lines (decorators excluded)."""
    out = {}
    for path in sorted(package.glob("*.py")):
        mod = module_name(path, package)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out[f"{mod}.{node.name}"] = n
    return out


# ----------------------------------------------------------------------------- the checks on qdlib


def test_no_import_cycle_among_qdlib_modules():
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 20  # every module was read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_function_level_import_of_qdlib_modules_except_the_listed_ones():
    _, bad = import_graph(PACKAGE)
    assert bad == [], "function-level imports of qdlib modules (move them to the top, or list them with a reason):\n" + \
        "\n".join(bad)


def test_the_pipeline_goes_one_way():
    """The stages of shared/notes/architecture.md: nothing low imports anything above it."""
    graph, _ = import_graph(PACKAGE)
    low = {"qdlib.paths", "qdlib.io", "qdlib.progress", "qdlib.hardware", "qdlib.training"}
    for mod in low:  # errors.py imports nothing, so anything may raise its classes
        assert not graph[mod] - {"qdlib.paths", "qdlib.errors"}, f"{mod} imports {graph[mod]}"
    assert graph["qdlib.errors"] == set() and graph["qdlib.corpus"] <= {"qdlib.paths", "qdlib.errors"}
    assert "qdlib.draft" not in graph["qdlib.models"] and "qdlib.knowledge" not in graph["qdlib.models"]
    assert "qdlib.teacher" not in set().union(*(graph[m] for m in graph if m not in ("qdlib.cli", "qdlib.teacher")))
    assert "qdlib.report" not in graph["qdlib.bench"]


def test_no_function_over_100_lines():
    long = {k: v for k, v in long_functions(PACKAGE).items() if k not in KNOWN_LONG_FUNCTIONS}
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_known_long_functions_still_exist():
    """A stale exception would hide the next long function of that name: remove entries once they are short."""
    long = long_functions(PACKAGE)
    assert KNOWN_LONG_FUNCTIONS <= set(long), f"no longer long, remove from KNOWN_LONG_FUNCTIONS: {KNOWN_LONG_FUNCTIONS - set(long)}"


# ----------------------------------------------------------------------------- the checks can fail


@pytest.fixture
def toy(tmp_path):
    """A made-up package: ``a`` imports ``b`` at the top, ``b`` imports ``a`` inside a function (a hidden cycle)."""
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from . import b\n\ndef f():\n    return b.g()\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f\n    return f\n\n\n" + "def long():\n" + "    x = 1\n" * 101)
    return pkg


def test_a_cycle_hidden_in_a_function_is_found(toy):
    graph, bad = import_graph(toy)
    assert graph["toy.a"] == {"toy.b"} and graph["toy.b"] == {"toy.a"}
    assert find_cycle(graph) in (["toy.a", "toy.b", "toy.a"], ["toy.b", "toy.a", "toy.b"])
    assert bad == ["b.py:2 imports toy.a inside a function"]


def test_an_acyclic_graph_passes():
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) is None
    assert find_cycle({"x": {"y", "z"}, "y": {"z"}, "z": set()}) is None  # a diamond is not a cycle


def test_a_long_function_is_measured(toy):
    assert long_functions(toy) == {"toy.b.long": 102}
    assert long_functions(toy, limit=200) == {}
