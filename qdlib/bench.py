"""Every way to decode with the teacher, measured side by side in one run (``qd bench``, notebook 06).

    >>> from qdlib import load_teacher, load_draft
    >>> from qdlib.bench import BenchConfig, run_bench
    >>> from qdlib.report import report_markdown
    >>> teacher, tok = load_teacher(); draft = load_draft()
    >>> cfg = BenchConfig(n_prompts=1, max_new_tokens=8, repeats=1, temperature=0, gammas=(4,), sweep_prompts=0,
    ...                   methods=("teacher_generate", "spec"), kinds=("code",))   # BenchConfig(): the full bench
    >>> report = run_bench(teacher, tok, draft, cfg)
    >>> print(report_markdown(report))
    # qd bench: tiny teacher, draft layers [0, 5, 11, 16, 22, 27] (... training steps, test agreement ...)
    ...
    | qdlib speculative, draft + knowledge cache | ... | 1/1 |
    ...

What is compared (``METHODS``): the teacher alone (transformers ``generate`` and
qdlib's :func:`~qdlib.speculative.generate_plain`), qdlib speculative decoding with
the draft (knowledge cache attached and detached, fixed gamma and a dynamic
length), transformers assisted generation with the same draft (its defaults, and
settings matched to qdlib), prompt-lookup decoding, a REST-style n-gram lookup
over the knowledge items, and two drafts that were never distilled (uniform
layers, and the first k layers as an early exit).

How it is measured: all methods decode the same prompts (held-out code, and the
knowledge items' evaluation paraphrases, reported separately) with the same token
budget; one warm-up call per method is not timed; every repeat runs all methods
one after the other (so slow drift of the machine hits all alike), and the
reported speed is the median over repeats of (new tokens / seconds) over all
prompts of a kind. Speed-ups are over the teacher's own greedy ``generate``
measured in the same run. Greedy outputs are compared token for token with the
teacher's greedy output.

Costs: ``c`` is one draft step over one teacher step (single-token forwards with a
KV cache, median of many), ``verify_cost[g]`` is one teacher pass over ``g + 1``
tokens over one teacher step. With alpha (for greedy decoding the teacher-forced agreement)
they give the theoretical speed-up of Leviathan et al. (2023),
:func:`qdlib.metrics.expected_speedup`, drawn over the measured gamma sweep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__, paths
from .corpus import heldout_prompts, heldout_texts
from .draft import build_draft
from .decoding import Settings
from .drafters import HybridDrafter, LookupBranches, as_drafter
from .heldout_code import heldout_code_prompts
from .hardware import cpu_name
from .knowledge import load_items
from .metrics import distribution_metrics, expected_speedup, expected_tokens_per_call
from .models import model_name
from .progress import progress_bar
from .lookup import NgramDrafter
from .sampling import first_k_layers, sample_layers
from .schema import Choices, Integer, IntList, Number, OrNull, Text, field_ok, field_problems, raise_problems, setting
from .speculative import generate_plain, hf_generate_kwargs, speculative_generate
from .timing import step_time, verify_split  # noqa: F401 (step_time: public name)

# name -> (label, group, needs). Groups order the table; needs says what the method uses.
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
# the draft behind each drafting method, as named in the report's costs["c"] (baselines and lookups have none)
DRAFT_OF = {"spec": "spec", "spec_no_cache": "spec_no_cache", "spec_dynamic": "spec", "assisted_default": "spec",
            "assisted_matched": "spec", "untrained_uniform": "untrained_uniform", "early_exit": "early_exit",
            "fast": "fast", "hybrid": "spec", "fast_chain": "fast", "fast_lookup": "fast"}
SAMPLING_METHODS = ("teacher_generate", "teacher_plain", "spec", "assisted_matched", "fast", "fast_chain",
                    "fast_lookup")
# held-out standard-library code, third-party code no training used (qdlib.heldout_code), knowledge paraphrases,
# and the learner's own code (``qd bench --code PATH``)
KINDS = ("code", "unfamiliar", "paraphrase", "yours")
# repeats of one method whose tokens/s differ by more than this share of their median mark the row unreliable
BUSY_MARGIN = 0.25


@dataclass
class BenchConfig:
    """What ``run_bench`` measures: every field declared once with its check and help (:mod:`qdlib.schema`), so
    :meth:`validate` names a bad value and what is allowed, as every other config of qdlib does."""

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
    temperature: float = setting(0.8, Number(0), "the sampling-mode rows (0: none)")
    gammas: list = setting([1, 2, 3, 4, 5, 6, 7, 8], IntList(1, "gammas", low=1), "the gamma sweep")
    sweep_prompts: int = setting(4, Integer(0), "code prompts of the sweep (0: no sweep)")
    methods: list | None = setting(None, OrNull(Choices(*METHODS)), "the methods to run (null: all)")
    kinds: list = setting(["code", "unfamiliar", "paraphrase"], Choices(*KINDS), "prompt kinds to run")
    seed: int = setting(0, Integer(0), "the held-out prompts' seed and the sampling generator's")
    code: str | None = setting(None, OrNull(Text()), "a file or folder of your own Python code: its prompts are the "
                                                   "kind 'yours'")

    def validate(self) -> "BenchConfig":
        """Coerce and check every field (:func:`qdlib.schema.field_problems`), then what relates two of them."""
        problems = field_problems(self, "bench")
        if field_ok(self, "kinds") and ("yours" in self.kinds) != (self.code is not None):
            problems.append("bench.kinds has 'yours' only together with bench.code=PATH (qd bench --code PATH), "
                            "and code=PATH adds it")
        if self.code is not None and field_ok(self, "code") and not Path(self.code).exists():
            problems.append(f"bench.code={self.code!r}: no such file or folder")
        raise_problems(problems)
        return self

    @property
    def method_names(self) -> list[str]:
        names = list(self.methods) if self.methods is not None else list(METHODS)
        if "teacher_generate" not in names:
            names.insert(0, "teacher_generate")  # every speed-up is over it
        return names


def quick_config(**changes) -> BenchConfig:
    """``qd bench --quick``: the capstone's scoring run, about a minute on 2 cores.

    Greedy decoding of 3 prompts of unfamiliar third-party code, 48 new tokens, 2 interleaved repeats: the teacher's
    ``generate``, ``generate_plain``, the reference draft (cache detached, gamma 3, its best there) and a feature-fed
    draft (the ``"fast"`` rows: the committed one, or a candidate).

    >>> quick_config().kinds, quick_config(n_prompts=5).n_prompts
    (['unfamiliar'], 5)
    """
    base = dict(n_prompts=3, max_new_tokens=48, gamma=3, repeats=2, temperature=0.0, sweep_prompts=0,
                kinds=("unfamiliar",), methods=("teacher_generate", "teacher_plain", "spec_no_cache", "fast"))
    return BenchConfig(**{**base, **changes}).validate()


def capstone_score(report: dict, kind: str = "unfamiliar") -> dict:
    """Did the candidate (the ``"fast"`` rows) beat the reference draft (``"spec_no_cache"``) in this report?

    Both speed-ups are over ``generate_plain`` of the same run (the same engine without a draft), so only
    speculation counts; a candidate whose greedy output differs from the teacher's on any prompt scores nothing.
    ``score`` is the candidate's speed-up divided by the reference's: above 1 beats it.

    >>> rows = [{"kind": "unfamiliar", "mode": "greedy", "method": "spec_no_cache", "speedup_vs_plain": 1.2,
    ...          "identical": 3, "prompts": 3},
    ...         {"kind": "unfamiliar", "mode": "greedy", "method": "fast", "speedup_vs_plain": 1.5,
    ...          "identical": 3, "prompts": 3}]
    >>> s = capstone_score({"rows": rows}); round(s["score"], 2), s["beats_reference"]
    (1.25, True)
    """
    rows = {r["method"]: r for r in report["rows"] if r["kind"] == kind and r["mode"] == "greedy"}
    missing = [m for m in ("spec_no_cache", "fast") if m not in rows]
    if missing:
        raise ValueError(f"the report has no greedy {kind} rows for {missing}; run `qd bench --quick --candidate DIR`")
    cand, ref = rows["fast"], rows["spec_no_cache"]
    exact = cand["identical"] == cand["prompts"]
    score = cand["speedup_vs_plain"] / ref["speedup_vs_plain"] if exact else 0.0
    return {"candidate_vs_plain": cand["speedup_vs_plain"], "reference_vs_plain": ref["speedup_vs_plain"],
            "exact": exact, "score": score, "beats_reference": exact and score > 1.0}


# ----------------------------------------------------------------------------- prompts


def bench_prompts(teacher, tokenizer, cfg: BenchConfig, items: list[dict] | None = None) -> dict[str, list[list[int]]]:
    """Token ids per kind: held-out code prompts, and the evaluation paraphrases of the knowledge ``items`` (default:
    the built-in ones; :func:`run_bench` passes the items of the draft's attached cache)."""
    out = {}
    if "code" in cfg.kinds:
        code = heldout_prompts(tokenizer, heldout_texts(), n_prompts=cfg.n_prompts, prompt_tokens=cfg.prompt_tokens,
                               seed=cfg.seed)
        if len(code) < cfg.n_prompts:
            raise ValueError(f"the held-out texts give only {len(code)} prompts of {cfg.prompt_tokens} tokens")
        out["code"] = code
    if "unfamiliar" in cfg.kinds:
        out["unfamiliar"] = heldout_code_prompts(tokenizer, cfg.n_prompts, cfg.prompt_tokens, seed=cfg.seed)
    if "yours" in cfg.kinds:
        out["yours"] = code_prompts(tokenizer, cfg.code, cfg.n_prompts, cfg.prompt_tokens, cfg.seed)
    if "paraphrase" in cfg.kinds:
        texts = [p for it in (items or load_items(None, teacher)) for p in it.get("eval_paraphrases", [])]
        if not texts:
            raise ValueError("the knowledge items have no eval_paraphrases, so there are no paraphrase prompts; "
                             "drop the paraphrase kind or give the items eval_paraphrases")
        out["paraphrase"] = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[: cfg.n_prompts]]
    return out


def code_prompts(tokenizer, path, n_prompts: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """Prompts cut from the learner's own code (a ``.py`` file, or every ``.py`` file under a folder) as the
    unfamiliar set is cut: ``n_prompts`` prompts of ``prompt_tokens`` ids, each starting at a line boundary with
    at least 128 more tokens of the file after it. A clear error when ``path`` holds too little code."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if p.is_file())
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not texts:
        raise ValueError(f"{path} holds no Python files (.py); give a file or a folder of your code")
    prompts = heldout_prompts(tokenizer, texts, n_prompts=n_prompts, prompt_tokens=prompt_tokens, seed=seed)
    if len(prompts) < n_prompts:
        raise ValueError(f"{path} gives only {len(prompts)} prompt(s) of {prompt_tokens} tokens with 128 more after "
                         f"each ({len(files)} file(s)); the bench needs {n_prompts}: give more code, or fewer prompts "
                         f"(--n-prompts)")
    return prompts


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


# ----------------------------------------------------------------------------- counting and costs


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


@torch.no_grad()
def teacher_forced_alpha(teacher, draft, sequences: list[list[int]], prompt_lens: list[int]) -> dict:
    """Agreement (greedy alpha) and sum-min alpha of the draft on the teacher's own greedy continuations."""
    dev_t, dev_d = next(teacher.parameters()).device, next(draft.parameters()).device
    ps, qs = [], []
    for seq, n in zip(sequences, prompt_lens):
        ids = torch.tensor([seq])
        p = teacher(input_ids=ids.to(dev_t)).logits.float().cpu()  # (1, T, V)
        q = draft(input_ids=ids.to(dev_d)).logits.float().cpu()  # (1, T, V)
        mask = torch.zeros(1, len(seq), dtype=torch.bool)
        mask[0, n - 1 : len(seq) - 1] = True  # predictions of the generated tokens
        ps.append(p[mask])
        qs.append(q[mask])
    m = distribution_metrics(torch.cat(ps)[None], torch.cat(qs)[None])
    return {"agreement": m["agreement"], "alpha": m["alpha"], "positions": sum(x.shape[0] for x in ps)}


# ----------------------------------------------------------------------------- the methods


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


def ablation_drafts(teacher, draft, names) -> dict:
    """The never-distilled drafts among ``names``, with as many layers as ``draft``.

    ``"untrained_uniform"``: uniformly sampled teacher layers; ``"early_exit"``: the first k layers.
    """
    L, k = teacher.config.num_hidden_layers, draft.config.num_hidden_layers
    out = {}
    if "untrained_uniform" in names:
        out["untrained_uniform"] = build_draft(teacher, sample_layers(L, k)).float().eval()
    if "early_exit" in names:
        out["early_exit"] = build_draft(teacher, first_k_layers(L, k), keep_ends=False).float().eval()
    return out


def make_methods(teacher, tokenizer, draft, cfg: BenchConfig, extra_drafts: dict | None = None) -> dict[str, Callable]:
    """``name -> run(ids, temperature, generator) -> Run`` for every method in ``cfg``.

    ``extra_drafts``: the ablation drafts (:func:`ablation_drafts`); methods whose draft is missing are left out.
    """
    from transformers import GenerationConfig

    extra = dict(extra_drafts or {})
    names = cfg.method_names
    wants_lookup = "retrieval" in names or "hybrid" in names
    lookup = NgramDrafter(knowledge_datastore(draft, teacher, tokenizer), max_n=4, min_n=2) if wants_lookup else None
    budget = cfg.max_new_tokens
    attached = draft.knowledge

    def hf(ids, temperature, generator, **kw):
        ids_t = torch.tensor([ids], device=teacher.device)
        gen = hf_generate_kwargs(ids_t, tokenizer, max_new_tokens=budget, temperature=temperature)
        with CallCounter(teacher=teacher, draft=kw.get("assistant_model")) as n:
            t0 = time.perf_counter()
            out = teacher.generate(ids_t, **gen, **kw)
            sec = time.perf_counter() - t0
        new = out.shape[1] - len(ids)
        drafted = n.get("draft")
        return Run(out=out[0].tolist(), seconds=sec, new_tokens=new, target_calls=n["teacher"],
                   proposed=drafted, accepted=max(0, new - n["teacher"]) if drafted is not None else None)

    def assisted(gconf):
        def run(ids, temperature, generator):
            saved = draft.generation_config
            draft.generation_config = gconf
            try:
                return hf(ids, temperature, generator, assistant_model=draft)
            finally:
                draft.generation_config = saved
        return run

    defaults = GenerationConfig()  # transformers' own assistant defaults (num_assistant_tokens, threshold, schedule)
    matched = GenerationConfig(num_assistant_tokens=cfg.gamma, num_assistant_tokens_schedule="constant",
                               assistant_confidence_threshold=0.0)

    def spec(model, cache="keep", **kw):
        def run(ids, temperature, generator):
            if cache != "keep":
                model.set_knowledge(cache)
            try:
                # the fast draft decodes with its own tuned gamma and tree (None: from its config)
                out, stats = speculative_generate(teacher, model, torch.tensor([ids]), gamma=kw.get("gamma", cfg.gamma),
                                                  max_new_tokens=budget, temperature=temperature, generator=generator,
                                                  confidence_threshold=kw.get("confidence_threshold"),
                                                  tree=kw.get("tree"))
            finally:
                if cache != "keep":
                    model.set_knowledge(attached)
            return _from_stats(out, stats)
        return run

    def plain(engine):
        def run(ids, temperature, generator):
            out, stats = generate_plain(teacher, torch.tensor([ids]), max_new_tokens=budget, temperature=temperature,
                                        generator=generator, engine=engine)
            return _from_stats(out, stats)
        return run

    fast = extra.get("fast")
    context = NgramDrafter([], max_n=4, min_n=2, include_context=True)

    table = {
        "teacher_generate": lambda ids, t, g: hf(ids, t, g),
        "teacher_plain": plain("auto"),
        "teacher_plain_hf": plain("transformers"),
        "spec": spec(draft),
        "spec_no_cache": spec(draft, cache=None),
        "spec_dynamic": spec(draft, gamma=cfg.dynamic_max, confidence_threshold=cfg.dynamic_threshold),
        "assisted_default": assisted(defaults),
        "assisted_matched": assisted(matched),
        "prompt_lookup": lambda ids, t, g: hf(ids, t, g, prompt_lookup_num_tokens=cfg.gamma),
        "retrieval": spec(lookup) if lookup is not None else None,
        "hybrid": spec(HybridDrafter(lookup, draft)) if lookup is not None else None,
        "untrained_uniform": spec(extra["untrained_uniform"]) if "untrained_uniform" in extra else None,
        "early_exit": spec(extra["early_exit"]) if "early_exit" in extra else None,
        "fast": spec(fast, gamma=None) if fast is not None else None,
        "fast_chain": spec(fast, gamma=None, tree=False) if fast is not None else None,
        "fast_lookup": spec(LookupBranches(fast, context), gamma=None) if fast is not None else None,
        "context_lookup": spec(context),
    }
    if attached is None:  # without a cache there is nothing to detach
        table["spec_no_cache"] = None
    return {n: table[n] for n in names if table.get(n) is not None}


# ----------------------------------------------------------------------------- running


def _summarise(runs_per_repeat: list[list[Run]], reference: list[list[int]] | None) -> dict:
    """Median tokens/s over repeats, and counts from the first repeat (they do not change between repeats)."""
    speeds = [sum(r.new_tokens for r in rs) / max(sum(r.seconds for r in rs), 1e-9) for rs in runs_per_repeat]
    first = runs_per_repeat[0]
    new = sum(r.new_tokens for r in first)
    calls = sum(r.target_calls for r in first)
    row = {"tokens_per_s": statistics.median(speeds), "tokens_per_s_all": speeds, "new_tokens": new,
           "tokens_per_target_call": new / calls if calls else None}
    if all(r.proposed is not None for r in first):
        proposed = sum(r.proposed for r in first)
        accepted = sum(r.accepted for r in first)
        row["acceptance"] = accepted / proposed if proposed else None
    if all(r.time_draft is not None for r in first):
        tot = sum(r.seconds for r in first)
        row["time_split"] = {"draft": sum(r.time_draft for r in first) / tot,
                             "verify": sum(r.time_verify for r in first) / tot}
        row["time_split"]["other"] = max(0.0, 1 - row["time_split"]["draft"] - row["time_split"]["verify"])
    if reference is not None:
        row["identical"] = sum(r.out == ref for r, ref in zip(first, reference))
        row["prompts"] = len(reference)
    return row


def environment() -> dict:
    """CPU, threads and library versions, for the report."""
    import transformers

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "qdlib": __version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _repeat_jobs(methods: dict, jobs: list, prompts: list, cfg: BenchConfig, bar) -> dict:
    """Every job ``(mode, temperature, method)`` on ``prompts``: untimed warm-up, then ``cfg.repeats`` timed rounds.

    Returns ``{(mode, method): [runs of repeat 1, runs of repeat 2, ...]}``. Each repeat runs all jobs one
    after the other, so slow drift of the machine hits all alike.
    """
    for _mode, t, name in jobs:  # warm-up, untimed
        for p in prompts[: cfg.warmup]:
            methods[name](p, t, torch.Generator().manual_seed(cfg.seed))
    per = {(mode, name): [] for mode, _, name in jobs}
    for _ in range(cfg.repeats):
        for mode, t, name in jobs:
            g = torch.Generator().manual_seed(cfg.seed)
            runs = []
            for p in prompts:
                runs.append(methods[name](p, t, g))
                bar.update()
            per[(mode, name)].append(runs)
    return per


def _measure_rows(methods: dict, prompts: dict, cfg: BenchConfig, modes: list, jobs: list, bar) -> tuple[list, dict]:
    """The table rows (one per kind, mode and method) and the teacher's greedy outputs per kind (the reference)."""
    rows, refs = [], {}
    for kind, kind_prompts in prompts.items():
        refs[kind] = [methods["teacher_generate"](p, 0.0, None).out for p in kind_prompts]  # the greedy reference
        per = _repeat_jobs(methods, jobs, kind_prompts, cfg, bar)
        base = {m: _summarise(per[(m, "teacher_generate")], None)["tokens_per_s"] for m, _ in modes}
        plain = {m: _summarise(per[(m, "teacher_plain")], None)["tokens_per_s"] for m, _ in modes if (m, "teacher_plain") in per}
        for mode, _, name in jobs:
            row = {"method": name, "label": METHODS[name][0], "group": METHODS[name][1], "kind": kind, "mode": mode,
                   **_summarise(per[(mode, name)], refs[kind] if mode == "greedy" else None)}
            row["speedup"] = row["tokens_per_s"] / base[mode]  # over the teacher's own generate ...
            if mode in plain:  # ... and over the same engine without a draft: the gain that is speculation's
                row["speedup_vs_plain"] = row["tokens_per_s"] / plain[mode]
            row["per_prompt"] = per_prompt_spread(per[(mode, name)], per[(mode, "teacher_generate")])
            speeds = row["tokens_per_s_all"]
            row["repeat_spread"] = (max(speeds) - min(speeds)) / row["tokens_per_s"]
            row["unreliable"] = row["repeat_spread"] > BUSY_MARGIN
            rows.append(row)
    return rows, refs


def per_prompt_spread(runs: list[list[Run]], base: list[list[Run]]) -> dict:
    """Worst, median and best speed-up over ``base`` across prompts (each prompt's median over repeats).

    >>> r = lambda s: Run(out=[], seconds=s, new_tokens=10, target_calls=1)
    >>> per_prompt_spread([[r(1.0), r(4.0)], [r(1.0), r(2.0)]], [[r(2.0), r(2.0)], [r(2.0), r(2.0)]])
    {'worst': 0.75, 'median': 1.375, 'best': 2.0}
    """
    def speed(rs, i):
        return statistics.median(rep[i].new_tokens / max(rep[i].seconds, 1e-9) for rep in rs)

    ups = sorted(speed(runs, i) / speed(base, i) for i in range(len(runs[0])))
    return {"worst": ups[0], "median": statistics.median(ups), "best": ups[-1]}


def measure_costs(teacher, draft, extra: dict, cfg: BenchConfig) -> dict:
    """Step costs in teacher steps: ``c`` per draft (one draft step over one teacher step) and ``verify_cost[g]``."""
    ctx = cfg.prompt_tokens + cfg.max_new_tokens // 2
    t_step = step_time(teacher, ctx)
    costs = {"teacher_step_ms": 1e3 * t_step, "c": {}}
    for name, d in {"spec": draft, **extra}.items():  # each drafter times its own drafting path
        costs["c"][name] = as_drafter(d, Settings()).step_cost(ctx) / t_step
    if draft.knowledge is not None:  # the same draft without its cross-attention to the cache
        attached = draft.knowledge
        try:
            costs["c"]["spec_no_cache"] = as_drafter(draft.set_knowledge(None), Settings()).step_cost(ctx) / t_step
        finally:
            draft.set_knowledge(attached)
    costs["verify_cost"] = {str(g): step_time(teacher, ctx, tokens=g + 1) / t_step for g in sorted(set(cfg.gammas) | {cfg.gamma})}
    # where v(g) - 1 goes, with transformers' forward (before) and qdlib's engine (after, what the loops use)
    costs["verify_split"] = {e: verify_split(teacher, (1, 2, 4, 6, 8), ctx, engine=e) for e in ("transformers", "qdlib")}
    return costs


def _gamma_sweep(teacher, tokenizer, draft, cfg: BenchConfig, prompts: list, refs: list, alpha: float, costs: dict,
                 bar) -> list[dict]:
    """Speculative decoding at every gamma of ``cfg.gammas`` on ``prompts``: measured speed-ups and the theory's."""
    sweep_methods = make_methods(teacher, tokenizer, draft, dataclasses.replace(cfg, methods=("teacher_plain",)))
    for gm in cfg.gammas:
        sweep_methods[f"gamma{gm}"] = make_methods(
            teacher, tokenizer, draft, dataclasses.replace(cfg, gamma=gm, methods=("spec",)))["spec"]
    per = {n: [] for n in sweep_methods}
    for _ in range(cfg.repeats):
        for n, fn in sweep_methods.items():
            runs = []
            for p in prompts:
                runs.append(fn(p, 0.0, None))
                bar.update()
            per[n].append(runs)
    s_gen = _summarise(per["teacher_generate"], None)["tokens_per_s"]
    s_plain = _summarise(per["teacher_plain"], None)["tokens_per_s"]
    sweep = []
    for gm in cfg.gammas:
        r = _summarise(per[f"gamma{gm}"], refs[: len(prompts)])
        sweep.append({"gamma": gm, "speedup_vs_generate": r["tokens_per_s"] / s_gen,
                      "speedup_vs_plain": r["tokens_per_s"] / s_plain,
                      "tokens_per_target_call": r["tokens_per_target_call"], "acceptance": r["acceptance"],
                      "identical": r["identical"], "prompts": r["prompts"],
                      "theory_tokens_per_call": expected_tokens_per_call(alpha, gm),
                      "theory_speedup_vs_plain": expected_speedup(alpha, gm, costs["c"]["spec"],
                                                                  costs["verify_cost"][str(gm)])})
    return sweep


def run_bench(teacher, tokenizer, draft, cfg: BenchConfig | None = None, *, progress: bool = True,
              extra_drafts: dict | None = None, fast_draft=None, log=print) -> dict:
    """Measure every method of ``cfg`` on the same prompts; returns the report (a JSON-able dict).

    ``fast_draft`` (a feature-fed draft, :func:`qdlib.load_draft("fast") <qdlib.draft.load_draft>`) adds the
    ``"fast"`` rows; without it they are left out.

    Write it with :func:`qdlib.report.write_report`, read it with :func:`qdlib.report.report_markdown`.
    """
    cfg = (cfg or BenchConfig()).validate()
    teacher.eval()
    draft.eval()
    attached = getattr(draft, "knowledge", None)
    prompts = bench_prompts(teacher, tokenizer, cfg, attached.items if attached is not None else None)
    extra = extra_drafts if extra_drafts is not None else ablation_drafts(teacher, draft, cfg.method_names)
    if fast_draft is not None and "fast" in cfg.method_names:
        extra = {**extra, "fast": fast_draft.eval()}
    methods = make_methods(teacher, tokenizer, draft, cfg, extra)
    modes = [("greedy", 0.0)] + ([("sampling", cfg.temperature)] if cfg.temperature > 0 else [])
    jobs = [(mode, t, name) for mode, t in modes for name in methods if mode == "greedy" or name in SAMPLING_METHODS]
    n_calls = sum(len(p) for p in prompts.values()) * len(jobs) * cfg.repeats
    sweep_calls = (len(cfg.gammas) + 2) * min(cfg.sweep_prompts, len(prompts.get("code", []))) * cfg.repeats
    bar = progress_bar(total=n_calls + sweep_calls, desc="bench", unit="call", enabled=progress)

    t_start = time.perf_counter()
    rows, refs = _measure_rows(methods, prompts, cfg, modes, jobs, bar)
    # the costs, and the teacher-forced agreement and alpha, behind the theory
    costs = measure_costs(teacher, draft, extra, cfg)
    alpha = {kind: teacher_forced_alpha(teacher, draft, refs[kind], [len(p) for p in kind_prompts])
             for kind, kind_prompts in prompts.items()}
    # the gamma sweep (code prompts): measured speed-ups over the teacher, theory over the plain loop
    sweep = []
    if cfg.sweep_prompts and "code" in prompts:
        sweep = _gamma_sweep(teacher, tokenizer, draft, cfg, prompts["code"][: cfg.sweep_prompts], refs["code"],
                             alpha["code"]["agreement"], costs, bar)
    bar.close()
    return {
        "config": {**dataclasses.asdict(cfg), "method_names": list(methods)},  # what actually ran
        "environment": environment(),
        "teacher": model_name(teacher),
        "draft": {"layers": draft.config.kept_layers, "knowledge": draft.knowledge is not None,
                  "memory_items": [it["id"] for it in draft.knowledge.items] if draft.knowledge is not None else [],
                  "path": _display_path(getattr(draft.config, "_name_or_path", None)), "card": draft_card(draft)},
        "fast_draft": None if fast_draft is None else {k: getattr(fast_draft.config, k) for k in
                                                       ("num_layers", "gamma", "draft_vocab", "init_layers")},
        "prompts": {k: len(v) for k, v in prompts.items()},
        "rows": rows,
        "costs": costs,
        "alpha": alpha,
        "sweep": sweep,
        "seconds": time.perf_counter() - t_start,
    }


# ----------------------------------------------------------------------------- what the report records


def draft_card(draft) -> dict | None:
    """Training steps and test agreement from the card (``metrics.json``) of the folder the draft was loaded from.

    Recorded in the report so that a speed-up names the draft behind it; None for a draft built in memory.
    """
    folder = getattr(draft.config, "_name_or_path", None)
    card = Path(folder) / "metrics.json" if folder else None
    if card is None or not card.is_file():
        return None
    m = json.loads(card.read_text())
    return {"steps": m.get("steps"), "agreement": m.get("agreement")}


def _display_path(path: str | None) -> str | None:
    """A folder inside the repository as a relative path (no machine-specific prefix in reports)."""
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(paths.REPO_DIR))
    except (ValueError, OSError):
        return str(path)


