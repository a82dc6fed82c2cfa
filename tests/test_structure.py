"""The shape of qdlib, read from its source: imports follow the pipeline (no cycle), functions fit a screen.

Static reading only (``ast``), so these run in a fraction of a second and import nothing.
Each check is shown to catch the mistake it is meant to catch on a small made-up package.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qdlib"
TESTS = Path(__file__).resolve().parent
MAX_FUNCTION_LINES = 60  # a function's lines, its docstring not counted
MAX_MODULE_LINES = 400

# Function-level imports of qdlib's own modules that are allowed, each with its reason.
# Anything else imports at the top of the module, where a cycle cannot hide.
ALLOWED_FUNCTION_LEVEL = {
    # every `qd` command imports its stage inside the command, so `qd --help` and a failing
    # argument check answer without loading torch and transformers (issue 14, item 3)
    "qdlib.cli.commands": "*",
    "qdlib.cli.train": "*",
    "qdlib.cli.bench": "*",
    "qdlib.cli.shared": "*",
}

# Functions allowed over MAX_FUNCTION_LINES for now, each with its reason.
KNOWN_LONG_FUNCTIONS: set = set()  # none left (speculative_generate became a loop over a drafter)

# The tests that may skip, each with the condition of the machine it depends on. A skip on the state of a committed
# file is not one: the file is the same on every clone, so such a test always skips (it cannot fail) or never does.
ALLOWED_SKIPS = {
    "test_cli.py::test_a_missing_gpu_is_refused_before_loading": "the machine has a GPU",
    "test_teacher_quality.py::heldout": "this Python's standard library differs from the one the teacher saw",
    "test_browser.py::lab": "Chromium, chromedriver or selenium is not installed",
    "test_nbgrader.py::course": "nbgrader (the dev extra) is not installed",
}


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
    for path in sorted(package.rglob("*.py")):  # subpackages (qdlib.train) too
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


def function_lines(node) -> int:
    """A function's lines from its ``def`` to its end, decorators and docstring not counted."""
    n = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``{"module.function": lines}`` for every function or method longer than ``limit`` lines (see function_lines)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        mod = module_name(path, package)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = function_lines(node)
                if n > limit:
                    out[f"{mod}.{node.name}"] = n
    return out


def long_modules(package: Path, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    """``{"module": lines}`` for every module longer than ``limit`` lines."""
    sizes = {module_name(p, package): len(p.read_text(encoding="utf-8").splitlines()) for p in package.rglob("*.py")}
    return {m: n for m, n in sorted(sizes.items()) if n > limit}


def stale_exceptions(package: Path, known_long=frozenset(), allowed_function_level=(), limit=MAX_FUNCTION_LINES):
    """Listed exceptions that no longer excuse anything (each would hide the next offender of that name)."""
    long = long_functions(package, limit)
    importers = {module_name(path, package) for path in package.rglob("*.py")
                 if any(in_function for _, in_function, _ in qdlib_imports(path, package))}
    return sorted([f"{f} (not over {limit} lines)" for f in set(known_long) - set(long)]
                  + [f"{m} (no function-level import)" for m in set(allowed_function_level) - importers])


def _test_scopes(path: Path):
    """``(name, node)`` for each top-level statement of a test file: a function's name, or ``<module>``."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        yield (node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else "<module>"), node


def vacuous_subset_asserts(path: Path) -> list[str]:
    """``file:line`` of each ``assert EMPTY <= x`` (or ``<``, ``.issubset``) whose ``EMPTY`` is a module-level name
    bound to an empty container: it holds whatever ``x`` is."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    empty = set()
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and value is not None and ast.unparse(value) in (
                "set()", "frozenset()", "{}", "[]", "()", "dict()", "list()", "tuple()"):
            empty.add(target.id)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            t = node.test
            if isinstance(t, ast.Compare) and isinstance(t.ops[0], (ast.LtE, ast.Lt)):
                left = t.left
            elif isinstance(t, ast.Call) and isinstance(t.func, ast.Attribute) and t.func.attr == "issubset":
                left = t.func.value
            else:
                continue
            if isinstance(left, ast.Name) and left.id in empty:
                out.append(f"{path.name}:{node.lineno}")
    return out


def skipping_tests(path: Path) -> set[str]:
    """``file::name`` of each test function or fixture (``<module>`` for the whole file) that may skip."""
    skips = {"pytest.skip", "pytest.importorskip", "pytest.mark.skip", "pytest.mark.skipif"}
    return {f"{path.name}::{name}" for name, top in _test_scopes(path)
            if any(isinstance(n, ast.Attribute) and ast.unparse(n) in skips for n in ast.walk(top))}


def unbounded_failure_counts(path: Path) -> list[str]:
    """``file::function`` of each test asserting that a count of failures (``x.failed == 0``) is zero without an
    assert on how many were tried (``x.attempted``): zero failures of zero attempts passes having checked nothing."""
    out = []
    for name, top in _test_scopes(path):
        asserts = [n.test for n in ast.walk(top) if isinstance(n, ast.Assert)]
        counts_failures = any(isinstance(t, ast.Compare) and isinstance(t.left, ast.Attribute)
                              and t.left.attr == "failed" for t in asserts)
        if counts_failures and not any("attempted" in ast.unparse(t) for t in asserts):
            out.append(f"{path.name}::{name}")
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
    low = {"qdlib.paths", "qdlib.io", "qdlib.progress", "qdlib.hardware", "qdlib.train.optim"}
    for mod in low:  # errors.py imports nothing, so anything may raise its classes; schema.py only errors.py
        assert not graph[mod] - {"qdlib.paths", "qdlib.errors", "qdlib.schema"}, f"{mod} imports {graph[mod]}"
    assert graph["qdlib.schema"] == {"qdlib.errors"}
    assert graph["qdlib.errors"] == set() and graph["qdlib.corpus"] <= {"qdlib.paths", "qdlib.errors", "qdlib.settings.names"}
    assert "qdlib.draft" not in graph["qdlib.models"] and "qdlib.knowledge" not in graph["qdlib.models"]
    assert "qdlib.teacher" not in set().union(*(graph[m] for m in graph if not m.startswith("qdlib.cli")
                                                and m != "qdlib.teacher"))
    settings = {m for m in graph if m.startswith("qdlib.settings")}  # torch-free: the schema, paths, errors only
    assert set().union(*(graph[m] for m in settings)) <= settings | {"qdlib.schema", "qdlib.paths", "qdlib.errors"}
    assert "qdlib.report" not in graph["qdlib.bench"]


def test_no_function_over_60_lines_and_no_module_over_400():
    long = {k: v for k, v in long_functions(PACKAGE).items() if k not in KNOWN_LONG_FUNCTIONS}
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines (docstrings not counted): {long}"
    assert long_modules(PACKAGE) == {}, f"modules over {MAX_MODULE_LINES} lines"


def test_the_size_checks_count_what_they_say(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    doc = '    """' + "\n" * 30 + '    """'
    (pkg / "sub" / "m.py").write_text(f"def ok():\n{doc}\n{body}\n\ndef long():\n{body}\n    x = 0\n")
    assert long_functions(pkg) == {"pkg.sub.m.long": 61}  # found in a subpackage; ok's docstring not counted
    assert long_modules(pkg, limit=100) == {"pkg.sub.m": 153}


def test_every_listed_exception_still_excuses_something():
    """A stale exception would hide the next offender of that name: remove entries once they are not needed."""
    assert ALLOWED_FUNCTION_LEVEL, "nothing listed: this test would check nothing"
    assert stale_exceptions(PACKAGE, KNOWN_LONG_FUNCTIONS, ALLOWED_FUNCTION_LEVEL) == []


# ----------------------------------------------------------------------------- the checks on the tests


def test_no_test_asserts_that_an_empty_constant_is_a_subset():
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 20
    assert [hit for f in files for hit in vacuous_subset_asserts(f)] == []


def test_only_the_listed_tests_skip_and_each_listed_one_still_can():
    """A skip depends on the machine (a GPU, an optional package), never on a committed file."""
    found = set().union(*(skipping_tests(f) for f in sorted(TESTS.glob("test_*.py"))))
    assert found - set(ALLOWED_SKIPS) == set(), "unlisted skips (list them with the machine condition, or measure)"
    assert set(ALLOWED_SKIPS) - found == set(), "listed but no longer skipping: remove from ALLOWED_SKIPS"


def test_no_test_counts_failures_without_counting_attempts():
    assert [hit for f in sorted(TESTS.glob("test_*.py")) for hit in unbounded_failure_counts(f)] == []


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


def test_a_stale_exception_is_found(toy):
    assert stale_exceptions(toy, {"toy.b.long"}, {"toy.b": "*"}) == []  # both still needed
    assert stale_exceptions(toy, {"toy.b.long", "toy.a.f"}, {"toy.b": "*", "toy.a": "*"}) == [
        "toy.a (no function-level import)", "toy.a.f (not over 60 lines)"]
    assert stale_exceptions(toy, {"toy.b.long"}, limit=200) == ["toy.b.long (not over 200 lines)"]


@pytest.fixture
def toy_tests(tmp_path):
    """Made-up test files with each of the three mistakes, and with their fixes."""
    (tmp_path / "test_empty.py").write_text(
        "KNOWN: set = set()\nALLOWED = frozenset()\n\n"
        "def test_stale():\n    assert KNOWN <= set(found())\n\n"  # the mistake: holds for anything found
        "def test_stale_too():\n    assert ALLOWED.issubset(found())\n\n"
        "def test_fine():\n    assert found() <= KNOWN and {1} <= {1, 2}\n")
    (tmp_path / "test_skip.py").write_text(
        "import pytest\n\npytestmark = pytest.mark.skipif(not READY, reason='no report')\n\n"
        "def test_card(card):\n    if 'unfamiliar' not in card:\n        pytest.skip('the card predates it')\n\n"
        "@pytest.mark.skip(reason='later')\ndef test_later():\n    pass\n\n"
        "def test_measures():\n    assert measure() > 0\n")
    (tmp_path / "test_counts.py").write_text(
        "def test_examples(name):\n    r = testmod(name)\n    assert r.failed == 0, f'{r.failed} of {r.attempted}'\n\n"
        "def test_examples_fixed(name):\n    r = testmod(name)\n    assert r.failed == 0\n    assert r.attempted > 0\n")
    return tmp_path


def test_the_checks_on_the_tests_find_each_mistake(toy_tests):
    assert vacuous_subset_asserts(toy_tests / "test_empty.py") == ["test_empty.py:5", "test_empty.py:8"]
    assert skipping_tests(toy_tests / "test_skip.py") == {"test_skip.py::<module>", "test_skip.py::test_card",
                                                          "test_skip.py::test_later"}
    assert unbounded_failure_counts(toy_tests / "test_counts.py") == ["test_counts.py::test_examples"]
    for check in (vacuous_subset_asserts, unbounded_failure_counts):  # nothing found where there is no mistake
        assert not check(toy_tests / "test_skip.py")
    assert not skipping_tests(toy_tests / "test_counts.py")


def test_the_decoding_loop_and_the_bench_costs_ask_the_drafter_not_its_type():
    """A new kind of drafter brings its own check(target) and step_cost(); the loop and the costs never branch on
    what a draft is (issue 26: the type switches they had)."""
    loop = (PACKAGE / "speculative.py").read_text()
    assert "needs_target_features" not in loop and "isinstance(draft" not in loop
    bench = (PACKAGE / "bench.py").read_text()
    costs = bench[bench.index("def measure_costs"):]
    costs = costs[: costs.index("\ndef ")]
    assert "step_cost" in costs
    callers = [PACKAGE / "bench.py", PACKAGE / "tour.py", *sorted((PACKAGE / "cli").glob("*.py"))]
    for path in callers:  # the bench takes drafts: dict; its callers fill it
        name, text = path.name, path.read_text()
        for switch in ("needs_target_features", "isinstance(draft,", "isinstance(fast,", "hasattr(draft,", "FeatureDraft"):
            assert switch not in text, f"{name} branches on a draft's type ({switch})"
