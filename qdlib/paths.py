"""Where qdlib finds its committed reference artifacts and writes its runs.

One place for every shared path, so no module hard-codes a location:

    >>> from qdlib import paths
    >>> paths.TEACHER_DIR.name
    'teacher'

The repository's ``outputs/`` folder holds the committed, read-only reference
artifacts (the bundled teacher, the reference draft, its knowledge cache, one
benchmark report). Everything a run writes goes under ``outputs/runs/``, which
git ignores. ``QD_OUTPUTS`` moves the outputs folder; ``QD_RUNS`` moves only the
run folder (tests point it at a temporary directory).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def outputs_dir() -> Path:
    """The folder with the committed reference artifacts (``QD_OUTPUTS`` overrides)."""
    env = os.environ.get("QD_OUTPUTS")
    return Path(env).expanduser() if env else REPO_DIR / "outputs"


def runs_dir() -> Path:
    """The git-ignored folder every run writes to (``QD_RUNS`` overrides)."""
    env = os.environ.get("QD_RUNS")
    return Path(env).expanduser() if env else outputs_dir() / "runs"


OUTPUTS_DIR = outputs_dir()
TEACHER_DIR = OUTPUTS_DIR / "teacher"  # the bundled 28-layer teacher
DRAFT_DIR = OUTPUTS_DIR / "reference_draft"  # the distilled reference draft
DRAFT_NOKNOW_DIR = OUTPUTS_DIR / "ablation_no_knowledge"
FAST_DRAFT_DIR = OUTPUTS_DIR / "fast_draft"  # the feature-fed fast draft (load_draft("fast"))
BENCH_DIR = OUTPUTS_DIR / "bench_reference"  # the committed benchmark report
BENCH_FAST_DIR = OUTPUTS_DIR / "bench_fast"  # the fast draft beside the reference draft (notebook 07)
DATA_DIR = PACKAGE_DIR / "data"  # knowledge items, YAML configs
CONFIGS_DIR = PACKAGE_DIR / "configs"
