"""Every way to decode with the teacher, measured side by side in one run (``qd bench``, notebook 06).

    >>> from qdlib import load_teacher, load_draft
    >>> from qdlib.bench import BenchConfig, run_bench, report_markdown
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
tokens over one teacher step. With the teacher-forced acceptance ``alpha``
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

from .metrics import distribution_metrics, expected_speedup, expected_tokens_per_call
from .progress import progress_bar
from .speculative import generate_plain, hf_generate_kwargs, speculative_generate

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
    "untrained_uniform": ("qdlib speculative, untrained uniform draft", "ablation"),
    "early_exit": ("qdlib speculative, untrained first-k-layers draft", "ablation"),
}
# the draft behind each drafting method, as named in the report's costs["c"] (baselines and lookups have none)
DRAFT_OF = {"spec": "spec", "spec_no_cache": "spec_no_cache", "spec_dynamic": "spec", "assisted_default": "spec",
            "assisted_matched": "spec", "untrained_uniform": "untrained_uniform", "early_exit": "early_exit"}
SAMPLING_METHODS = ("teacher_generate", "spec", "assisted_matched")
KINDS = ("code", "paraphrase")


@dataclass
class BenchConfig:
    """What ``run_bench`` measures. Every field is validated by :meth:`validate`.

    Attributes:
        n_prompts: prompts per kind. prompt_tokens: length of each held-out code prompt.
        max_new_tokens: tokens generated per prompt (the same budget for every method).
        gamma: draft tokens per round for the fixed-length runs (and qdlib-matched assisted generation).
        dynamic_max, dynamic_threshold: the dynamic-length run drafts up to ``dynamic_max`` tokens and
            stops a round early when the draft's top probability falls below the threshold.
        repeats: timed repeats (median reported); warmup: untimed calls per method first.
        temperature: the sampling-mode rows (0 disables them).
        gammas: the sweep; sweep_prompts: code prompts used for it (0 disables the sweep).
        methods: names from :data:`METHODS` (None: all). kinds: prompt kinds to run.
        seed: the held-out prompt seed and the sampling generator's seed.
    """

    n_prompts: int = 8
    prompt_tokens: int = 64
    max_new_tokens: int = 64
    gamma: int = 4
    dynamic_max: int = 8
    dynamic_threshold: float = 0.4
    repeats: int = 3
    warmup: int = 1
    temperature: float = 0.8
    gammas: tuple = (1, 2, 3, 4, 5, 6, 7, 8)
    sweep_prompts: int = 4
    methods: tuple | None = None
    kinds: tuple = KINDS
    seed: int = 0

    def validate(self) -> "BenchConfig":
        for key in ("n_prompts", "prompt_tokens", "max_new_tokens", "gamma", "dynamic_max", "repeats"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"bench {key}={v!r} must be a positive integer")
        for key in ("warmup", "sweep_prompts", "seed"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"bench {key}={v!r} must be a non-negative integer")
        if not 0 <= self.dynamic_threshold <= 1:
            raise ValueError(f"bench dynamic_threshold={self.dynamic_threshold} must be in [0, 1]")
        if self.temperature < 0:
            raise ValueError(f"bench temperature={self.temperature} must be >= 0 (0: no sampling rows)")
        bad = [g for g in self.gammas if not isinstance(g, int) or g < 1]
        if bad:
            raise ValueError(f"bench gammas {bad} must be positive integers")
        if self.methods is not None:
            unknown = [m for m in self.methods if m not in METHODS]
            if unknown:
                raise ValueError(f"unknown bench method(s) {unknown}; allowed: {', '.join(METHODS)}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"bench kinds {list(self.kinds)} invalid; allowed: {', '.join(KINDS)}")
        return self

    @property
    def method_names(self) -> list[str]:
        names = list(self.methods) if self.methods is not None else list(METHODS)
        if "teacher_generate" not in names:
            names.insert(0, "teacher_generate")  # every speed-up is over it
        return names


# ----------------------------------------------------------------------------- prompts


def bench_prompts(teacher, tokenizer, cfg: BenchConfig) -> dict[str, list[list[int]]]:
    """Token ids per kind: held-out code prompts, and the knowledge items' evaluation paraphrases."""
    from .knowledge import load_items
    from .teacher import heldout_prompts, heldout_texts

    out = {}
    if "code" in cfg.kinds:
        code = heldout_prompts(tokenizer, heldout_texts(), n_prompts=cfg.n_prompts, prompt_tokens=cfg.prompt_tokens,
                               seed=cfg.seed)
        if len(code) < cfg.n_prompts:
            raise ValueError(f"the held-out texts give only {len(code)} prompts of {cfg.prompt_tokens} tokens")
        out["code"] = code
    if "paraphrase" in cfg.kinds:
        texts = [p for it in load_items(None, teacher) for p in it["eval_paraphrases"]]
        out["paraphrase"] = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[: cfg.n_prompts]]
    return out


def knowledge_datastore(draft, teacher, tokenizer) -> list[list[int]]:
    """Token ids of the texts the knowledge cache holds (question + teacher answer), for the lookup drafter.

    Taken from the draft's attached cache when there is one, so the lookup and the
    cache know exactly the same texts; otherwise the items' questions and reference answers.
    """
    cache = getattr(draft, "knowledge", None)
    if cache is not None:
        return [ids[m].tolist() for ids, m in zip(cache.input_ids, cache.mask)]
    from .knowledge import load_items

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
def step_time(model, context: int = 96, tokens: int = 1, n: int = 30) -> float:
    """Median seconds of one cached forward over ``tokens`` new tokens after ``context`` cached ones."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, model.config.vocab_size, (1, context), generator=g).to(dev)
    new = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g).to(dev)
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=tokens)
        times.append(time.perf_counter() - t0)
        cache.crop(-tokens)
    return statistics.median(times[2:])


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
    from .draft import build_draft, first_k_layers
    from .sampling import sample_layers

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

    from .retrieval import NgramDrafter

    extra = dict(extra_drafts or {})
    names = cfg.method_names
    lookup = NgramDrafter(knowledge_datastore(draft, teacher, tokenizer), max_n=4, min_n=2) if "retrieval" in names else None
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
                out, stats = speculative_generate(teacher, model, torch.tensor([ids]), gamma=kw.get("gamma", cfg.gamma),
                                                  max_new_tokens=budget, temperature=temperature, generator=generator,
                                                  confidence_threshold=kw.get("confidence_threshold"))
            finally:
                if cache != "keep":
                    model.set_knowledge(attached)
            return _from_stats(out, stats)
        return run

    def plain(ids, temperature, generator):
        out, stats = generate_plain(teacher, torch.tensor([ids]), max_new_tokens=budget, temperature=temperature,
                                    generator=generator)
        return _from_stats(out, stats)

    table = {
        "teacher_generate": lambda ids, t, g: hf(ids, t, g),
        "teacher_plain": plain,
        "spec": spec(draft),
        "spec_no_cache": spec(draft, cache=None),
        "spec_dynamic": spec(draft, gamma=cfg.dynamic_max, confidence_threshold=cfg.dynamic_threshold),
        "assisted_default": assisted(defaults),
        "assisted_matched": assisted(matched),
        "prompt_lookup": lambda ids, t, g: hf(ids, t, g, prompt_lookup_num_tokens=cfg.gamma),
        "retrieval": spec(lookup) if lookup is not None else None,
        "untrained_uniform": spec(extra["untrained_uniform"]) if "untrained_uniform" in extra else None,
        "early_exit": spec(extra["early_exit"]) if "early_exit" in extra else None,
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

    from . import __version__
    from .teacher import _cpu_name

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "qdlib": __version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_bench(teacher, tokenizer, draft, cfg: BenchConfig | None = None, *, progress: bool = True,
              extra_drafts: dict | None = None, log=print) -> dict:
    """Measure every method of ``cfg`` on the same prompts; returns the report (a JSON-able dict)."""
    from .models import model_name

    cfg = (cfg or BenchConfig()).validate()
    teacher.eval()
    draft.eval()
    prompts = bench_prompts(teacher, tokenizer, cfg)
    extra = extra_drafts if extra_drafts is not None else ablation_drafts(teacher, draft, cfg.method_names)
    methods = make_methods(teacher, tokenizer, draft, cfg, extra)
    modes = [("greedy", 0.0)] + ([("sampling", cfg.temperature)] if cfg.temperature > 0 else [])
    jobs = [(mode, t, name) for mode, t in modes for name in methods if mode == "greedy" or name in SAMPLING_METHODS]
    n_calls = sum(len(p) for p in prompts.values()) * len(jobs) * cfg.repeats
    sweep_calls = (len(cfg.gammas) + 2) * min(cfg.sweep_prompts, len(prompts.get("code", []))) * cfg.repeats
    bar = progress_bar(total=n_calls + sweep_calls, desc="bench", unit="call", enabled=progress)

    t_start = time.perf_counter()
    rows = []
    refs = {}
    for kind, kind_prompts in prompts.items():
        ref_runs = [methods["teacher_generate"](p, 0.0, None) for p in kind_prompts]  # the greedy reference
        refs[kind] = [r.out for r in ref_runs]
        for _mode, t, name in jobs:  # warm-up, untimed
            for p in kind_prompts[: cfg.warmup]:
                methods[name](p, t, torch.Generator().manual_seed(cfg.seed))
        per = {(mode, name): [] for mode, _, name in jobs}
        for _ in range(cfg.repeats):
            for mode, t, name in jobs:
                g = torch.Generator().manual_seed(cfg.seed)
                runs = []
                for p in kind_prompts:
                    runs.append(methods[name](p, t, g))
                    bar.update()
                per[(mode, name)].append(runs)
        base = {m: _summarise(per[(m, "teacher_generate")], None)["tokens_per_s"] for m, _ in modes}
        for mode, _, name in jobs:
            row = {"method": name, "label": METHODS[name][0], "group": METHODS[name][1], "kind": kind, "mode": mode,
                   **_summarise(per[(mode, name)], refs[kind] if mode == "greedy" else None)}
            row["speedup"] = row["tokens_per_s"] / base[mode]
            rows.append(row)

    # ---- costs and the teacher-forced acceptance behind the theory
    ctx = cfg.prompt_tokens + cfg.max_new_tokens // 2
    t_step = step_time(teacher, ctx)
    costs = {"teacher_step_ms": 1e3 * t_step, "c": {}}
    for name, d in {"spec": draft, **extra}.items():
        costs["c"][name] = step_time(d, ctx) / t_step
    if draft.knowledge is not None:  # the same draft without its cross-attention to the cache
        attached = draft.knowledge
        try:
            costs["c"]["spec_no_cache"] = step_time(draft.set_knowledge(None), ctx) / t_step
        finally:
            draft.set_knowledge(attached)
    costs["verify_cost"] = {str(g): step_time(teacher, ctx, tokens=g + 1) / t_step for g in sorted(set(cfg.gammas) | {cfg.gamma})}
    alpha = {}
    for kind, kind_prompts in prompts.items():
        alpha[kind] = teacher_forced_alpha(teacher, draft, refs[kind], [len(p) for p in kind_prompts])

    # ---- gamma sweep (code prompts): measured speed-ups over the teacher, theory over the plain loop
    sweep = []
    if cfg.sweep_prompts and "code" in prompts:
        sp = prompts["code"][: cfg.sweep_prompts]
        sweep_methods = make_methods(teacher, tokenizer, draft, dataclasses.replace(cfg, methods=("teacher_plain",)))
        for gm in cfg.gammas:
            sweep_methods[f"gamma{gm}"] = make_methods(
                teacher, tokenizer, draft, dataclasses.replace(cfg, gamma=gm, methods=("spec",)))["spec"]
        per = {n: [] for n in sweep_methods}
        for _ in range(cfg.repeats):
            for n, fn in sweep_methods.items():
                runs = []
                for p in sp:
                    runs.append(fn(p, 0.0, None))
                    bar.update()
                per[n].append(runs)
        s_gen = _summarise(per["teacher_generate"], None)["tokens_per_s"]
        s_plain = _summarise(per["teacher_plain"], None)["tokens_per_s"]
        a = alpha["code"]["agreement"]
        for gm in cfg.gammas:
            r = _summarise(per[f"gamma{gm}"], refs["code"][: len(sp)])
            sweep.append({"gamma": gm, "speedup_vs_generate": r["tokens_per_s"] / s_gen,
                          "speedup_vs_plain": r["tokens_per_s"] / s_plain,
                          "tokens_per_target_call": r["tokens_per_target_call"], "acceptance": r["acceptance"],
                          "identical": r["identical"], "prompts": r["prompts"],
                          "theory_tokens_per_call": expected_tokens_per_call(a, gm),
                          "theory_speedup_vs_plain": expected_speedup(a, gm, costs["c"]["spec"],
                                                                      costs["verify_cost"][str(gm)])})
    bar.close()
    return {
        "config": dataclasses.asdict(cfg),
        "environment": environment(),
        "teacher": model_name(teacher),
        "draft": {"layers": draft.config.kept_layers, "knowledge": draft.knowledge is not None,
                  "path": _display_path(getattr(draft.config, "_name_or_path", None)), "card": draft_card(draft)},
        "prompts": {k: len(v) for k, v in prompts.items()},
        "rows": rows,
        "costs": costs,
        "alpha": alpha,
        "sweep": sweep,
        "seconds": time.perf_counter() - t_start,
    }


# ----------------------------------------------------------------------------- reporting


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
    from . import paths

    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(paths.REPO_DIR))
    except (ValueError, OSError):
        return str(path)


def headline(report: dict, kind: str = "code") -> dict:
    """The performance bar's numbers: qdlib speculative vs the teacher's generate and vs matched assisted generation."""
    rows = {(r["method"], r["mode"]): r for r in report["rows"] if r["kind"] == kind}
    spec, assisted = rows.get(("spec", "greedy")), rows.get(("assisted_matched", "greedy"))
    out = {"kind": kind}
    if spec:
        out.update(speedup=spec["speedup"], identical=spec["identical"], prompts=spec["prompts"])
        out["bar_2x"] = spec["speedup"] >= 2.0 and spec["identical"] == spec["prompts"]
    if spec and assisted:
        out["over_assisted_matched"] = spec["tokens_per_s"] / assisted["tokens_per_s"]
    return out


def _fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def report_markdown(report: dict) -> str:
    """The report as Markdown tables (one per prompt kind and mode), with costs and the sweep."""
    env = report["environment"]
    card = report["draft"].get("card")
    trained = f" ({card['steps']} training steps, test agreement {card['agreement']:.3f})" if card else ""
    lines = [f"# qd bench: {report['teacher']} teacher, draft layers {report['draft']['layers']}{trained}", "",
             f"{env['cpu']}, {env['torch_threads']} torch threads; Python {env['python']}, torch {env['torch']}, "
             f"transformers {env['transformers']}, qdlib {env['qdlib']}. "
             f"{report['config']['max_new_tokens']} new tokens per prompt, gamma {report['config']['gamma']}, "
             f"median of {report['config']['repeats']} repeats; run took {report['seconds']:.0f} s.", ""]
    c = report["costs"]
    for kind in KINDS:
        for mode in ("greedy", "sampling"):
            rows = [r for r in report["rows"] if r["kind"] == kind and r["mode"] == mode]
            if not rows:
                continue
            what = "held-out code" if kind == "code" else "knowledge paraphrases"
            lines += [f"## {what}, {mode}" + (f" (temperature {report['config']['temperature']})" if mode == "sampling" else ""),
                      "", "| method | tokens/s | speed-up | acceptance | tokens/target call | c | identical |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                cc = c["c"].get(DRAFT_OF.get(r["method"]))
                ident = f"{r['identical']}/{r['prompts']}" if "identical" in r else "(sampled)"
                lines.append(f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {_fmt(r.get('acceptance'))} "
                             f"| {_fmt(r['tokens_per_target_call'])} | {_fmt(cc)} | {ident} |")
            a = report["alpha"].get(kind)
            if a:
                lines += ["", f"Teacher-forced agreement of the draft on these prompts: {a['agreement']:.3f} "
                              f"(sum-min alpha {a['alpha']:.3f}, {a['positions']} positions). \"acceptance\" in the table "
                              "is accepted over proposed draft tokens: a round stops at its first rejection, so it is "
                              "lower than the per-token agreement."]
            lines.append("")
    lines += ["## Costs", "", f"One teacher step: {c['teacher_step_ms']:.2f} ms. Draft/teacher step ratio c: " +
              ", ".join(f"{k} {v:.3f}" for k, v in c["c"].items()) + ". Verification of g+1 tokens, in teacher steps: " +
              ", ".join(f"g={g}: {v:.2f}" for g, v in c["verify_cost"].items()) + ".", ""]
    split = [r for r in report["rows"] if "time_split" in r and r["mode"] == "greedy" and r["kind"] == "code"]
    if split:
        lines += ["Where the time goes (held-out code, greedy):", "", "| method | draft | verify | other |", "|---|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['time_split']['draft']:.0%} | {r['time_split']['verify']:.0%} | "
                  f"{r['time_split']['other']:.0%} |" for r in split]
        lines.append("")
    if report["sweep"]:
        lines += [f"## Gamma sweep (held-out code, greedy, {report['config']['sweep_prompts']} prompts)", "",
                  "Fewer prompts than the tables above, so its gamma-4 row need not match them. The theory columns use "
                  "the micro-benchmark costs above (c and the verification costs); notebook 06 shows that the costs "
                  "measured inside the loop are higher and bring the theory down to the measurement.", "",
                  "| gamma | speed-up vs generate | vs plain loop | theory vs plain loop | tokens/call | theory tokens/call |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['gamma']} | {s['speedup_vs_generate']:.2f}x | {s['speedup_vs_plain']:.2f}x | "
                  f"{s['theory_speedup_vs_plain']:.2f}x | {s['tokens_per_target_call']:.2f} | {s['theory_tokens_per_call']:.2f} |"
                  for s in report["sweep"]]
        lines.append("")
    h = headline(report)
    if "speedup" in h:
        lines += [f"**Headline** (held-out code, greedy): qdlib speculative decoding is {h['speedup']:.2f}x the teacher's "
                  f"own `generate`, output identical on {h['identical']}/{h['prompts']} prompts"
                  + (f", {h['over_assisted_matched']:.2f}x transformers assisted generation with matched settings"
                     if "over_assisted_matched" in h else "") + ".", ""]
    return "\n".join(lines)


def plot_report(report: dict):
    """One figure: speed-ups per method and kind (left), the gamma sweep with theory (right)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    greedy = [r for r in report["rows"] if r["mode"] == "greedy"]
    names = list(dict.fromkeys(r["method"] for r in greedy))
    kinds = [k for k in KINDS if any(r["kind"] == k for r in greedy)]
    w = 0.8 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        vals = {r["method"]: r for r in greedy if r["kind"] == kind}
        ys = [vals[n]["speedup"] if n in vals else 0 for n in names]
        bars = a.barh([i + j * w for i in range(len(names))], ys, height=w, label=kind)
        for bar_, n in zip(bars, names):
            r = vals.get(n)
            if r and "identical" in r and r["identical"] != r["prompts"]:
                a.text(bar_.get_width(), bar_.get_y() + w / 2, " output differs", va="center", fontsize=7)
    a.set_yticks([i + w * (len(kinds) - 1) / 2 for i in range(len(names))], [METHODS[n][0] for n in names], fontsize=8)
    a.axvline(1.0, color="grey", lw=0.8)
    a.axvline(2.0, color="grey", lw=0.8, ls="--")
    a.invert_yaxis()
    a.set_xlabel("speed-up over the teacher's greedy generate")
    a.legend(title="prompts")
    if report["sweep"]:
        s = report["sweep"]
        gs = [x["gamma"] for x in s]
        b.plot(gs, [x["theory_speedup_vs_plain"] for x in s], "-", label="theory (vs plain loop)")
        b.plot(gs, [x["speedup_vs_plain"] for x in s], "o", label="measured vs plain loop")
        b.plot(gs, [x["speedup_vs_generate"] for x in s], "s", label="measured vs generate")
        b.set_xlabel("gamma (draft tokens per round)")
        b.set_ylabel("speed-up")
        b.set_title(f"alpha {report['alpha']['code']['agreement']:.2f}, c {report['costs']['c']['spec']:.2f}", fontsize=9)
        b.legend(fontsize=8)
    else:
        b.axis("off")
    fig.tight_layout()
    return fig


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``report.json``, ``report.md`` and ``bench.png`` into ``out_dir`` (each atomically)."""
    from .io import atomic_dir, write_json_atomic

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(report_markdown(report), encoding="utf-8")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = plot_report(report)
        fig.savefig(tmp / "bench.png", dpi=110)
        plt.close(fig)
    return out_dir


def load_report(path: str | os.PathLike) -> dict:
    """Read a report written by :func:`write_report` (a folder or its ``report.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no bench report at {path}; run `qd bench` first")
    return json.loads(path.read_text(encoding="utf-8"))
