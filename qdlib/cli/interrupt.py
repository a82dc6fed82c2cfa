"""What Ctrl-C keeps, per command: the line ``qd`` prints when a command is interrupted."""

from __future__ import annotations

from pathlib import Path

from .. import paths


def kept_nothing(args) -> str:
    return "nothing was written"


def _kept_by_distill(args) -> str:
    run = getattr(args, "run_dir", None)
    if run is None:
        return "nothing was written; rerun the same command to start"
    run = Path(run)
    if (run / "last.pt").exists():
        return f"the run in {run} is kept (checkpoint last.pt); rerun the same command to resume"
    kept = [what for what, name in (("the knowledge cache", "knowledge_cache"), ("the training data", "data.pt"))
            if (run / name).exists()]
    if kept:
        return (f"{' and '.join(kept)} in {run} {'is' if len(kept) == 1 else 'are'} kept; rerun the same command to "
                f"continue from there")
    return "nothing was written; rerun the same command to start"


def _kept_by_train_teacher(args) -> str:
    if args.export:
        return "nothing was written (the export replaces its folder only when complete)"
    run = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "teacher"
    if (run / "last.pt").exists():
        return f"the last checkpoint {run / 'last.pt'} is kept; rerun the same command to resume from it"
    return "no checkpoint was written yet; rerun the same command to start"


def _kept_by_train_fast(args) -> str:
    if args.export:
        return "nothing was written (the export replaces its folder only when complete)"
    if (Path(args.run_dir) / "last.pt").exists():
        return f"the last checkpoint {Path(args.run_dir) / 'last.pt'} is kept; rerun the same command to resume from it"
    return "no checkpoint was written yet; rerun the same command to start"


KEPT_ON_INTERRUPT = {
    "train-teacher": _kept_by_train_teacher,
    "train-fast": _kept_by_train_fast,
    "export-draft": lambda args: "nothing was written (the folder is replaced only when complete)",
    "distill": _kept_by_distill,
    "build-cache": lambda args: "no cache was written (it is saved whole at the end)",
    "train-memory": lambda args: "the last checkpoint (every 100 steps) is kept; rerun the same command to resume",
    "bench": lambda args: "no report was written (it is written at the end); rerun the same command to measure",
    "student": lambda args: "the copies already written are complete; rerun the same command to write them all",
    "tour": lambda args: "the tour writes only under outputs/runs/tour; rerun `qd tour` to start again",
}
