"""Measuring a draft against its teacher: the validation sets of a distillation run and the figures of its card.

:func:`evaluate_draft` scores a draft on :class:`~qdlib.distill_data.EvalSet` s (KL, top-1 agreement, alpha, CE);
:func:`eval_sets` builds the standard ones. Validation prompts (seed 1) pick the best checkpoint; test prompts
(seed 0) give the reported figures and are never used for selection.
"""

from __future__ import annotations

import torch

from ..corpus import heldout_texts
from ..distill_data import EvalSet, heldout_eval_set, paraphrase_eval_set, perplexity, unfamiliar_eval_set
from ..memories import LiveMemory, layer_states
from ..metrics import distribution_sums, text_windows

EVAL_SEED_VALIDATION = 1  # prompts that pick the best checkpoint
EVAL_SEED_TEST = 0  # prompts of the reported figures and the agreement bar (never used for selection)


def _attach(draft, memory) -> tuple[int, ...] | None:
    """Attach ``memory`` to ``draft`` (a draft without a knowledge path takes only None); the teacher layers a live
    memory reads, else None."""
    if hasattr(draft, "set_knowledge"):
        draft.set_knowledge(memory)
    elif memory is not None:
        raise ValueError(f"{type(draft).__name__} has no knowledge path; its memory must be None, not {memory!r}")
    return getattr(draft, "feature_layers", None)


@torch.no_grad()
def _arm_sums(teacher, arms: dict, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 8) -> dict[str, dict]:
    """Per arm ``name: (draft, memory)``, the sums over masked positions of KL(p||q), top-1 agreement,
    sum_x min(p, q) and the draft's CE on the ids. The teacher runs once per chunk of rows for all the arms.

    A draft with a live memory reads the teacher's states of the same text, one position behind (lag 1: its first
    proposal of a round), from the teacher pass that gives p."""
    dev_t = next(teacher.parameters()).device
    layers = {name: _attach(d, memory) for name, (d, memory) in arms.items()}
    tot = {name: {"kl": 0.0, "agreement": 0.0, "alpha": 0.0, "ce": 0.0, "n": 0} for name in arms}
    for i in range(0, len(ids), chunk):
        x = ids[i : i + chunk]
        m = mask[i : i + chunk, : x.shape[1] - 1]  # (b, T-1): predictions of tokens 1..T-1
        scored = m.any(0).nonzero()
        if not len(scored):
            continue
        s0 = int(scored[0])  # the heads run from the first scored prediction on (a prompt's positions are not scored)
        keep, m = x.shape[1] - s0, m[:, s0:]  # logits of positions s0..T-1; m: (b, T-1-s0)
        out = teacher(input_ids=x.to(dev_t), use_cache=False, logits_to_keep=keep,
                      output_hidden_states=any(layers.values()))
        lp = torch.log_softmax(out.logits[:, :-1].float().cpu(), -1)  # (b, keep-1, V)
        for name, (d, memory) in arms.items():
            dev_d = next(d.parameters()).device
            live = {}
            if layers[name]:
                states = layer_states(out.hidden_states, layers[name], teacher.config.rms_norm_eps)  # (b, T, D)
                live = {"memory": LiveMemory(layers[name], states.to(dev_d)), "memory_lags": 1}
            if len(arms) > 1:
                _attach(d, memory)  # another arm may share the draft with another memory
            lq = d(input_ids=x.to(dev_d), use_cache=False, logits_to_keep=keep, **live).logits
            lq = torch.log_softmax(lq[:, :-1].float().cpu(), -1)
            t = tot[name]
            for k, v in distribution_sums(lp, lq, m).items():
                t[k] += v
            t["ce"] += (-lq.gather(-1, x[:, s0 + 1:].unsqueeze(-1)).squeeze(-1) * m).sum().item()
    return tot


def score_arms(teacher, arms: dict[str, tuple], sets: dict[str, EvalSet]) -> dict[str, dict[str, dict]]:
    """Each arm, ``name: (draft, memory)`` (the memory the draft reads while scored: a knowledge cache, a live
    memory, or None), scored against the teacher on every set: ``{arm: {set: {kl, agreement, alpha, ce, ppl,
    positions}}}``. The teacher runs once for all the arms, which may share a draft; each draft's own memory and
    training mode are restored afterwards."""
    drafts = {id(d): (d, d.training, getattr(d, "knowledge", None)) for d, _ in arms.values()}
    for d, _, _ in drafts.values():
        d.eval()
    out = {name: {} for name in arms}
    try:
        for set_name, es in sets.items():
            for name, t in _arm_sums(teacher, arms, es.ids, es.mask).items():
                n = max(t["n"], 1)
                out[name][set_name] = {"kl": t["kl"] / n, "agreement": t["agreement"] / n, "alpha": t["alpha"] / n,
                                       "ce": t["ce"] / n, "ppl": perplexity(t["ce"] / n), "positions": t["n"]}
    finally:
        for d, was_training, before in drafts.values():
            if hasattr(d, "set_knowledge"):
                d.set_knowledge(before)
            d.train(was_training)
    return out


def evaluate_draft(teacher, draft, sets: dict[str, EvalSet], cache=None, *, detached: bool = True) -> dict:
    """Per set: KL(teacher || draft), top-1 agreement, alpha = E[sum min(p, q)] (the expected acceptance
    probability), and the draft's cross-entropy and perplexity, over the scored positions.

    With a knowledge ``cache`` (or ``"live"``, a live memory) and a draft that has fusion layers, every set is
    scored twice: with the memory attached (``name``) and detached (``name + "_no_cache"``; ``detached=False``
    skips that second pass), from one teacher pass (:func:`score_arms`). The draft's own attached memory is
    restored afterwards.
    """
    arms = {"": (draft, cache)}
    if detached and cache is not None and len(getattr(draft, "fusion", [])):
        arms["_no_cache"] = (draft, None)
    scores = score_arms(teacher, arms, sets)
    return {name + suffix: scores[suffix][name] for suffix in arms for name in sets}


def text_eval_set(tokenizer, texts, seq_len: int = 128, n: int = 16) -> EvalSet:
    """Held-out text windows, every position scored (cross-entropy / perplexity on real text)."""
    ids = text_windows(tokenizer, texts, seq_len=seq_len, n=n)
    return EvalSet(ids, torch.ones(ids.shape, dtype=torch.bool), "text")


def eval_sets(teacher, tokenizer, *, n_prompts: int, seed: int, items=None, texts=None,
              new_tokens: int = 64, text_windows: int = 16, unfamiliar: bool = False) -> dict[str, EvalSet]:
    """Held-out prompts continued by the teacher (and the items' evaluation paraphrases, and held-out text; with
    ``unfamiliar``, third-party code no training here uses, :mod:`qdlib.heldout_code`)."""
    texts = texts if texts is not None else heldout_texts()
    sets = {"heldout": heldout_eval_set(teacher, tokenizer, texts, n_prompts=n_prompts, seed=seed, new_tokens=new_tokens)}
    if items:
        sets["paraphrase"] = paraphrase_eval_set(teacher, tokenizer, items, new_tokens=min(new_tokens, 48))
    if unfamiliar:
        sets["unfamiliar"] = unfamiliar_eval_set(teacher, tokenizer)
    sets["text"] = text_eval_set(tokenizer, texts, n=text_windows)
    return sets
