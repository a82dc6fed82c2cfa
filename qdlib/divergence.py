"""The one Kullback-Leibler divergence of qdlib, from log-probabilities (it imports only torch).

Every trainer, evaluation and layer score computes KL(p || q) with this function, so they agree to the last bit:

    >>> lp = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    >>> kl(lp, lp).item()
    0.0
    >>> round(kl(lp, torch.log(torch.full((1, 3), 1 / 3))).item(), 4)
    0.5743
"""

from __future__ import annotations

import torch


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position: ``sum_x p(x) (log p(x) - log q(x))`` over the last (vocabulary) axis.

    ``lp``, ``lq``: log-probabilities of the same shape ``(..., V)``; returns ``(...)``. ``p`` is the reference
    (the teacher, the full model), ``q`` the approximation (the draft, the model with a layer skipped).
    """
    return (lp.exp() * (lp - lq)).sum(-1)  # (...)
