"""The one loop's optimiser set-up and resume check (:func:`qdlib.train.fit` uses both for every recipe).

Every recipe trains with AdamW, weight decay on matrices only, and resumes from a
checkpoint only when the settings that shape the weights are unchanged:

    >>> config_changes({"learning_rate": 1e-3, "steps": 10}, {"learning_rate": 3e-3, "steps": 20},
    ...                {"learning_rate": 1e-3, "steps": 10}, may_change=("steps",))
    {'learning_rate': (0.001, 0.003)}
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..schema import renamed

BETAS = (0.9, 0.95)


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, *,
          scaled: Iterable[torch.nn.Parameter] = (), scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on matrices and embeddings (``dim >= 2``), none on norms and biases.

    The parameters in ``scaled`` (a subset of ``params``) learn at ``scale * lr`` in groups of their own (a learning
    rate schedule multiplies every group's rate by the same factor, so the ratio holds throughout).

    >>> opt = adamw(torch.nn.Linear(3, 2).parameters(), lr=1e-3, weight_decay=0.1)
    >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    [(1, 0.1), (1, 0.0)]
    >>> lin = torch.nn.Linear(3, 2)
    >>> [(len(g["params"]), g["lr"]) for g in adamw(lin.parameters(), 1e-3, 0.1, scaled=[lin.bias], scale=10).param_groups]
    [(1, 0.001), (1, 0.01)]
    """
    params = list(params)
    special = {id(p) for p in scaled} if scale != 1.0 else set()

    def two_groups(members, rate):  # weight decay on matrices only
        return [{"params": [p for p in members if p.dim() >= 2], "weight_decay": weight_decay, "lr": rate},
                {"params": [p for p in members if p.dim() < 2], "weight_decay": 0.0, "lr": rate}]

    groups = two_groups([p for p in params if id(p) not in special], lr)
    if special:  # groups of their own, only when there is something to scale (and then no empty group)
        groups += two_groups([p for p in params if id(p) in special], lr * scale)
        groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, wanted: dict, defaults: dict, may_change: Iterable[str] = ()) -> dict:
    """Settings that differ between a checkpoint's config and the requested one: ``{key: (saved, wanted)}``.

    Sections (nested dicts) are compared key by key, named ``"section.key"``. A key the
    checkpoint lacks (one added to the config after it was written) counts as its default,
    so a run resumes when only such keys, left at their defaults, are new; a key since renamed
    (:data:`qdlib.schema.RENAMED`) is compared under its new name. Keys in
    ``may_change`` (epochs, evaluation, bookkeeping) are ignored. Empty: the run may resume.

    >>> config_changes({"t": {"rate": 1.0}}, {"t": {"rate": 1.0, "new": 0}}, {"t": {"rate": 0.5, "new": 0}})
    {}
    >>> config_changes({"t": {"rate": 1.0}}, {"t": {"rate": 1.0, "new": 5}}, {"t": {"rate": 0.5, "new": 0}})
    {'t.new': (0, 5)}
    >>> config_changes({"lr": 1.0, "bf16": None}, {"learning_rate": 1.0, "mixed_precision": "auto"}, {})
    {}
    """
    skip = set(may_change)
    old = {k: v for k, v in {**_flat(defaults), **_flat(renamed(saved))}.items() if k not in skip}
    new = {k: v for k, v in _flat(wanted).items() if k not in skip}
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
