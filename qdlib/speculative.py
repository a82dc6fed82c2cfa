"""Speculative decoding, readable top to bottom (notebook 05).

    >>> out, stats = speculative_generate(teacher, draft, input_ids, gamma=4, max_new_tokens=16, eos_token_id=-1)
    >>> out.shape[1] - input_ids.shape[1], stats.new_tokens, stats.rounds <= 16 < stats.rounds * 5
    (16, 16, True)

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
from typing import NamedTuple

import torch

from .decoding import Settings, accept_or_resample, accept_round, process_logits  # noqa: F401 (public names)
from .drafters import Drafter, Proposal, as_drafter, rollback
from .combined_drafters import Pausing
from .target_engine import verifier
from .trees import TreeShape, accept_tree, chain_parents, tree_depths, tree_mask

# ----------------------------------------------------------------------------- statistics


class Round(NamedTuple):
    """One draft-then-verify round: what was proposed, how many were kept, and the target's token after them
    (its correction, or the bonus token when all were kept; None when EOS or the budget ended the round first)."""

    proposals: list
    n_accepted: int
    next_token: int | None


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
        trace: one :class:`Round` per round, for the token-by-token view.
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


def _check_inputs(target, input_ids, max_new_tokens, temperature, top_p, top_k, gamma=1):
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


def _eos_set(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos_token_id is None:
            eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


_rollback = rollback  # the name the tests use


# ----------------------------------------------------------------------------- decoding


def _draft_defaults(draft, gamma, confidence_threshold, tree, greedy: bool):
    """Explicit arguments win; else the draft's own tuned settings (when its config carries them); else gamma 4.

    ``tree=False`` forces chains; ``tree=None`` takes the draft's tree shape if its config has one, when greedy.
    Sampling stays on chains unless a tree is passed explicitly: a tree is verified with the multi-candidate rule
    for point-mass proposals (it keeps a candidate x with probability p(x)), which accepts far less than the
    chain's rule min(1, p(x) / q(x)) (measured in ``outputs/bench_fast``)."""
    cfg = getattr(draft, "config", None)
    if gamma is None:
        gamma = getattr(cfg, "gamma", None) or 4
    if confidence_threshold is None:
        confidence_threshold = getattr(cfg, "confidence_threshold", None)
    if tree is None:  # the draft's own tree, for greedy decoding only: sampling keeps chains, whose rule uses q
        tree = TreeShape.from_dict(getattr(cfg, "tree", None)) if greedy else None
    elif tree is False:
        tree = None
    elif not isinstance(tree, TreeShape):
        raise ValueError(f"tree={tree!r} must be a qdlib.trees.TreeShape, False (chains) or None (the draft's own)")
    return gamma, confidence_threshold, tree


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, *, gamma: int | None = None, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
                         generator: torch.Generator | None = None, confidence_threshold: float | None = None,
                         tree=None, engine: str = "auto"):
    """Generate with ``draft`` proposing and ``target`` verifying; returns ``(output_ids, SpecStats)``.

    ``output_ids`` is ``(1, T_prompt + new)`` like ``generate``'s output.
    ``temperature=0`` is greedy; otherwise tokens are sampled after temperature,
    top-k and top-p, with ``generator`` for repeatability. ``eos_token_id=None``
    means the target's end-of-text token; generation stops right after it or at
    ``max_new_tokens``. ``confidence_threshold`` (going beyond fixed gamma) stops
    a round's drafting early once the draft's top probability falls below it.
    ``tree`` (a :class:`qdlib.trees.TreeShape`) lets a feature-fed draft propose a token tree of depth
    ``gamma`` each round, verified in one target pass; ``False`` forces chains; a draft's own tree (its config)
    is used for greedy decoding only.
    ``gamma``, ``confidence_threshold`` and ``tree`` left as None take the draft's own tuned
    settings where its config carries them (gamma 4, chains otherwise).
    ``engine``: the target's forward, "auto" (qdlib's lean :class:`~qdlib.target_engine.TargetEngine` where it
    supports the model, else transformers'), "qdlib" or "transformers".

    ``draft`` is anything :func:`qdlib.drafters.as_drafter` accepts: a draft model (it
    uses whatever memory is attached to it; a live memory is fed the target's states of
    every verified token, from the verification passes), a feature-fed draft, a
    :class:`~qdlib.drafters.Drafter`, or a model-free drafter with
    ``propose(context, k)`` such as :class:`qdlib.NgramDrafter`.
    """
    gamma, confidence_threshold, tree = _draft_defaults(draft, gamma, confidence_threshold, tree, temperature == 0)
    _check_inputs(target, input_ids, max_new_tokens, temperature, top_p, top_k, gamma)
    s = Settings(temperature, top_k, top_p, generator)
    n_prompt = input_ids.shape[1]
    max_len = n_prompt + max_new_tokens + max(gamma, tree.budget if tree else 0) + 1  # the most a round can hold
    drafter, verify = _drafter_and_verifier(target, draft, s, confidence_threshold, tree, max_len, engine)
    calls_before = drafter.calls
    eos = _eos_set(target, eos_token_id)
    stats = SpecStats(proposed_at=[0] * gamma, accepted_at=[0] * gamma)
    t_start = time.perf_counter()
    seq = input_ids[0].tolist()
    _prefill(verify, drafter, seq, stats)

    while len(seq) - n_prompt < max_new_tokens:
        remaining = max_new_tokens - (len(seq) - n_prompt)
        # 1. the drafter proposes up to g tokens deep (never past the budget)
        t0 = time.perf_counter()
        prop = drafter.propose(seq, min(gamma, remaining))
        stats.time_draft += time.perf_counter() - t0
        # 2. the target scores the last accepted token + all proposals in one pass
        t0 = time.perf_counter()
        start = verify.length
        logits, feats = _verify(verify, seq[start:], prop)
        stats.target_calls += 1
        stats.time_verify += time.perf_counter() - t0
        # 3. accept a prefix (a path of the tree), then one token from the target
        if prop.parents is None:
            n, next_token = accept_round(prop.tokens, logits, prop.qs, s)
            path = list(range(n))
        else:
            path, next_token = accept_tree(prop.tokens, prop.parents, logits, s)
        new = _record_round(stats, prop, path, next_token, eos, remaining)
        seq += new
        # 4. keep the accepted rows: the target's cache holds exactly seq[:-1] again; the drafter reads their features
        rows = ([0] + [1 + i for i in path])[: len(new)]  # the last accepted token, then the kept path
        verify.keep_rows(start, rows)
        t0 = time.perf_counter()
        drafter.commit(seq, None if feats is None else feats[rows])
        stats.time_draft += time.perf_counter() - t0
        if new[-1] in eos:
            break

    stats.draft_calls = drafter.calls - calls_before
    stats.new_tokens = len(seq) - n_prompt
    stats.time_total = time.perf_counter() - t_start
    return torch.tensor([seq], device=input_ids.device), stats


def _drafter_and_verifier(target, draft, s: Settings, confidence_threshold, tree, max_len: int, engine: str):
    """The drafter of ``draft`` (with its own pausing fallback, where its config has one), checked against the
    target, and the target's verifier for it."""
    if confidence_threshold is not None and not 0 <= confidence_threshold <= 1:
        raise ValueError(f"confidence_threshold={confidence_threshold} must be in [0, 1]")
    pause = getattr(getattr(draft, "config", None), "pause", None)
    drafter = as_drafter(Pausing(draft, **pause) if pause else draft, s, confidence_threshold=confidence_threshold,
                         vocab_size=target.config.vocab_size, max_len=max_len, tree=tree)
    drafter.check(target)  # each kind of drafter knows what it needs of the target
    verify = verifier(target, drafter.needs_features, max_len, engine, layers=drafter.feature_layers)
    if tree is not None and not verify.trees:
        raise ValueError(f"tree={tree!r} needs engine='qdlib' or 'auto' on a model qdlib's engine supports")
    return drafter, verify


def _prefill(verify, drafter, seq: list[int], stats: SpecStats) -> None:
    """The target's cache (and the drafter's) take all prompt tokens but the last: always ``seq[:-1]`` or less."""
    t0 = time.perf_counter()
    feats = None
    if len(seq) > 1:
        _, feats = verify(seq[:-1], 1)
        stats.target_calls += 1
        stats.prefill_calls += 1
    stats.time_verify += time.perf_counter() - t0
    t0 = time.perf_counter()
    drafter.begin(seq, feats)
    stats.time_draft += time.perf_counter() - t0


def _verify(verify, pending: list[int], prop: Proposal):
    """The target's pass over the last accepted token (``pending``, the one token its cache lacks) and the
    proposals, a chain or a tree: logits ``(1 + proposals, V)`` and features or None."""
    g = len(prop.tokens)
    assert len(pending) == 1, "the target's cache must hold all but the last accepted token"
    if prop.parents is None or prop.parents == chain_parents(g):
        return verify(pending + prop.tokens, g + 1)
    base = verify.length  # the position of the last accepted token
    pos = torch.tensor([base] + [base + d for d in tree_depths(prop.parents)], device=verify.device)
    return verify(pending + prop.tokens, g + 1, positions=pos, mask=tree_mask(prop.parents, verify.device))


def _record_round(stats: SpecStats, prop: Proposal, path: list[int], next_token: int, eos: set,
                  remaining: int) -> list[int]:
    """Count the round in ``stats`` and return its new tokens, cut after an EOS and at the budget.

    A chain's path is its kept prefix; a tree's, the nodes kept from the root down. Depth ``j``'s counts are
    the positions the target judged there: the kept ones and the first rejected depth (where the tree had one).
    """
    depths = tree_depths(prop.parents) if prop.parents is not None else list(range(1, len(prop.tokens) + 1))
    n, deepest = len(path), max(depths, default=0)
    for j in range(min(n + 1, deepest)):
        stats.proposed_at[j] += 1
        stats.accepted_at[j] += j < n
    stats.proposed += len(prop.tokens)
    stats.accepted += n
    stats.rounds += 1
    kept = [prop.tokens[i] for i in path]
    new = kept + [next_token]
    for i, tok in enumerate(new):
        if tok in eos:
            new = new[: i + 1]
            break
    new = new[:remaining]
    shown = prop.tokens if prop.parents is None else kept  # a tree's trace shows the path it kept
    if len(new) == n + 1:
        stats.trace.append(Round(shown, n, next_token))
    else:  # cut short by EOS or the budget: only the kept draft tokens, no target token
        stats.trace.append(Round(kept[: len(new)], len(new), None))
    return new


@torch.no_grad()
def generate_plain(target, input_ids: torch.Tensor, *, max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, eos_token_id=None, generator: torch.Generator | None = None,
                   engine: str = "auto"):
    """One target call per token with the same machinery (the same ``engine`` as :func:`speculative_generate`):
    the fair baseline. Returns ``(output_ids, SpecStats)``."""
    _check_inputs(target, input_ids, max_new_tokens, temperature, top_p, top_k)
    s = Settings(temperature, top_k, top_p, generator)
    eos = _eos_set(target, eos_token_id)
    stats = SpecStats()
    t_start = time.perf_counter()
    seq = input_ids[0].tolist()
    n_prompt = len(seq)
    verify = verifier(target, False, n_prompt + max_new_tokens + 1, engine)
    feed = seq
    while len(seq) - n_prompt < max_new_tokens:
        t0 = time.perf_counter()
        logits = verify(feed, 1)[0][-1]
        stats.time_verify += time.perf_counter() - t0
        stats.target_calls += 1
        tok = s.pick(s.dist(logits))
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
