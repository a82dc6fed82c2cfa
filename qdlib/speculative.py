"""Speculative decoding, readable top to bottom (notebook 05).

    >>> out, stats = speculative_generate(teacher, draft, input_ids, gamma=4)   # doctest: +SKIP
    >>> stats.tokens_per_target_call                                             # doctest: +SKIP
    3.1

One round (Leviathan et al. 2023; Chen et al. 2023):

1. the draft proposes ``gamma`` tokens one by one, with its own KV cache;
2. the target scores the last accepted token plus all ``gamma`` proposals in
   **one** forward pass, with its KV cache;
3. greedy (temperature 0): proposals are accepted while they equal the
   target's argmax; sampling: proposal x ~ q is accepted with probability
   min(1, p(x) / q(x)), and on rejection a token is drawn from the residual
   norm(max(0, p - q)); when all ``gamma`` are accepted a bonus token comes
   from the target's last distribution;
4. both caches are cut back to the accepted length, so nothing is recomputed.

The output therefore follows the target exactly: greedy output equals the
target's greedy output, and sampled output has the target's distribution
(after the same temperature / top-k / top-p processing).

:func:`generate_plain` runs the same machinery without a draft: the fair
baseline for timing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------- distributions


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


# ----------------------------------------------------------------------------- statistics


@dataclass
class SpecStats:
    """What happened during one generation.

    Attributes:
        new_tokens: tokens generated (excluding the prompt).
        target_calls: forward passes of the target, the prompt prefill included.
        prefill_calls: those of ``target_calls`` that only filled the cache (produced no token).
        draft_calls: forward passes of the draft (one per proposed token, plus its prefill).
        proposed: draft tokens proposed in all rounds (including those after a
            rejection, which the target never gets to judge).
        accepted: draft tokens accepted.
        proposed_at, accepted_at: per draft position j (0..gamma-1), how often a
            proposal there was checked / accepted; ``accepted_at[j] / proposed_at[j]``
            is the acceptance rate at depth j. ``sum(proposed_at) <= proposed``.
        rounds: draft-then-verify rounds.
        time_draft, time_verify, time_total: seconds spent proposing, verifying, in all.
        trace: one ``(proposals, n_accepted, next_token)`` tuple per round, for the
            token-by-token view (``next_token`` is the target's correction, or the
            bonus token when all proposals were accepted; None when EOS or the
            budget ended the round first).
    """

    new_tokens: int = 0
    target_calls: int = 0
    prefill_calls: int = 0
    draft_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    proposed_at: list = field(default_factory=list)
    accepted_at: list = field(default_factory=list)
    rounds: int = 0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_total: float = 0.0
    trace: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """New tokens per verification call (the prefill excluded)."""
        calls = self.target_calls - self.prefill_calls
        return self.new_tokens / calls if calls > 0 else 0.0

    @property
    def time_other(self) -> float:
        """Seconds outside draft and verification forwards: acceptance logic, bookkeeping."""
        return max(0.0, self.time_total - self.time_draft - self.time_verify)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0


# ----------------------------------------------------------------------------- checks


def _check_inputs(target, input_ids, max_new_tokens, temperature, top_p, top_k, gamma=1, draft=None):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (1, T) tensor of token ids, got {getattr(input_ids, 'shape', input_ids)!r}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"batch size {input_ids.shape[0]} is not supported; speculative decoding here runs one "
                         f"sequence at a time (batch size 1)")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma={gamma!r} must be an integer >= 1 (draft tokens per round)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be a non-negative integer (0 = off)")
    ctx = getattr(target.config, "max_position_embeddings", None)
    if ctx is not None and input_ids.shape[1] + max_new_tokens > ctx:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {ctx} tokens")
    if draft is not None and not isinstance(draft, torch.nn.Module):
        if not callable(getattr(draft, "propose", None)):
            raise TypeError(f"draft must be a causal LM or a drafter with a propose(context, k) method "
                            f"(e.g. qdlib.NgramDrafter), got {type(draft).__name__}")
    elif draft is not None:
        tv, dv = target.config.vocab_size, draft.config.vocab_size
        if tv != dv:
            raise ValueError(f"draft vocabulary ({dv}) differs from the target's ({tv}); the draft must use the "
                             f"target's tokenizer")
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            a, b = getattr(target.config, key, None), getattr(draft.config, key, None)
            if a is not None and b is not None and a != b:
                raise ValueError(f"draft {key}={b} differs from the target's {a}: the tokenizers do not match")


def _eos_set(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos_token_id is None:
            eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def _rollback(cache, keep: int) -> None:
    """Cut a KV cache back to its first ``keep`` positions (transformers 5: crop takes a negative count)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def _pick(probs_or_logits: torch.Tensor, greedy: bool, generator) -> int:
    if greedy:
        return int(probs_or_logits.argmax(-1))
    return int(torch.multinomial(probs_or_logits, 1, generator=generator))


# ----------------------------------------------------------------------------- decoding


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, *, gamma: int = 4, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
                         generator: torch.Generator | None = None, confidence_threshold: float | None = None):
    """Generate with ``draft`` proposing and ``target`` verifying; returns ``(output_ids, SpecStats)``.

    ``output_ids`` is ``(1, T_prompt + new)`` like ``generate``'s output.
    ``temperature=0`` is greedy; otherwise tokens are sampled after temperature,
    top-k and top-p, with ``generator`` for repeatability. ``eos_token_id=None``
    means the target's end-of-text token; generation stops right after it or at
    ``max_new_tokens``. ``confidence_threshold`` (going beyond fixed gamma) stops
    a round's drafting early once the draft's top probability falls below it.
    The draft uses whatever knowledge cache is attached to it.

    ``draft`` may also be a model-free drafter with ``propose(context, k) -> list``
    (:class:`qdlib.NgramDrafter`): its proposals are deterministic, so q is one-hot
    and the same acceptance rule applies; a round with no proposal is a plain
    target step.
    """
    from transformers import DynamicCache

    _check_inputs(target, input_ids, max_new_tokens, temperature, top_p, top_k, gamma, draft)
    if confidence_threshold is not None and not 0 <= confidence_threshold <= 1:
        raise ValueError(f"confidence_threshold={confidence_threshold} must be in [0, 1]")
    greedy = temperature == 0
    eos = _eos_set(target, eos_token_id)
    is_model = isinstance(draft, torch.nn.Module)
    dev_t = target.device
    dev_d = draft.device if is_model else dev_t
    V = target.config.vocab_size
    stats = SpecStats(proposed_at=[0] * gamma, accepted_at=[0] * gamma)
    t_start = time.perf_counter()
    seq = input_ids[0].tolist()
    n_prompt = len(seq)

    # Prefill both caches with all prompt tokens but the last: each cache always holds seq[:-1] or less.
    t_cache = DynamicCache(config=target.config)
    d_cache = DynamicCache(config=draft.config) if is_model else None
    if n_prompt > 1:
        t0 = time.perf_counter()
        target(input_ids=input_ids[:, :-1].to(dev_t), cache=t_cache, use_cache=True, logits_to_keep=1)
        stats.time_verify += time.perf_counter() - t0
        stats.target_calls += 1
        stats.prefill_calls += 1
        if is_model:
            t0 = time.perf_counter()
            draft(input_ids=input_ids[:, :-1].to(dev_d), cache=d_cache, use_cache=True, logits_to_keep=1)
            stats.time_draft += time.perf_counter() - t0
            stats.draft_calls += 1

    def dist(logits):  # (V,) -> probabilities, or the logits themselves when greedy
        return logits if greedy else process_logits(logits, temperature, top_k, top_p)

    while len(seq) - n_prompt < max_new_tokens:
        remaining = max_new_tokens - (len(seq) - n_prompt)
        g = min(gamma, remaining)  # never propose past the budget
        # 1. draft proposes g tokens (feeding whatever its cache lacks, then one token at a time)
        t0 = time.perf_counter()
        proposals, qs = [], []
        if is_model:
            feed = seq[d_cache.get_seq_length():]
            for j in range(g):
                logits = draft(input_ids=torch.tensor([feed], device=dev_d), cache=d_cache, use_cache=True,
                               logits_to_keep=1).logits[0, -1]
                stats.draft_calls += 1
                q = dist(logits)
                x = _pick(q, greedy, generator)
                proposals.append(x)
                qs.append(q)
                feed = [x]
                if confidence_threshold is not None and j < g - 1:
                    conf = (torch.softmax(logits.float(), -1) if greedy else q).max().item()
                    if conf < confidence_threshold:
                        break
        else:  # a model-free drafter: deterministic proposals, so q is one-hot
            proposals = [int(x) for x in draft.propose(seq, g)][:g]
            if not greedy:
                qs = [torch.nn.functional.one_hot(torch.tensor(x), V).float() for x in proposals]
            stats.draft_calls += 1
        stats.time_draft += time.perf_counter() - t0
        g = len(proposals)

        # 2. target scores the last accepted token + all proposals in one pass
        t0 = time.perf_counter()
        verify_in = seq[t_cache.get_seq_length():] + proposals
        logits = target(input_ids=torch.tensor([verify_in], device=dev_t), cache=t_cache, use_cache=True,
                        logits_to_keep=g + 1).logits[0]  # (g + 1, V)
        stats.target_calls += 1
        stats.time_verify += time.perf_counter() - t0

        # 3. accept a prefix of the proposals, then one token from the target
        n = 0
        next_token = None
        target_top = logits.argmax(-1).tolist() if greedy else None  # one argmax for all g + 1 rows
        for j in range(g):
            stats.proposed_at[j] += 1
            if greedy:
                ok = proposals[j] == target_top[j]
            else:
                p = process_logits(logits[j], temperature, top_k, top_p)
                x = torch.tensor([proposals[j]], device=p.device)
                u = torch.rand(1, generator=generator).to(p.device)
                ok_t, tok = accept_or_resample(p[None], qs[j].to(p.device)[None], x, u, generator)
                ok = bool(ok_t)
                if not ok:
                    next_token = int(tok)
            if not ok:
                break
            stats.accepted_at[j] += 1
            n += 1
        if next_token is None:  # greedy correction / bonus, or the sampled bonus after full acceptance
            next_token = target_top[n] if greedy else _pick(dist(logits[n]), greedy, generator)
        stats.proposed += g
        stats.accepted += n
        stats.rounds += 1
        new = proposals[:n] + [next_token]

        # stop at EOS and at the budget
        for i, tok in enumerate(new):
            if tok in eos:
                new = new[: i + 1]
                break
        new = new[:remaining]
        if len(new) == n + 1:
            stats.trace.append((proposals, n, next_token))
        else:  # cut short by EOS or the budget: only the kept draft tokens, no target token
            stats.trace.append((proposals[: len(new)], len(new), None))
        seq += new
        # 4. roll both caches back to the accepted prefix (they must not hold more than seq[:-1])
        _rollback(t_cache, len(seq) - 1)
        if is_model:
            _rollback(d_cache, len(seq) - 1)
        if new[-1] in eos:
            break

    stats.new_tokens = len(seq) - n_prompt
    stats.time_total = time.perf_counter() - t_start
    stats.proposed_at, stats.accepted_at = stats.proposed_at[:gamma], stats.accepted_at[:gamma]
    return torch.tensor([seq], device=input_ids.device), stats


@torch.no_grad()
def generate_plain(target, input_ids: torch.Tensor, *, max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, eos_token_id=None, generator: torch.Generator | None = None):
    """One target call per token with the same machinery: the fair baseline. Returns ``(output_ids, SpecStats)``."""
    from transformers import DynamicCache

    _check_inputs(target, input_ids, max_new_tokens, temperature, top_p, top_k)
    greedy = temperature == 0
    eos = _eos_set(target, eos_token_id)
    stats = SpecStats()
    t_start = time.perf_counter()
    seq = input_ids[0].tolist()
    n_prompt = len(seq)
    cache = DynamicCache(config=target.config)
    feed = seq
    while len(seq) - n_prompt < max_new_tokens:
        t0 = time.perf_counter()
        logits = target(input_ids=torch.tensor([feed], device=target.device), cache=cache, use_cache=True,
                        logits_to_keep=1).logits[0, -1]
        stats.time_verify += time.perf_counter() - t0
        stats.target_calls += 1
        tok = _pick(logits if greedy else process_logits(logits, temperature, top_k, top_p), greedy, generator)
        seq.append(tok)
        feed = [tok]
        if tok in eos:
            break
    stats.new_tokens = len(seq) - n_prompt
    stats.time_total = time.perf_counter() - t_start
    return torch.tensor([seq], device=input_ids.device), stats


def hf_generate_kwargs(input_ids: torch.Tensor, tokenizer, *, max_new_tokens: int = 64, temperature: float = 0.0) -> dict:
    """Arguments that make ``model.generate(input_ids, **kw)`` decode as qdlib's loops do (notebook 06).

    Greedy at temperature 0; otherwise plain sampling at ``temperature`` (no top-k / top-p), with the
    model's generation-config defaults overridden so nothing else filters the distribution.

    >>> kw = hf_generate_kwargs(torch.tensor([[1, 2]]), None, max_new_tokens=8)
    >>> kw["do_sample"], kw["max_new_tokens"], kw["top_k"], kw["attention_mask"].tolist()
    (False, 8, None, [[1, 1]])
    """
    pad = None if tokenizer is None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                          else tokenizer.eos_token_id)
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad,
              attention_mask=torch.ones_like(input_ids))
    if temperature > 0:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    return kw
