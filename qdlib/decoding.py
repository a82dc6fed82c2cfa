"""The pieces of a decoding rule that every loop shares: distributions, one pick, one acceptance step.

:func:`accept_round` is the whole acceptance step of speculative decoding as one
pure function (no model, no cache): given the draft's proposals, the target's
logits at the ``g + 1`` verified positions and, when sampling, the draft's
distributions, it returns how many proposals are kept and the target's token
that follows them.

    >>> s = Settings()                                   # greedy
    >>> logits = torch.tensor([[0., 5.], [5., 0.], [0., 5.]])   # target argmax: 1, 0, 1
    >>> accept_round([1, 1], logits, None, s)            # first kept, second rejected, corrected to 0
    (1, 0)
    >>> accept_round([1, 0], logits, None, s)            # both kept, bonus token 1
    (2, 1)

:func:`count_positions` counts the token positions a model runs through while a block runs, which is how
notebook 00 shows what a KV cache saves.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Turn logits ``(..., V)`` into probabilities after temperature, top-k and top-p (float32).

    The same function is applied to the target's and the draft's logits, so the
    accepted tokens follow the target's *processed* distribution.

    >>> process_logits(torch.tensor([2.0, 1.0, 0.0]), top_k=1).tolist()
    [1.0, 0.0, 0.0]
    """
    logits = logits.float() / max(temperature, 1e-8)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens before it already reach top_p (the top token is always kept)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule, vectorised over a leading batch of draws.

    Args:
        p, q: target and draft probabilities ``(N, V)``, or ``(1, V)`` shared by all draws;
        x: proposals drawn from q ``(N,)``; u: uniform numbers in [0, 1) ``(N,)``.
    Returns:
        ``(accepted (N,) bool, token (N,))``: the proposal where accepted, else a
        draw from norm(max(0, p - q)).
    """
    N = x.shape[0]
    px = p.expand(N, -1).gather(-1, x[:, None]).squeeze(-1)  # (N,)
    qx = q.expand(N, -1).gather(-1, x[:, None]).squeeze(-1)  # (N,)
    accepted = u * qx < px  # u < p/q without dividing by zero (qx > 0 for a drawn x)
    residual = (p - q).clamp(min=0)  # (N or 1, V)
    mass = residual.sum(-1, keepdim=True)  # (N or 1, 1)
    # where p == q the residual is empty; rejection then has probability 0, any fallback is fine
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
    if residual.shape[0] == 1:  # one shared residual: draw all N redraws from it at once
        resampled = torch.multinomial(residual[0], N, replacement=True, generator=generator)  # (N,)
    else:
        resampled = torch.multinomial(residual, 1, generator=generator).squeeze(-1)  # (N,)
    return accepted, torch.where(accepted, x, resampled)


@dataclass
class Settings:
    """How tokens are chosen: greedy at ``temperature`` 0, else sampling after temperature / top-k / top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        """What a pick draws from: the logits themselves when greedy, else processed probabilities."""
        return logits if self.greedy else process_logits(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, dist: torch.Tensor) -> int:
        if self.greedy:
            return int(dist.argmax(-1))
        return int(torch.multinomial(dist, 1, generator=self.generator))


def accept_round(proposals: list[int], target_logits: torch.Tensor, qs: list[torch.Tensor] | None,
                 s: Settings) -> tuple[int, int]:
    """One acceptance step: ``(number of proposals kept, the target's next token)``.

    ``target_logits`` ``(g + 1, V)``: the target's logits after the last accepted token and after each of the
    ``g`` proposals. Greedy: proposals are kept while they equal the target's argmax, and the next token is
    the target's argmax after them (a correction, or the bonus token when all are kept). Sampling: proposal
    ``x ~ q`` is kept with probability min(1, p(x) / q(x)); the first rejection draws the next token from
    norm(max(0, p - q)); after full acceptance the bonus token is drawn from the target's last distribution.
    """
    g = len(proposals)
    if s.greedy:
        top = target_logits.argmax(-1).tolist()  # one argmax for all g + 1 rows
        n = 0
        while n < g and proposals[n] == top[n]:
            n += 1
        return n, top[n]
    for j in range(g):
        p = s.dist(target_logits[j])
        x = torch.tensor([proposals[j]], device=p.device)
        u = torch.rand(1, generator=s.generator).to(p.device)
        ok, tok = accept_or_resample(p[None], qs[j].to(p.device)[None], x, u, s.generator)
        if not bool(ok):
            return j, int(tok)
    return g, s.pick(s.dist(target_logits[g]))


@dataclass
class PositionCount:
    """Token positions a model embedded, one entry per forward call (see :func:`count_positions`)."""

    calls: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.calls)


@contextmanager
def count_positions(model: torch.nn.Module) -> Iterator[PositionCount]:
    """Count the token positions that ``model`` runs through while the ``with`` block runs.

    A forward hook on the input embedding (``model.get_input_embeddings()``, or ``model`` itself when it is an
    ``nn.Embedding``) records how many token ids each forward call embeds (batch x length): a call without a
    KV cache embeds the whole sequence again, a call with one only the new tokens. The hook is removed on exit.

    >>> emb = torch.nn.Embedding(10, 4)
    >>> with count_positions(emb) as seen:
    ...     _ = emb(torch.tensor([[1, 2, 3]]))   # a prefill: the three prompt tokens
    ...     _ = emb(torch.tensor([[4]]))         # then one new token
    >>> seen.calls, seen.total
    ([3, 1], 4)
    """
    embed = model if isinstance(model, torch.nn.Embedding) else model.get_input_embeddings()
    seen = PositionCount()
    handle = embed.register_forward_hook(lambda module, args, output: seen.calls.append(args[0].numel()))
    try:
        yield seen
    finally:
        handle.remove()
