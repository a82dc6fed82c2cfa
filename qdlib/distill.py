"""Distillation losses (notebook 04).

The draft learns the teacher's next-token distributions:

    loss = kl_weight * T^2 * KL(teacher_T || draft_T) + (1 - kl_weight) * CE(draft, data)

with temperature T and padding masked out. The optional acceptance objective
is the total-variation distance ``1 - sum_x min(p, q)``: exactly one minus the
speculative-sampling acceptance probability (DistillSpec, Zhou et al. 2023).
A run's settings are :class:`qdlib.settings.DistillConfig` (YAML files, ``qd distill --set``);
:mod:`qdlib.trainer` trains with them.

    >>> logits = torch.zeros(1, 2, 5)
    >>> float(kl_loss(logits, logits)), float(tvd_loss(logits, logits))
    (0.0, 0.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import divergence
from .settings.names import OBJECTIVES


# ----------------------------------------------------------------------------- losses


def kl_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over unmasked positions of T^2 * KL(teacher_T || draft_T); logits ``(B, T, V)``, mask ``(B, T)``."""
    lt = torch.log_softmax(teacher_logits.float() / temperature, -1)  # (B, T, V)
    ld = torch.log_softmax(draft_logits.float() / temperature, -1)  # (B, T, V)
    kl = divergence.kl(lt, ld)  # (B, T)
    return temperature**2 * _masked_mean(kl, mask)


def tvd_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean of the total-variation distance 1 - sum_x min(p, q): the rejection probability."""
    p = torch.softmax(teacher_logits.float() / temperature, -1)
    q = torch.softmax(draft_logits.float() / temperature, -1)
    return _masked_mean(1 - torch.minimum(p, q).sum(-1), mask)


def ce_loss(draft_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the draft on the data's next tokens (labels already shifted to the logits' positions)."""
    ce = F.cross_entropy(draft_logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return _masked_mean(ce, mask)


def distill_loss(draft_logits, teacher_logits, labels, mask=None, *, kl_weight: float = 0.8,
                 temperature: float = 1.0, objective: str = "kl") -> torch.Tensor:
    """``kl_weight * divergence + (1 - kl_weight) * CE``; the divergence is T^2 KL or TVD."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    div = kl_loss if objective == "kl" else tvd_loss
    return kl_weight * div(draft_logits, teacher_logits, mask, temperature) + (1 - kl_weight) * ce_loss(
        draft_logits, labels, mask)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)
