"""What :func:`qdlib.train.fit` needs from a trainee: a :class:`Recipe`, and the loop's settings, :class:`FitConfig`.

The loop owns everything that is the same for every trainee (optimiser, schedule, autocast, accumulation,
clipping, the NaN guard, ``last.pt``, ``best/``, the log, Ctrl-C). A recipe supplies only what differs:

========================  ====================================================================================
``parameters()``          the tensors that learn (``optimizer()`` may group them; default: :func:`adamw`)
``batch(step, micro)``    the data of one micro-batch, a function of ``(step, micro)`` only (resume depends on it)
``loss(batch, autocast)`` ``(loss, stats)``: a scalar tensor and numbers for the log
``score()``               ``(value, info)`` on validation data, *higher is better*; ``info`` goes to the log
``save(folder, info)``    write the best trainee into an empty ``folder`` (``info``: score, step, eval, elapsed_s)
``state_dict()``          what ``last.pt`` must hold to continue (weights, counters); ``load_state_dict`` back
``config()``              the settings that shaped the weights; a resume with other ones is refused
========================  ====================================================================================

The schedule, one formula for every trainee: a linear warm-up from 0, then a cosine from the peak down to
``min_lr_ratio`` of it at the last step (``transformers``' ``get_cosine_with_min_lr_schedule_with_warmup``):

    >>> [round(lr_factor(s, warmup=2, total=6, min_ratio=0.1), 3) for s in range(7)]
    [0.0, 0.5, 1.0, 0.868, 0.55, 0.232, 0.1]
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from ..errors import ConfigError
from .optim import adamw, config_changes


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a share of the peak rate.

    Past ``total`` it stays at ``min_ratio`` (a run resumed with fewer steps does not climb back up).
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass
class FitConfig:
    """The loop's settings (each recipe's own config says which of its fields they come from).

    ``max_bad_steps``: how many optimizer steps in a row may have a non-finite loss or gradient norm (each is
    skipped) before training stops. ``eval_every`` 0: evaluate only at the end. ``may_change``: settings of the
    recipe's :meth:`Recipe.config` a resumed run may change (run length, evaluation, bookkeeping).
    ``decay_steps``: where the cosine ends (None: at ``steps``); ``tail_lr``: a constant rate for every step from
    ``decay_steps`` on (the teacher's polish phase; None: the cosine's floor).
    """

    steps: int
    learning_rate: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    accumulation: int = 1
    bf16: bool = False
    max_bad_steps: int = 10
    checkpoint_every: int = 50
    eval_every: int = 0
    may_change: tuple = ()
    decay_steps: int | None = None
    tail_lr: float | None = None

    def __post_init__(self):
        for k in ("steps", "accumulation", "checkpoint_every"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k}={v!r} must be an integer >= 1")
        for k in ("warmup_steps", "eval_every", "max_bad_steps"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{k}={v!r} must be an integer >= 0")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate={self.learning_rate!r} must be a positive number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.decay_steps is not None and not (isinstance(self.decay_steps, int) and 1 <= self.decay_steps <= self.steps):
            raise ConfigError(f"decay_steps={self.decay_steps!r} must be an integer in 1..steps ({self.steps}), or None")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm!r} must be positive, or None for no clipping")


class Recipe:
    """One trainee. Subclasses implement the methods that raise ``NotImplementedError``; the others have defaults.

    ``name`` names the trainee in messages; ``device`` is where the loop's autocast runs.
    """

    name = "model"
    device = torch.device("cpu")

    # ---- what every recipe supplies
    def parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def batch(self, step: int, micro: int) -> Any:
        raise NotImplementedError

    def loss(self, batch: Any, autocast: Callable[[], ContextManager]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def score(self) -> tuple[float, dict]:
        raise NotImplementedError

    def save(self, folder: Path, info: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    # ---- defaults a recipe may override
    def optimizer(self, fc: FitConfig) -> torch.optim.Optimizer:
        """AdamW with weight decay on matrices only (:func:`qdlib.train.optim.adamw`)."""
        return adamw(self.parameters(), fc.learning_rate, fc.weight_decay)

    def config_defaults(self) -> dict:
        """The value of each :meth:`config` key a checkpoint may lack (a setting added after it was written)."""
        return {}

    def check_resume(self, saved: dict, fc: FitConfig, where: Path) -> None:
        """Refuse to continue a run whose checkpoint was written with other settings (a :class:`ConfigError`)."""
        diff = config_changes(saved, self.config(), self.config_defaults(), may_change=fc.may_change)
        if diff:
            raise ConfigError(f"{where} was made with other settings (saved, requested): {diff}; "
                              f"use another run folder or the same settings")

    def train_mode(self) -> None:
        """Put the trainee in training mode (called before the first step and after every evaluation)."""


def group_lr(fc: FitConfig, base_lr: float, step: int) -> float:
    """The learning rate of optimizer step ``step`` for a parameter group whose peak rate is ``base_lr``.

    >>> fc = FitConfig(steps=4, learning_rate=1.0, warmup_steps=1, decay_steps=3, tail_lr=0.01)
    >>> [round(group_lr(fc, 1.0, s), 3) for s in range(4)]
    [0.0, 1.0, 0.5, 0.01]
    """
    end = fc.steps if fc.decay_steps is None else fc.decay_steps
    if fc.tail_lr is not None and step >= end:
        return fc.tail_lr
    return base_lr * lr_factor(step, warmup=fc.warmup_steps, total=end, min_ratio=fc.min_lr_ratio)


def autocast_for(device: torch.device, bf16: bool) -> Callable[[], ContextManager]:
    """A factory of bf16 autocast contexts on ``device`` (or of no-op contexts when ``bf16`` is off)."""
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
