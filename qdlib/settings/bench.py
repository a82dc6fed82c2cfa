"""What ``qd bench`` measures (:class:`BenchConfig`), and the methods it can compare (``METHODS``).

Torch-free, so that ``qd bench --help`` and ``--list-keys`` answer at once; :mod:`qdlib.bench` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..schema import Checked, Choices, Integer, IntList, Number, OrNull, Text, field_ok, setting

# name -> (label, group): what the report calls each method, and the group that orders its table
METHODS: dict[str, tuple[str, str]] = {
    "teacher_generate": ("teacher alone: transformers generate", "baseline"),
    "teacher_plain": ("teacher alone: qdlib generate_plain", "baseline"),
    "spec": ("qdlib speculative, draft + knowledge cache", "qdlib"),
    "spec_no_cache": ("qdlib speculative, cache detached", "qdlib"),
    "spec_dynamic": ("qdlib speculative, dynamic length", "qdlib"),
    "assisted_default": ("transformers assisted, its defaults", "transformers"),
    "assisted_matched": ("transformers assisted, matched settings", "transformers"),
    "prompt_lookup": ("transformers prompt lookup (no draft)", "lookup"),
    "retrieval": ("n-gram lookup in the knowledge items (REST-style)", "lookup"),
    "hybrid": ("qdlib speculative, item lookup then the draft (hybrid)", "qdlib"),
    "untrained_uniform": ("qdlib speculative, untrained uniform draft", "ablation"),
    "early_exit": ("qdlib speculative, untrained first-k-layers draft", "ablation"),
    "fast": ("qdlib speculative, fast draft (feature-fed, its own settings)", "qdlib"),
    "fast_chain": ("qdlib speculative, fast draft, chains (no tree)", "qdlib"),
    "fast_lookup": ("qdlib speculative, fast draft + lookup branches", "qdlib"),
    "context_lookup": ("qdlib speculative, lookup in the text so far (no draft)", "lookup"),
    "teacher_plain_hf": ("teacher alone: plain loop on transformers' forward", "baseline"),
}
# held-out standard-library code, third-party code no training used (qdlib.heldout_code), knowledge paraphrases,
# and the learner's own code (``qd bench --code PATH``)
KINDS = ("code", "unfamiliar", "paraphrase", "yours")


@dataclass
class BenchConfig(Checked):
    """What ``run_bench`` measures: every field declared once with its check and help (:mod:`qdlib.schema`), so
    :meth:`validate` names a bad value and what is allowed, as every other config of qdlib does."""

    section = "bench"

    n_prompts: int = setting(8, Integer(1), "prompts per kind")
    prompt_tokens: int = setting(64, Integer(1), "length of each held-out code prompt, in tokens")
    max_new_tokens: int = setting(64, Integer(1), "tokens generated per prompt (the same budget for every method)")
    gamma: int = setting(4, Integer(1), "draft tokens per round of the fixed-length runs (and matched assisted "
                                        "generation)")
    dynamic_max: int = setting(8, Integer(1), "the dynamic-length run drafts up to this many tokens a round")
    dynamic_threshold: float = setting(0.4, Number(0, 1), "... and stops a round when the draft's top probability "
                                                          "falls below this")
    repeats: int = setting(3, Integer(1), "timed repeats per method (the median is reported)")
    warmup: int = setting(1, Integer(0), "untimed calls per method first")
    cost_repeats: int = setting(30, Integer(3), "timed calls of each teacher step-cost measurement: the step, v(g) "
                                                "and its split (the median is reported)")
    temperature: float = setting(0.8, Number(0), "the sampling-mode rows (0: none)")
    gammas: list = setting([1, 2, 3, 4, 5, 6, 7, 8], IntList(1, "gammas", low=1), "the gamma sweep")
    sweep_prompts: int = setting(4, Integer(0), "code prompts of the sweep (0: no sweep)")
    methods: list | None = setting(None, OrNull(Choices(*METHODS)), "the methods to run (null: all)")
    kinds: list = setting(["code", "unfamiliar", "paraphrase"], Choices(*KINDS), "prompt kinds to run")
    seed: int = setting(0, Integer(0), "the held-out prompts' seed and the sampling generator's")
    code: str | None = setting(None, OrNull(Text()), "a file or folder of your own Python code: its prompts are the "
                                                   "kind 'yours'")

    def related_problems(self) -> list[str]:
        problems = []
        if field_ok(self, "kinds") and ("yours" in self.kinds) != (self.code is not None):
            problems.append("bench.kinds has 'yours' only together with bench.code=PATH (qd bench --code PATH), "
                            "and code=PATH adds it")
        if self.code is not None and field_ok(self, "code") and not Path(self.code).exists():
            problems.append(f"bench.code={self.code!r}: no such file or folder")
        return problems

    @property
    def method_names(self) -> list[str]:
        names = list(self.methods) if self.methods is not None else list(METHODS)
        if "teacher_generate" not in names:
            names.insert(0, "teacher_generate")  # every speed-up is over it
        return names


QUICK = dict(n_prompts=3, max_new_tokens=48, gamma=3, repeats=2, temperature=0.0, sweep_prompts=0,
             kinds=["unfamiliar"], methods=["teacher_generate", "teacher_plain", "spec_no_cache", "fast"])
"""``qd bench --quick``'s preset: what it changes from :class:`BenchConfig`'s defaults."""


def quick_config(**changes) -> BenchConfig:
    """``qd bench --quick``: the capstone's scoring run, about a minute on 2 cores.

    Greedy decoding of 3 prompts of unfamiliar third-party code, 48 new tokens, 2 interleaved repeats: the teacher's
    ``generate``, ``generate_plain``, the reference draft (cache detached, gamma 3, its best there) and a feature-fed
    draft (the ``"fast"`` rows: the committed one, or a candidate). ``changes`` (the command's options) win.

    >>> quick_config().kinds, quick_config(n_prompts=5).n_prompts
    (['unfamiliar'], 5)
    """
    return BenchConfig(**{**QUICK, **changes}).validate()
