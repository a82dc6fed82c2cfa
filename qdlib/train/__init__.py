"""One training loop for every trainee: :func:`fit` runs a :class:`Recipe` under a :class:`FitConfig`.

The recipes live with their trainees (:mod:`qdlib.feature_train`, :mod:`qdlib.trainer`); this package holds what
they share: the loop (:mod:`.loop`), the recipe protocol with the one schedule (:mod:`.recipe`), a mixture sampler
(:mod:`.data`), and a distilled draft's evaluation and card (:mod:`.evaluate`, :mod:`.cards`).

A setting the loop cannot use is refused by name:

    >>> FitConfig(steps=0, learning_rate=1e-3)
    Traceback (most recent call last):
    ...
    qdlib.errors.ConfigError: steps=0 must be an integer >= 1
"""

from .loop import FORMAT, FitState, TrainingStopped, fit
from .recipe import FitConfig, Recipe, autocast_for, group_lr, lr_factor

__all__ = ["FORMAT", "FitConfig", "FitState", "Recipe", "TrainingStopped", "autocast_for", "fit", "group_lr", "lr_factor"]
