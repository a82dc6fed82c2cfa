"""How close is a draft to its teacher? Distribution metrics and per-layer views (notebook 01).

For teacher distribution p and draft distribution q at each position:

- ``kl``: KL(p || q) in nats, the distillation target;
- ``agreement``: share of positions where argmax q == argmax p (teacher-forced):
  alpha for greedy decoding;
- ``alpha``: mean of sum_x min(p(x), q(x)) = 1 - TV(p, q), the expected
  acceptance probability of one proposal (Leviathan et al. 2023).

(The README's Glossary: the *acceptance rate*, accepted / proposed in a run, is a third quantity.)

    >>> import torch
    >>> p = torch.tensor([[[2.0, 0.0, 0.0]]])
    >>> m = distribution_metrics(p, p)
    >>> round(m["kl"], 6), m["agreement"], round(m["alpha"], 6)
    (0.0, 1.0, 1.0)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from . import divergence
from .sampling import first_k_layers, run_layers, sample_layers
from .settings.names import EARLY_EXIT, STRATEGIES


def distribution_sums(lp: torch.Tensor, lq: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Sums of KL(p||q), top-1 agreement and sum_x min(p, q) over the positions where ``mask`` is True, and their count ``n``.

    ``lp``, ``lq``: log-probabilities ``(B, T, V)``; ``mask``: ``(B, T)`` bool. Sums (not means) so that
    evaluation in chunks adds up exactly (``trainer.evaluate_draft``).
    """
    if mask is None:
        mask = torch.ones(lp.shape[:-1], dtype=torch.bool, device=lp.device)
    kl = divergence.kl(lp, lq)  # (B, T)
    alpha = torch.minimum(lp.exp(), lq.exp()).sum(-1)  # (B, T)
    return {"kl": (kl * mask).sum().item(), "agreement": ((lp.argmax(-1) == lq.argmax(-1)) & mask).sum().item(),
            "alpha": (alpha * mask).sum().item(), "n": int(mask.sum())}


def distribution_metrics(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """KL(p||q), top-1 agreement and alpha, averaged over positions (where ``mask`` is True).

    ``p_logits``, ``q_logits``: ``(B, T, V)``; ``mask``: ``(B, T)`` bool.
    """
    lp = torch.log_softmax(p_logits.float(), -1)  # (B, T, V)
    lq = torch.log_softmax(q_logits.float(), -1)  # (B, T, V)
    s = distribution_sums(lp, lq, mask)
    n = max(s["n"], 1)
    return {"kl": s["kl"] / n, "agreement": s["agreement"] / n, "alpha": s["alpha"] / n}


def text_windows(tokenizer, texts: Sequence[str], *, seq_len: int = 128, n: int = 16) -> torch.Tensor:
    """``n`` deterministic windows of ``seq_len`` tokens spread over ``texts``: ``(n, seq_len)``."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        ids += ([eos] if eos is not None else []) + tokenizer(t, add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of {seq_len}")
    ids_t = torch.tensor(ids)
    step = max(1, (len(ids) - seq_len) // max(n - 1, 1))
    starts = [min(i * step, len(ids) - seq_len) for i in range(n)]
    return torch.stack([ids_t[s : s + seq_len] for s in starts])


@torch.no_grad()
def teacher_logits(teacher, batches: torch.Tensor) -> torch.Tensor:
    device = next(teacher.parameters()).device
    return teacher(input_ids=batches.to(device)).logits.float()


@torch.no_grad()
def subset_metrics(teacher, batches: torch.Tensor, layers: Sequence[int], p_logits: torch.Tensor | None = None) -> dict:
    """Metrics of the untrained draft that keeps ``layers`` (computed as the teacher run on those layers)."""
    device = next(teacher.parameters()).device
    if p_logits is None:
        p_logits = teacher_logits(teacher, batches)
    q = run_layers(teacher, batches.to(device), layers)
    return distribution_metrics(p_logits, q)


def strategy_layers(num_layers: int, k: int, strategy: str, scores=None) -> list[int]:
    """Layers for a strategy name, including the early-exit baseline :data:`~qdlib.settings.names.EARLY_EXIT`."""
    if strategy == EARLY_EXIT:
        return first_k_layers(num_layers, k)
    return sample_layers(num_layers, k, strategy, scores=scores if strategy == "importance" else None)


@torch.no_grad()
def compare_strategies(teacher, batches: torch.Tensor, ks: Iterable[int] = (4, 6, 8),
                       strategies: Sequence[str] = STRATEGIES + (EARLY_EXIT,),
                       importance_scores: Sequence[float] | None = None) -> list[dict]:
    """One row per (strategy, k): the kept layers and KL / agreement / alpha of the untrained draft."""
    L = teacher.config.num_hidden_layers
    p = teacher_logits(teacher, batches)
    rows = []
    for k in ks:
        for s in strategies:
            if s == "importance" and importance_scores is None:
                continue
            layers = strategy_layers(L, k, s, importance_scores)
            rows.append({"strategy": s, "k": k, "layers": layers, **subset_metrics(teacher, batches, layers, p)})
    return rows


def format_table(rows: list[dict], digits: int = 3) -> str:
    """A fixed-width text table of :func:`compare_strategies` rows."""
    head = f"{'strategy':<12} {'k':>2}  {'KL':>7} {'agree':>6} {'alpha':>6}  layers"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['strategy']:<12} {r['k']:>2}  {r['kl']:>7.{digits}f} {r['agreement']:>6.{digits}f} "
                     f"{r['alpha']:>6.{digits}f}  {r['layers']}")
    return "\n".join(lines)


@torch.no_grad()
def layer_similarity(teacher, batches: torch.Tensor) -> list[float]:
    """Mean cosine similarity between each layer's input and output hidden state (one value per layer).

    Values near 1 mean the layer changes the residual stream little: a layer a
    draft can more safely drop.
    """
    device = next(teacher.parameters()).device
    L = teacher.config.num_hidden_layers
    _, hidden = run_layers(teacher, batches.to(device), range(L), return_hidden=True)
    return [torch.cosine_similarity(hidden[i].float(), hidden[i + 1].float(), dim=-1).mean().item() for i in range(L)]


@torch.no_grad()
def logit_lens(teacher, batches: torch.Tensor) -> list[float]:
    """KL(final prediction || prediction read off after layer l), for l = 0..L-1.

    The "logit lens": apply the final norm and output head to an intermediate
    hidden state. The last value is 0 by construction.
    """
    device = next(teacher.parameters()).device
    L = teacher.config.num_hidden_layers
    logits, hidden = run_layers(teacher, batches.to(device), range(L), return_hidden=True)
    lp = torch.log_softmax(logits.float(), -1)
    out = []
    dec = teacher.model
    for i in range(L):
        lq = torch.log_softmax(teacher.lm_head(dec.norm(hidden[i + 1])).float(), -1)
        out.append(divergence.kl(lp, lq).mean().item())
    return out


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Leviathan et al. 2023: expected tokens per target call, (1 - a^(g+1)) / (1 - a).

    >>> expected_tokens_per_call(0.0, 4), expected_tokens_per_call(1.0, 4)
    (1.0, 5.0)
    """
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, c: float, verify_cost: float = 1.0) -> float:
    """Leviathan et al. 2023 speed-up over plain decoding: tokens per call / cost of a round.

    One round costs ``gamma`` draft steps (``c`` teacher steps each) plus one
    verification pass of ``gamma + 1`` tokens (``verify_cost`` teacher steps; 1 in
    the paper's idealisation, measured slightly above 1 on a CPU).

    >>> round(expected_speedup(0.8, 4, 0.1), 3)
    2.401
    """
    return expected_tokens_per_call(alpha, gamma) / (gamma * c + verify_cost)


def effective_alpha(tokens_per_call: float, gamma: int) -> float:
    """The effective alpha: the alpha at which :func:`expected_tokens_per_call` equals a measured ``tokens_per_call``
    (a one-number summary of a run that the formula can use; 0 for 1 token per call, 1 for ``gamma + 1``).

    >>> round(effective_alpha(expected_tokens_per_call(0.7, 4), 4), 6)
    0.7
    """
    if not 1.0 <= tokens_per_call <= gamma + 1:
        raise ValueError(f"tokens_per_call={tokens_per_call} must lie in [1, gamma + 1] = [1, {gamma + 1}]")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # expected_tokens_per_call grows with alpha: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens_per_call(mid, gamma) < tokens_per_call else (lo, mid)
    return (lo + hi) / 2


def best_gamma(alpha: float, c: float, verify_cost: float = 1.0, max_gamma: int = 16) -> int:
    """The draft length in 1..``max_gamma`` with the highest :func:`expected_speedup` (notebook 05).

    >>> best_gamma(0.8, 0.1), best_gamma(0.5, 0.5)
    (6, 1)
    """
    return max(range(1, max_gamma + 1), key=lambda g: expected_speedup(alpha, g, c, verify_cost))


def running_mean(values: Sequence[float], k: int) -> list[float]:
    """Mean of each value and the ``k`` before it (fewer at the start), for smoothing loss curves.

    >>> running_mean([1.0, 3.0, 5.0], 1)
    [1.0, 2.0, 4.0]
    """
    return [sum(values[max(0, i - k) : i + 1]) / len(values[max(0, i - k) : i + 1]) for i in range(len(values))]
