"""The one training loop of qdlib: :func:`fit` trains any :class:`~qdlib.train.recipe.Recipe`.

    state = fit(recipe, FitConfig(steps=1000, learning_rate=1e-3, warmup_steps=50), "outputs/runs/x")

Per optimizer step: the learning rate of :func:`~qdlib.train.recipe.lr_factor`, ``accumulation`` micro-batches
(``recipe.batch(step, micro)``, ``recipe.loss``, optional bf16 autocast), gradient clipping, and the NaN guard (a
step whose loss or gradient norm is not finite is skipped and counted; more than ``max_bad_steps`` in a row stop
the run with :class:`TrainingStopped`). Then, when due, an evaluation (``recipe.score()``, higher is better):
``best/`` is replaced, atomically, only by a better score. ``last.pt`` (atomic; loaded with ``weights_only``)
holds the trainee, the optimiser, the counters and the random number generators, so a resumed run ends with the
same weights, bit for bit, as an uninterrupted one. Ctrl-C saves the last finished step and says how to resume.

With an ``accelerator`` (Accelerate) every process trains its own slice of each batch (the recipe's ``batch``
decides which), gradients are averaged, and only the main process evaluates, logs and writes files.

Files in ``run_dir``: ``last.pt``, ``best/`` (the recipe's files and ``fit.json``: score and step), ``log.jsonl``
(one row per step: ``step``, ``loss``, ``lr`` (the rate the schedule has reached after the step), ``grad_norm``,
``skipped``, ``elapsed_s`` and the recipe's numbers; one row per evaluation with ``eval`` and ``score``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from ..errors import ConfigError, QdError
from ..io import append_jsonl, atomic_dir, torch_load_safe, torch_save_atomic, write_json_atomic
from ..progress import progress_bar
from .recipe import FitConfig, Recipe, autocast_for, group_lr

FORMAT = "qd-fit/1"  # the layout of last.pt; an older one is refused with a clear message


class TrainingStopped(QdError, RuntimeError):
    """Training stopped on purpose (for example: too many non-finite losses in a row)."""

    exit_code = 3


@dataclasses.dataclass
class FitState:
    """The loop's counters; ``last.pt`` saves them with the weights."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient, in all
    bad_in_row: int = 0  # ... and the current run of them
    elapsed: float = 0.0  # training seconds (evaluation and checkpoints excluded)
    best: float | None = None  # best validation score so far
    best_step: int | None = None


class _Processes:
    """Accelerate's collective operations when an accelerator is given, plain single-process torch otherwise."""

    def __init__(self, acc=None):
        self.acc = acc
        self.main = acc is None or acc.is_main_process

    def backward(self, loss: torch.Tensor) -> None:
        (self.acc.backward if self.acc is not None else torch.Tensor.backward)(loss)

    def any_bad(self, loss: torch.Tensor) -> bool:
        """Whether the loss is not finite on any process."""
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=loss.device)
        if self.acc is not None:
            bad = self.acc.reduce(bad, "sum")
        return bad.item() > 0

    def clip(self, params: list, max_norm: float | None) -> float:
        """Clip the gradients' total norm to ``max_norm`` (None: measure only); returns the norm before clipping."""
        clip = self.acc.clip_grad_norm_ if self.acc is not None else torch.nn.utils.clip_grad_norm_
        return float(clip(params, float("inf") if max_norm is None else max_norm))

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    """``random.setstate`` wants tuples; a checkpoint may give them back as lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass
class _Run:
    """One call of :func:`fit`: what it trains and where, and the last point it could be resumed from."""

    recipe: Recipe
    fc: FitConfig
    run_dir: Path
    opt: torch.optim.Optimizer
    params: list
    procs: _Processes
    log: object
    state: FitState = dataclasses.field(default_factory=FitState)
    snapshot: dict | None = None  # the generators' states at the last resumable point
    pending_eval: bool = False  # that point is a finished step whose evaluation has not finished
    updating: bool = False  # inside optimizer.step(): the weights are half-updated, not resumable
    saved_step: int = 0  # the step last.pt holds

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "last.pt"

    def say(self, msg: str) -> None:
        if self.procs.main:
            self.log(msg)

    def mark(self, pending_eval: bool) -> None:
        """A resumable point: the weights match ``state.step`` finished steps."""
        self.snapshot, self.pending_eval = _rng_state(), pending_eval


def fit(recipe: Recipe, fc: FitConfig, run_dir, *, log=print, on_step=None, accelerator=None,
        progress: bool = False, desc: str = "train") -> FitState:
    """Train ``recipe`` as ``fc`` says in ``run_dir`` (resuming from ``run_dir/last.pt`` if it is there).

    ``on_step(step)`` is called after every finished step (tests use it to interrupt); ``accelerator``: an
    ``accelerate.Accelerator`` created with ``gradient_accumulation_steps=1`` (the loop accumulates itself).
    Returns the counters; the best trainee is in ``run_dir/best``.
    """
    run = _start(recipe, fc, Path(run_dir), log, accelerator)
    recipe.train_mode()
    bar = progress_bar(total=fc.steps, initial=run.state.step, desc=desc, unit="step", enabled=progress and run.procs.main)
    try:
        if run.pending_eval:  # interrupted during the evaluation of the step last.pt holds
            _evaluate(run)
            _save_last(run)
        while run.state.step < fc.steps:
            t0 = time.time()
            skipped, loss, gnorm, stats = _train_step(run)
            run.state.elapsed += time.time() - t0
            bar.set_postfix(loss="nan" if skipped else f"{loss:.3f}")
            bar.update(1)
            _after_step(run, skipped, loss, gnorm, stats)
            if on_step is not None:
                on_step(run.state.step)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted(run)) from None
    finally:
        bar.close()
    return run.state


def _start(recipe: Recipe, fc: FitConfig, run_dir: Path, log, accelerator) -> _Run:
    """The optimiser (each group remembers its peak rate as ``base_lr``) and the state to start from."""
    opt = recipe.optimizer(fc)
    for g in opt.param_groups:
        g.setdefault("base_lr", g["lr"])
    run = _Run(recipe, fc, run_dir, opt, [p for g in opt.param_groups for p in g["params"]], _Processes(accelerator),
               log)
    run.state.best, run.state.best_step = _best_so_far(run_dir / "best")
    if run.ckpt.exists():
        _resume(run)
    else:
        run.mark(pending_eval=False)
    return run


def _best_so_far(best: Path) -> tuple[float | None, int | None]:
    if not best.exists():
        return None, None
    if not (best / "fit.json").is_file():
        raise ConfigError(f"{best} was written by an older qdlib (it has no fit.json): move it away or delete it, "
                          f"so that a new best checkpoint is not compared with an unknown score")
    info = json.loads((best / "fit.json").read_text())
    return info["score"], info["step"]


def _resume(run: _Run) -> None:
    """Weights, optimiser, counters and random generators from ``last.pt``, after the recipe accepted its settings."""
    saved = torch_load_safe(run.ckpt)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        keys = sorted(saved)[:6] if isinstance(saved, dict) else type(saved).__name__
        raise ConfigError(f"{run.ckpt} was written by an older qdlib training loop ({keys}); this one cannot resume "
                          f"it: move it away or delete it to start the run over")
    run.recipe.check_resume(saved["config"], run.fc, run.ckpt)
    run.recipe.load_state_dict(saved["trainee"])
    run.opt.load_state_dict(saved["optimizer"])
    run.state = FitState(**saved["state"])
    run.state.best, run.state.best_step = _best_so_far(run.run_dir / "best")
    run.saved_step = run.state.step
    _set_rng_state(saved["rng"])
    run.mark(saved["pending_eval"])
    run.say(f"resuming from step {run.state.step} of {run.fc.steps}")
    if saved["steps"] != run.fc.steps and run.procs.main:  # the run length changed: the cosine is re-stretched
        run.say(f"the schedule now ends at step {run.fc.steps} instead of {saved['steps']}")
        append_jsonl(run.run_dir / "log.jsonl", {"step": run.state.step, "event": "schedule",
                                                 "total_steps": run.fc.steps, "previous_total_steps": saved["steps"]})


def _train_step(run: _Run) -> tuple[bool, float, float, dict]:
    """One optimizer step over ``accumulation`` micro-batches with the NaN guard; ``(skipped, loss, norm, stats)``."""
    fc, st, procs = run.fc, run.state, run.procs
    for g in run.opt.param_groups:
        g["lr"] = group_lr(fc, g["base_lr"], st.step)
    autocast = autocast_for(run.recipe.device, fc.bf16)
    skipped, total, stats = False, 0.0, {}
    for micro in range(fc.accumulation):
        loss, stats = run.recipe.loss(run.recipe.batch(st.step, micro), autocast)
        if procs.any_bad(loss):
            skipped = True
            continue
        procs.backward(loss / fc.accumulation if fc.accumulation > 1 else loss)
        total += loss.item() / fc.accumulation
    gnorm = float("nan")
    if not skipped:
        gnorm = procs.clip(run.params, fc.max_grad_norm)
        skipped = not math.isfinite(gnorm)
    if not skipped:
        run.updating = True
        run.opt.step()
        run.updating = False
    run.opt.zero_grad(set_to_none=True)
    st.step += 1
    run.mark(pending_eval=_eval_due(run))
    return skipped, total, gnorm, stats


def _eval_due(run: _Run) -> bool:
    return run.state.step == run.fc.steps or bool(run.fc.eval_every and run.state.step % run.fc.eval_every == 0)


def _after_step(run: _Run, skipped: bool, loss: float, gnorm: float, stats: dict) -> None:
    """Log the step, count a skipped one (stop after too many in a row), evaluate and checkpoint when due."""
    fc, st = run.fc, run.state
    due_eval = run.pending_eval
    if run.procs.main:
        lr = group_lr(fc, run.opt.param_groups[0]["base_lr"], st.step)
        append_jsonl(run.run_dir / "log.jsonl", {"step": st.step, "loss": None if skipped else round(loss, 6), "lr": lr,
                                                 "grad_norm": round(gnorm, 4), "skipped": skipped, **stats,
                                                 "elapsed_s": round(st.elapsed, 1)})
    st.bad_in_row = st.bad_in_row + 1 if skipped else 0
    st.bad_steps += skipped
    if skipped:
        run.say(f"step {st.step}: non-finite loss or gradient, step skipped ({st.bad_in_row} in a row)")
    if st.bad_in_row > fc.max_bad_steps:
        _save_last(run)
        raise TrainingStopped(f"{st.bad_in_row} steps in a row had a non-finite loss or gradient (max_bad_steps="
                              f"{fc.max_bad_steps}); lower the learning rate or check the data. The last good "
                              f"weights are in {run.ckpt}")
    if due_eval:
        _evaluate(run)
    if due_eval or st.step % fc.checkpoint_every == 0:
        _save_last(run)


def _evaluate(run: _Run) -> None:
    """Score the trainee (main process); replace ``best/`` when the score is higher than every earlier one."""
    st = run.state
    if run.procs.main:
        score, info = run.recipe.score()
        append_jsonl(run.run_dir / "log.jsonl", {"step": st.step, "eval": info, "score": score,
                                                 "elapsed_s": round(st.elapsed, 1)})
        if st.best is None or score > st.best:
            with atomic_dir(run.run_dir / "best") as tmp:
                run.recipe.save(tmp, {"score": score, "step": st.step, "eval": info, "elapsed_s": st.elapsed})
                write_json_atomic(tmp / "fit.json", {"score": score, "step": st.step})
            st.best, st.best_step = score, st.step
    run.recipe.train_mode()
    run.mark(pending_eval=False)


def _save_last(run: _Run) -> None:
    """Write ``last.pt`` atomically (main process) as of the last resumable point; every process waits for it."""
    if run.procs.main:
        torch_save_atomic({"format": FORMAT, "trainee": run.recipe.state_dict(), "optimizer": run.opt.state_dict(),
                           "state": dataclasses.asdict(run.state), "rng": run.snapshot,
                           "pending_eval": run.pending_eval, "steps": run.fc.steps, "config": run.recipe.config(),
                           "step": run.state.step}, run.ckpt)
    run.saved_step = run.state.step
    run.procs.barrier()


def _interrupted(run: _Run) -> str:
    """Save what Ctrl-C left resumable and say how to go on."""
    st = run.state
    if not run.updating:
        with contextlib.suppress(Exception):  # a second Ctrl-C or a full disk: the last checkpoint stays
            _save_last(run)
    msg = f"interrupted at step {st.step} of {run.fc.steps}; rerun the same call to resume from {run.ckpt}"
    if run.saved_step != st.step:  # Ctrl-C inside an optimizer update: the last checkpoint is older
        msg += f" (step {run.saved_step})"
    run.say(msg)
    return msg
