"""The committed notebooks, read as JSON (no kernel): figures stored, widgets readable unrun, JupyterLab's metadata.

A reader who opens a notebook without running it sees what is stored: every cell that draws must store its
picture, every widget a snapshot of its starting state (not a ``VBox(children=(...`` repr), and the metadata must
be what JupyterLab itself writes, so that opening a notebook leaves ``git status`` clean. Each check is also shown
to fail on a broken copy of a notebook written to a temporary folder.
"""

import ast
import copy
import json
import re

import ipykernel.kernelspec
import nbformat
import pytest
from ipykernel.ipkernel import IPythonKernel

from qdlib import paths
from qdlib.notebook import jupyterlab_text

NOTEBOOKS = sorted((paths.REPO_DIR / "notebooks").glob("[0-9][0-9]_*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"
SNAPSHOT_TYPES = ("image/png", "text/html")  # what a frontend without the widget's state can show instead
DRAWS = re.compile(r"plt\.show\(\)|plt\.subplots\(|\bplot_\w+\(|display\(Image\(")
WIDGET_REPR = re.compile(r"^\s*(VBox|HBox|interactive|Output|Dropdown|IntSlider|FloatSlider|Box|Tab)\(")


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb):
    return [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def source(cell):
    return "".join(cell["source"])


def data_outputs(cell):
    return [o["data"] for o in cell.get("outputs", []) if "data" in o]


def figure_cells_without_image(nb):
    """Indices of code cells that draw (plt.show, a plot_* helper, a displayed Image) but store no PNG."""
    return [i for i, c in code_cells(nb)
            if DRAWS.search(source(c)) and not any("image/png" in d for d in data_outputs(c))]


def bare_widget_outputs(nb):
    """(cell index, text) of widget outputs with no stored snapshot, or whose text is a widget's repr."""
    bad = []
    for i, c in code_cells(nb):
        for d in data_outputs(c):
            if WIDGET not in d:
                continue
            text = "".join(d.get("text/plain", ""))
            if not any(t in d for t in SNAPSHOT_TYPES) or WIDGET_REPR.match(text):
                bad.append((i, text[:80]))
    return bad


def expected_kernelspec():
    spec = ipykernel.kernelspec.get_kernel_dict()
    return {"display_name": spec["display_name"], "language": spec["language"], "name": ipykernel.kernelspec.KERNEL_NAME}


def metadata_problems(nb):
    """How the notebook's kernelspec and language_info differ from what JupyterLab (via ipykernel) writes."""
    problems = []
    meta = nb["metadata"]
    if meta.get("kernelspec") != expected_kernelspec():
        problems.append(f"kernelspec {meta.get('kernelspec')} != {expected_kernelspec()}")
    info = dict(meta.get("language_info", {}))
    version = info.pop("version", "")
    wanted = {k: v for k, v in IPythonKernel.language_info.items() if k != "version"}  # version: the reader's Python
    if info != wanted:
        problems.append(f"language_info {info} != {wanted}")
    if not re.fullmatch(r"3\.\d+\.\d+", version):
        problems.append(f"language_info version {version!r} is not a Python 3 version")
    return problems


def blanket_warning_filters(nb):
    """(cell index, line) of warnings.filterwarnings/simplefilter("ignore") calls that name no warning."""
    found = []
    for i, c in code_cells(nb):
        code = "\n".join(line for line in source(c).splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name not in ("filterwarnings", "simplefilter") or not node.args:
                continue
            action = node.args[0]
            if not (isinstance(action, ast.Constant) and action.value == "ignore"):
                continue
            named = {k.arg for k in node.keywords} & {"message", "category", "module"}
            category = next((k.value for k in node.keywords if k.arg == "category"), None)
            broad = isinstance(category, ast.Name) and category.id in ("Warning", "Exception", "BaseException")
            if (len(node.args) == 1 and not named) or broad:
                found.append((i, ast.get_source_segment(code, node)))
    return found


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def notebook(request):
    return request.param, load(request.param)


def test_every_figure_cell_stores_its_image(notebook):
    path, nb = notebook
    assert figure_cells_without_image(nb) == [], f"{path.name}: cells that draw but store no image"


def test_no_widget_is_stored_as_a_bare_repr(notebook):
    path, nb = notebook
    assert bare_widget_outputs(nb) == [], f"{path.name}: widgets a reader would see as text"


def test_metadata_is_what_jupyterlab_writes(notebook):
    path, nb = notebook
    assert metadata_problems(nb) == [], path.name


def not_as_jupyter_writes(path):
    """True when saving the file from JupyterLab would change its bytes: the frontend holds the notebook as
    JavaScript values (``0.0`` becomes ``0``), the server writes it through nbformat (sorted keys, indent 1)."""
    text = path.read_text(encoding="utf-8")
    return text != jupyterlab_text(text)


def test_file_is_byte_for_byte_what_jupyter_saves(notebook):
    path, _ = notebook
    assert not not_as_jupyter_writes(path), f"{path.name}: re-saving it in JupyterLab would rewrite the file"


def test_no_cell_silences_all_warnings(notebook):
    path, nb = notebook
    assert blanket_warning_filters(nb) == [], path.name


def test_setup_cell_is_one_call_into_qdlib(notebook):
    path, nb = notebook
    setup = source(nb["cells"][1])
    assert "from qdlib.notebook import setup" in setup and "DEVICE = setup()" in setup, path.name


def test_the_course_has_figures_and_widgets_to_check():
    """Guards the checks above against passing vacuously (e.g. a pattern that matches no cell any more)."""
    nbs = {p.stem: load(p) for p in NOTEBOOKS}
    drawing = sum(bool(DRAWS.search(source(c))) for nb in nbs.values() for _, c in code_cells(nb))
    widgets = sum(WIDGET in d for nb in nbs.values() for _, c in code_cells(nb) for d in data_outputs(c))
    assert drawing >= 14 and widgets >= 3, (drawing, widgets)


def test_speedup_explorer_starts_at_the_printed_values():
    """06: the line printed above the explorer is the explorer's own starting state, to the digit."""
    nb = load(paths.REPO_DIR / "notebooks" / "06_benchmarks.ipynb")
    [(i, cell)] = [(i, c) for i, c in code_cells(nb) if "speedup_explorer(" in source(c)]
    printed = "".join("".join(o["text"]) for o in cell["outputs"] if o.get("name") == "stdout").strip()
    [widget] = [d for d in data_outputs(cell) if WIDGET in d]
    assert printed and "".join(widget["text/plain"]).endswith(printed), (printed, widget["text/plain"])


# ---- each check fails on a broken copy ----------------------------------------------------------------------

def broken_copy(tmp_path, name, breaks):
    """A copy of a committed notebook, broken by ``breaks(nb)``, written to and read back from ``tmp_path``."""
    nb = copy.deepcopy(load(paths.REPO_DIR / "notebooks" / name))
    breaks(nb)
    out = tmp_path / name
    out.write_text(json.dumps(nb), encoding="utf-8")
    return load(out)


def test_checks_catch_broken_notebooks(tmp_path):
    def drop_images(nb):  # what MPLBACKEND=Agg did: plt.show() stores nothing
        for _, c in code_cells(nb):
            c["outputs"] = [o for o in c.get("outputs", []) if "image/png" not in o.get("data", {})]

    assert figure_cells_without_image(broken_copy(tmp_path, "00_the_teacher.ipynb", drop_images))

    def bare_widget(nb):  # an ipywidgets repr with no snapshot, as before
        for _, c in code_cells(nb):
            for d in data_outputs(c):
                if WIDGET in d:
                    for t in SNAPSHOT_TYPES:
                        d.pop(t, None)
                    d["text/plain"] = ["VBox(children=(HBox(children=(Dropdown(description='strategy'…"]

    assert bare_widget_outputs(broken_copy(tmp_path, "01_layer_sampling.ipynb", bare_widget))

    def repr_beside_picture(nb):
        for _, c in code_cells(nb):
            for d in data_outputs(c):
                if WIDGET in d:
                    d["text/plain"] = ["VBox(children=(HBox(children=(FloatSlider(value=0.86, …"]

    assert bare_widget_outputs(broken_copy(tmp_path, "06_benchmarks.ipynb", repr_beside_picture))

    def classic_kernelspec(nb):
        nb["metadata"]["kernelspec"]["display_name"] = "Python 3"

    assert metadata_problems(broken_copy(tmp_path, "02_knowledge_cache.ipynb", classic_kernelspec))

    unsorted = tmp_path / "unsorted.ipynb"
    unsorted.write_text(json.dumps(load(NOTEBOOKS[0]), indent=2) + "\n", encoding="utf-8")
    assert not_as_jupyter_writes(unsorted)

    float_state = tmp_path / "float_state.ipynb"  # what nbconvert stores for a FloatSlider; JupyterLab saves "min": 0
    nb = load(paths.REPO_DIR / "notebooks" / "06_benchmarks.ipynb")
    nb["metadata"].setdefault("widgets", {})["probe"] = {"min": 0.0, "max": 1.0, "step": 0.01}
    float_state.write_text(nbformat.writes(nbformat.from_dict(nb)) + "\n", encoding="utf-8")
    assert not_as_jupyter_writes(float_state)

    def other_language_info(nb):
        nb["metadata"]["language_info"]["pygments_lexer"] = "python3"

    assert metadata_problems(broken_copy(tmp_path, "02_knowledge_cache.ipynb", other_language_info))

    def silence_all(nb):
        nb["cells"][1]["source"] = ["import warnings\n", "warnings.filterwarnings(\"ignore\")\n"] + nb["cells"][1]["source"]

    assert blanket_warning_filters(broken_copy(tmp_path, "03_cross_attention_fusion.ipynb", silence_all))
    assert blanket_warning_filters({"cells": [{"cell_type": "code", "source": [
        "import warnings as w\nw.simplefilter('ignore', category=Warning)"]}]})
    targeted = {"cells": [{"cell_type": "code", "source": [
        "import warnings\nwarnings.filterwarnings('ignore', message='Detected call of', category=UserWarning)"]}]}
    assert blanket_warning_filters(targeted) == []


def test_setup_uses_the_inline_backend_only_in_a_kernel(monkeypatch):
    import IPython

    from qdlib import notebook

    calls = []

    class Shell:
        kernel = object()

        def run_line_magic(self, name, line):
            calls.append((name, line))

    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    assert notebook.use_inline_backend() and calls == [("matplotlib", "inline")]
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert not notebook.use_inline_backend() and len(calls) == 1


def test_setup_seeds_torch_and_returns_the_course_device(monkeypatch):
    import IPython
    import torch

    from qdlib import notebook

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert notebook.setup(seed=3) == "cpu"
    first = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(first, torch.rand(3))


EXERCISE = re.compile(r"\*\*Exercise (\d+)(?: \(([a-z]+)\))?\.\*\*")
GUIDE_ROW = re.compile(r"^\| (\d\d) \| (\d+|capstone)\b[^|]*\| ([a-z]+)( \(warm-up\))? \| [^|]+ \|$", re.M)


def exercises_in(nb) -> list[tuple[str, str]]:
    """``(number, kind label or "")`` of every exercise heading in a notebook's markdown."""
    return [(m.group(1), m.group(2) or "") for c in nb["cells"] if c["cell_type"] == "markdown"
            for m in EXERCISE.finditer(source(c))]


def test_the_instructor_guide_lists_every_exercise_with_its_kind():
    guide = (paths.REPO_DIR / "notebooks" / "README.md").read_text(encoding="utf-8")
    listed = {(nb, ex): (kind, bool(warm)) for nb, ex, kind, warm in GUIDE_ROW.findall(guide)}
    found = {(p.name[:2], n): label for p in NOTEBOOKS for n, label in exercises_in(load(p))}
    assert found and set(listed) - {("07", "capstone")} == set(found), "the guide's exercise list and the notebooks differ"
    for key, label in found.items():  # a labelled exercise is listed as its label says; an unlabelled one is a warm-up
        want = (label, False) if label else ("implementation", True)
        assert listed[key] == want, f"notebook {key[0]} exercise {key[1]}: listed as {listed[key]}, heading says {want}"
