"""The ways ``qd bench`` decodes a prompt (:func:`make_methods`), over the drafts it is given (:func:`check_drafts`).

Each method is ``run(ids, temperature, generator) -> Run``: the teacher alone (transformers ``generate``, qdlib's
``generate_plain``), qdlib's speculative loop with a draft (the reference, the fast draft, the never-distilled
ablations, or any draft of your own), transformers' assisted generation, and lookups that need no draft.

    >>> r = Run(out=[1, 2, 3], seconds=0.5, new_tokens=2, target_calls=1)
    >>> r.new_tokens / r.seconds, method_label("spec")[1], method_label("mine")[1]
    (4.0, 'qdlib', 'yours')
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .draft import build_draft
from .combined_drafters import HybridDrafter, LookupBranches
from .errors import ConfigError
from .knowledge import load_items
from .lookup import NgramDrafter
from .sampling import first_k_layers, sample_layers
from .settings.bench import METHODS, BenchConfig
from .speculative import generate_plain, hf_generate_kwargs, speculative_generate

# the draft behind each drafting method, as named in the report's costs["c"] (baselines and lookups have none);
# a draft of your own, ``run_bench(..., {"reference": d, "mine": m})``, is its own method "mine" with c "mine"
DRAFT_OF = {"spec": "spec", "spec_no_cache": "spec_no_cache", "spec_dynamic": "spec", "assisted_default": "spec",
            "assisted_matched": "spec", "untrained_uniform": "untrained_uniform", "early_exit": "early_exit",
            "fast": "fast", "hybrid": "spec", "fast_chain": "fast", "fast_lookup": "fast"}
# the entry of ``run_bench``'s ``drafts`` each method decodes with (a method whose draft is absent is left out;
# ``ablation_drafts`` makes the two never-distilled ones)
ROLE_OF = {"spec": "reference", "spec_no_cache": "reference", "spec_dynamic": "reference",
           "assisted_default": "reference", "assisted_matched": "reference", "hybrid": "reference",
           "untrained_uniform": "untrained_uniform", "early_exit": "early_exit",
           "fast": "fast", "fast_chain": "fast", "fast_lookup": "fast"}
ROLES = ("reference", "fast", "untrained_uniform", "early_exit")


def knowledge_datastore(draft, teacher, tokenizer) -> list[list[int]]:
    """Token ids of the texts the knowledge cache holds (question + teacher answer), for the lookup drafter.

    Taken from the draft's attached cache when there is one, so the lookup and the
    cache know exactly the same texts; otherwise the items' questions and reference answers.
    """
    cache = getattr(draft, "knowledge", None)
    if cache is not None:
        return [ids[m].tolist() for ids, m in zip(cache.input_ids, cache.mask)]
    return [tokenizer(it["question"] + it.get("reference_answer", ""), add_special_tokens=False)["input_ids"]
            for it in load_items(None, teacher)]


class CallCounter:
    """Counts forward calls of models while active (a forward pre-hook each).

    >>> m = torch.nn.Linear(2, 2)
    >>> with CallCounter(m=m) as n:
    ...     _ = m(torch.zeros(1, 2)); _ = m(torch.zeros(1, 2))
    >>> n["m"]
    2
    """

    def __init__(self, **models):
        self.models = {k: v for k, v in models.items() if isinstance(v, torch.nn.Module)}
        self.counts = {k: 0 for k in self.models}
        self._hooks = []

    def __enter__(self):
        for name, m in self.models.items():
            def hook(_mod, _args, _name=name):
                self.counts[_name] += 1
            self._hooks.append(m.register_forward_pre_hook(hook))
        return self.counts

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []


@dataclass
class Run:
    """One decoding call: the output and what it cost."""

    out: list[int]
    seconds: float
    new_tokens: int
    target_calls: int
    proposed: int | None = None
    accepted: int | None = None
    time_draft: float | None = None
    time_verify: float | None = None


def _from_stats(out, stats) -> Run:
    return Run(out=out[0].tolist(), seconds=stats.time_total, new_tokens=stats.new_tokens,
               target_calls=stats.target_calls - stats.prefill_calls, proposed=stats.proposed,
               accepted=stats.accepted, time_draft=stats.time_draft, time_verify=stats.time_verify)


def check_drafts(drafts) -> dict:
    """``drafts`` as :func:`qdlib.bench.run_bench` takes it: a dict with a ``"reference"`` entry, no name a method's."""
    if not isinstance(drafts, dict) or "reference" not in drafts:
        raise ConfigError(f"run_bench takes drafts as a dict name -> draft with a 'reference' entry (the layer-sampled "
                          f"draft the theory and the gamma sweep use), e.g. {{'reference': load_draft()}}; got "
                          f"{type(drafts).__name__}" + (f" with {sorted(drafts)}" if isinstance(drafts, dict) else ""))
    clash = sorted(set(drafts) & (set(METHODS) - set(ROLES)))
    if clash:
        raise ConfigError(f"draft name(s) {clash} are method names of the bench; allowed: {list(ROLES)} or a new name")
    return dict(drafts)


def ablation_drafts(teacher, reference, names) -> dict:
    """The never-distilled drafts among ``names``, with as many layers as ``reference`` (``qd bench`` adds them).

    ``"untrained_uniform"`` keeps uniformly sampled teacher layers, ``"early_exit"`` the first k layers.
    """
    L, k = teacher.config.num_hidden_layers, reference.config.num_hidden_layers
    out = {}
    if "untrained_uniform" in names:
        out["untrained_uniform"] = build_draft(teacher, sample_layers(L, k)).float().eval()
    if "early_exit" in names:
        out["early_exit"] = build_draft(teacher, first_k_layers(L, k), keep_ends=False).float().eval()
    return out


def method_label(name: str) -> tuple[str, str]:
    """``(label, group)`` of a method: from ``METHODS``, or a draft of your own that ``run_bench`` was given."""
    return METHODS.get(name, (f"qdlib speculative, draft '{name}' (its own settings)", "yours"))


class _Runs:
    """The ways to decode one prompt, each ``run(ids, temperature, generator) -> Run`` (see :func:`make_methods`)."""

    def __init__(self, teacher, tokenizer, cfg: BenchConfig):
        self.teacher, self.tokenizer, self.cfg = teacher, tokenizer, cfg

    def hf(self, **kw):
        def run(ids, temperature, generator):
            teacher = self.teacher
            ids_t = torch.tensor([ids], device=teacher.device)
            gen = hf_generate_kwargs(ids_t, self.tokenizer, max_new_tokens=self.cfg.max_new_tokens,
                                     temperature=temperature)
            with CallCounter(teacher=teacher, draft=kw.get("assistant_model")) as n:
                t0 = time.perf_counter()
                out = teacher.generate(ids_t, **gen, **kw)
                sec = time.perf_counter() - t0
            new = out.shape[1] - len(ids)
            drafted = n.get("draft")
            return Run(out=out[0].tolist(), seconds=sec, new_tokens=new, target_calls=n["teacher"],
                       proposed=drafted, accepted=max(0, new - n["teacher"]) if drafted is not None else None)
        return run

    def assisted(self, draft, gconf):
        hf = self.hf(assistant_model=draft)

        def run(ids, temperature, generator):
            saved = draft.generation_config
            draft.generation_config = gconf
            try:
                return hf(ids, temperature, generator)
            finally:
                draft.generation_config = saved
        return run

    def spec(self, model, *, gamma="cfg", detach=False, confidence_threshold=None, tree=None):
        """qdlib's loop; ``gamma=None``: the draft's own; ``detach``: its knowledge cache detached meanwhile."""
        gamma = self.cfg.gamma if gamma == "cfg" else gamma

        def run(ids, temperature, generator):
            attached = model.knowledge if detach else None
            if detach:
                model.set_knowledge(None)
            try:
                out, stats = speculative_generate(self.teacher, model, torch.tensor([ids]), gamma=gamma,
                                                  max_new_tokens=self.cfg.max_new_tokens, temperature=temperature,
                                                  generator=generator, confidence_threshold=confidence_threshold,
                                                  tree=tree)
            finally:
                if detach:
                    model.set_knowledge(attached)
            return _from_stats(out, stats)
        return run

    def plain(self, engine):
        def run(ids, temperature, generator):
            out, stats = generate_plain(self.teacher, torch.tensor([ids]), max_new_tokens=self.cfg.max_new_tokens,
                                        temperature=temperature, generator=generator, engine=engine)
            return _from_stats(out, stats)
        return run


def make_methods(teacher, tokenizer, drafts: dict, cfg: BenchConfig) -> dict[str, Callable]:
    """``name -> run(ids, temperature, generator) -> Run`` for every method of ``cfg`` whose draft is in ``drafts``,
    then one method per draft of your own (a name outside ``ROLES``)."""
    from transformers import GenerationConfig

    names, runs, draft, fast = cfg.method_names, _Runs(teacher, tokenizer, cfg), drafts["reference"], drafts.get("fast")
    lookup = (NgramDrafter(knowledge_datastore(draft, teacher, tokenizer), max_n=4, min_n=2)
              if {"retrieval", "hybrid"} & set(names) else None)
    context = NgramDrafter([], max_n=4, min_n=2, include_context=True)
    matched = GenerationConfig(num_assistant_tokens=cfg.gamma, num_assistant_tokens_schedule="constant",
                               assistant_confidence_threshold=0.0)
    table = {
        "teacher_generate": lambda: runs.hf(),
        "teacher_plain": lambda: runs.plain("auto"),
        "teacher_plain_hf": lambda: runs.plain("transformers"),
        "spec": lambda: runs.spec(draft),
        # without a cache there is nothing to detach
        "spec_no_cache": lambda: runs.spec(draft, detach=True) if draft.knowledge is not None else None,
        "spec_dynamic": lambda: runs.spec(draft, gamma=cfg.dynamic_max, confidence_threshold=cfg.dynamic_threshold),
        # transformers' own assistant defaults (num_assistant_tokens, threshold, schedule), and matched ones
        "assisted_default": lambda: runs.assisted(draft, GenerationConfig()),
        "assisted_matched": lambda: runs.assisted(draft, matched),
        "prompt_lookup": lambda: runs.hf(prompt_lookup_num_tokens=cfg.gamma),
        "retrieval": lambda: runs.spec(lookup),
        "hybrid": lambda: runs.spec(HybridDrafter(lookup, draft)),
        "untrained_uniform": lambda: runs.spec(drafts["untrained_uniform"]),
        "early_exit": lambda: runs.spec(drafts["early_exit"]),
        # the fast draft decodes with its own tuned gamma and tree
        "fast": lambda: runs.spec(fast, gamma=None),
        "fast_chain": lambda: runs.spec(fast, gamma=None, tree=False),
        "fast_lookup": lambda: runs.spec(LookupBranches(fast, context), gamma=None),
        "context_lookup": lambda: runs.spec(context),
    }
    methods = {n: table[n]() for n in names if ROLE_OF.get(n, "reference") in drafts}
    methods.update({n: runs.spec(d, gamma=None) for n, d in drafts.items() if n not in ROLES})
    return {n: m for n, m in methods.items() if m is not None}


def loop_acceptance(target, draft, prompts, *, gamma: int = 1, max_new_tokens: int = 64) -> dict:
    """The acceptance rate (accepted / proposed) of greedy ``speculative_generate`` at ``gamma`` over ``prompts``
    (lists of token ids), measured in the loop: at ``gamma=1`` it is the depth-1 acceptance, each proposal made
    with the draft's memory as it stands after the last verification. ``identical`` counts the prompts whose output
    equals ``generate_plain``'s, token for token (every one, for a lossless loop).
    """
    accepted = proposed = identical = 0
    for ids in prompts:
        x = torch.tensor([list(ids)])
        out, stats = speculative_generate(target, draft, x, gamma=gamma, max_new_tokens=max_new_tokens, tree=False)
        plain, _ = generate_plain(target, x, max_new_tokens=max_new_tokens)
        accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
        identical += int(torch.equal(out, plain))
    return {"acceptance_rate": accepted / max(proposed, 1), "accepted": accepted, "proposed": proposed,
            "prompts": len(prompts), "identical": identical, "gamma": gamma}
