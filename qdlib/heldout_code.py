"""Unfamiliar code: prompts from third-party packages that no training here uses (issue "Drafts that pay off").

The teacher trained on the standard library, torch and transformers; every draft here
distils on the same mix. What a learner brings is other code, so drafts are also
measured on the sources of packages that a fresh environment of this project installs
but that no training row ever contains. The files used are recorded with their sha256
in ``outputs/heldout_code/manifest.json``; where a package's files differ on another
machine (another version), the tests that read them skip.

    >>> PACKAGES[:3]
    ('jinja2', 'networkx', 'tornado')
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
from pathlib import Path

from . import paths
from .corpus import heldout_prompts

# runtime dependencies of this project (through jupyterlab, torch, matplotlib ...), never trained on
PACKAGES = ("jinja2", "networkx", "tornado", "pyparsing", "dateutil", "fontTools", "pygments", "IPython")
_DIST = {"dateutil": "python-dateutil", "fontTools": "fonttools"}
FILES_PER_PACKAGE = 6


def manifest_path() -> Path:
    return paths.outputs_dir() / "heldout_code" / "manifest.json"


def package_root(name: str) -> Path:
    if name not in PACKAGES:
        raise ValueError(f"unknown held-out package {name!r}; allowed: {', '.join(PACKAGES)}")
    return Path(importlib.import_module(name).__file__).resolve().parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def choose_files(name: str, n: int = FILES_PER_PACKAGE, min_bytes: int = 4000) -> list[str]:
    """``n`` source files of a package, chosen by a hash of their path (not their content), tests left out."""
    root = package_root(name)
    rels = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "test" in rel.lower() or p.name.startswith("_") or p.stat().st_size < min_bytes:  # no tests, no tables
            continue
        rels.append(rel)
    rels.sort(key=lambda r: hashlib.sha1(f"{name}/{r}".encode()).hexdigest())
    return rels[:n]


def build_manifest() -> dict:
    """The held-out code set on this machine: package versions, files and sha256 sums."""
    per_package = {}
    versions = {}
    for name in PACKAGES:
        versions[name] = importlib.metadata.version(_DIST.get(name, name))
        root = package_root(name)
        per_package[name] = [[name, rel, _sha(root / rel)] for rel in choose_files(name)]
    # interleaved (one file of each package in turn), so the first k prompts already cover every package
    files = [f for group in zip(*per_package.values()) for f in group]
    return {"format_version": 1, "packages": versions, "columns": ["package", "relpath", "sha256"], "files": files}


def heldout_code_prompts(tokenizer, n_prompts: int = 48, prompt_tokens: int = 64, seed: int = 0) -> list[list[int]]:
    """``n_prompts`` prompts of ``prompt_tokens`` ids, one per file in the manifest's (interleaved) order."""
    texts, problems = heldout_code_texts()
    if problems:
        raise FileNotFoundError(f"the held-out code differs on this machine: {problems[0]} (and {len(problems) - 1} "
                                f"more); install the versions in {manifest_path()}")
    return heldout_prompts(tokenizer, texts[:n_prompts], n_prompts=n_prompts, prompt_tokens=prompt_tokens, seed=seed)


def heldout_code_texts(manifest: dict | None = None) -> tuple[list[str], list[str]]:
    """``(texts, problems)``: the manifest's files whose sha256 matches on this machine, and what differs."""
    if manifest is None:
        manifest = json.loads(manifest_path().read_text())
    texts, problems = [], []
    for name, rel, sha in manifest["files"]:
        try:
            p = package_root(name) / rel
        except ImportError:
            problems.append(f"{name}: not installed")
            continue
        if not p.is_file():
            problems.append(f"{name}/{rel}: missing")
        elif _sha(p) != sha:
            problems.append(f"{name}/{rel}: content differs from the manifest (another version?)")
        else:
            texts.append(p.read_text(encoding="utf-8"))
    return texts, problems
