"""The public names of ``qdlib``: every exported name resolves, and every ``qdlib.X`` the docs cite exists."""

import re
from pathlib import Path

import pytest

import qdlib

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"(?<![\w.])qdlib\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")


def cited_names(paths) -> dict[str, str]:
    """``{"qdlib.X" or "qdlib.X.Y": file that cites it first}`` for the ``qdlib.`` names written in ``paths``."""
    out = {}
    for p in paths:
        for m in CITED.finditer(p.read_text(encoding="utf-8")):
            out.setdefault(m.group(0), p.name)
    return out


def unresolved(names) -> list[str]:
    """The dotted ``qdlib.`` names that raise AttributeError when looked up."""
    bad = []
    for full in sorted(names):
        obj = qdlib
        try:
            for attr in full.split(".")[1:]:
                obj = getattr(obj, attr)
        except AttributeError:
            bad.append(full)
    return bad


def test_every_lazy_name_is_exported_and_resolves():
    assert set(qdlib._LAZY) <= set(qdlib.__all__)
    assert set(qdlib.__all__) - set(qdlib._LAZY) == {"QdError", "ConfigError"}  # imported eagerly (no torch)
    assert unresolved(f"qdlib.{n}" for n in qdlib.__all__) == []


@pytest.mark.parametrize("name, module", [("NgramDrafter", "lookup"), ("FeatureDraft", "feature_draft"),
                                          ("load_feature_draft", "feature_draft")])
def test_the_drafters_the_docstrings_cite_are_exported(name, module):
    assert name in qdlib.__all__
    assert getattr(qdlib, name) is getattr(__import__(f"qdlib.{module}", fromlist=[name]), name)


def test_every_qdlib_name_the_sources_readme_and_notebooks_cite_exists():
    files = [*sorted((ROOT / "qdlib").glob("**/*.py")), ROOT / "README.md", *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    names = cited_names(files)
    assert "qdlib.NgramDrafter" in names and len(names) > 50  # the docstrings were read
    bad = unresolved(names)
    assert bad == [], "cited but not defined: " + ", ".join(f"{n} ({names[n]})" for n in bad)


def test_an_unexported_name_is_found(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("Use `qdlib.load_draft()` or :class:`qdlib.NoSuchDrafter`; `myqdlib.x` is not ours.\n")
    names = cited_names([doc])
    assert set(names) == {"qdlib.load_draft", "qdlib.NoSuchDrafter"}
    assert unresolved(names) == ["qdlib.NoSuchDrafter"]
