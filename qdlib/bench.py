"""Every way to decode with the teacher, measured side by side in one run (``qd bench``, notebook 06).

    >>> from qdlib import load_teacher, load_draft
    >>> from qdlib.bench import BenchConfig, run_bench
    >>> from qdlib.report import report_markdown
    >>> teacher, tok = load_teacher(); draft = load_draft()
    >>> # a small run (BenchConfig() is the full bench)
    >>> cfg = BenchConfig(n_prompts=1, max_new_tokens=8, repeats=1, temperature=0, gammas=(4,), sweep_prompts=0,
    ...                   methods=("teacher_generate", "spec"), kinds=("code",), cost_repeats=3)
    >>> report = run_bench(teacher, tok, {"reference": draft}, cfg)
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
from pathlib import Path

import torch

from . import __version__, paths
from .bench_methods import ROLE_OF, Run, check_drafts, make_methods, method_label
from .corpus import heldout_prompts, heldout_texts
from .decoding import Settings
from .drafters import as_drafter
from .heldout_code import heldout_code_prompts
from .hardware import cpu_name
from .knowledge import load_items
from .metrics import distribution_metrics, expected_speedup, expected_tokens_per_call
from .models import model_name
from .progress import progress_bar
from .settings.bench import METHODS, BenchConfig
from .timing import step_time, verify_split

SAMPLING_METHODS = ("teacher_generate", "teacher_plain", "spec", "assisted_matched", "fast", "fast_chain",
                    "fast_lookup")
# repeats of one method whose tokens/s differ by more than this share of their median mark the row unreliable
BUSY_MARGIN = 0.25


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


# ----------------------------------------------------------------------------- agreement


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
            label, group = method_label(name)
            row = {"method": name, "label": label, "group": group, "kind": kind, "mode": mode,
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


def measure_costs(teacher, drafts: dict, cfg: BenchConfig) -> dict:
    """Step costs in teacher steps: ``c`` per draft (one draft step over one teacher step) and ``verify_cost[g]``.

    ``c`` is keyed as ``DRAFT_OF`` names the drafts: the reference is ``"spec"`` (and ``"spec_no_cache"`` with its
    cache detached, when one is attached), every other entry of ``drafts`` its own name.
    """
    ctx = cfg.prompt_tokens + cfg.max_new_tokens // 2
    n = cfg.cost_repeats
    t_step = step_time(teacher, ctx, n=n)
    costs = {"teacher_step_ms": 1e3 * t_step, "c": {}}
    draft = drafts["reference"]
    for name, d in drafts.items():  # each drafter times its own drafting path
        costs["c"]["spec" if name == "reference" else name] = as_drafter(d, Settings()).step_cost(ctx) / t_step
    if draft.knowledge is not None:  # the same draft without its cross-attention to the cache
        attached = draft.knowledge
        try:
            costs["c"]["spec_no_cache"] = as_drafter(draft.set_knowledge(None), Settings()).step_cost(ctx) / t_step
        finally:
            draft.set_knowledge(attached)
    costs["verify_cost"] = {str(g): step_time(teacher, ctx, tokens=g + 1, n=n) / t_step
                            for g in sorted(set(cfg.gammas) | {cfg.gamma})}
    # where v(g) - 1 goes, with transformers' forward (before) and qdlib's engine (after, what the loops use)
    costs["verify_split"] = {e: verify_split(teacher, (1, 2, 4, 6, 8), ctx, n=n, engine=e)
                             for e in ("transformers", "qdlib")}
    return costs


def _gamma_sweep(teacher, tokenizer, draft, cfg: BenchConfig, prompts: list, refs: list, alpha: float, costs: dict,
                 bar) -> list[dict]:
    """Speculative decoding at every gamma of ``cfg.gammas`` on ``prompts``: measured speed-ups and the theory's."""
    drafts = {"reference": draft}
    sweep_methods = make_methods(teacher, tokenizer, drafts, dataclasses.replace(cfg, methods=("teacher_plain",)))
    for gm in cfg.gammas:
        sweep_methods[f"gamma{gm}"] = make_methods(
            teacher, tokenizer, drafts, dataclasses.replace(cfg, gamma=gm, methods=("spec",)))["spec"]
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


def run_bench(teacher, tokenizer, drafts: dict, cfg: BenchConfig | None = None, *, progress: bool = True,
              log=print) -> dict:
    """Measure every method of ``cfg`` on the same prompts; returns the report (a JSON-able dict).

    ``drafts``: name -> draft; the bench builds none. ``"reference"`` (required) is the layer-sampled draft of the
    ``spec`` rows, the assisted and hybrid rows, the teacher-forced agreement and the gamma sweep; ``"fast"`` (a
    feature-fed draft, :func:`qdlib.load_draft("fast") <qdlib.draft_files.load_draft>`) adds the fast rows;
    ``"untrained_uniform"`` and ``"early_exit"`` the ablations' (:func:`qdlib.bench_methods.ablation_drafts` makes
    them). Any other name is a draft of your own: one more method of that name, decoding with the draft's own
    settings. Methods whose draft is absent are left out.

    Write it with :func:`qdlib.report.write_report`, read it with :func:`qdlib.report.report_markdown`.
    """
    cfg = (cfg or BenchConfig()).validate()
    drafts = check_drafts(drafts)
    teacher.eval()
    draft = drafts["reference"].eval()
    attached = draft.knowledge
    prompts = bench_prompts(teacher, tokenizer, cfg, attached.items if attached is not None else None)
    methods = make_methods(teacher, tokenizer, drafts, cfg)
    modes = [("greedy", 0.0)] + ([("sampling", cfg.temperature)] if cfg.temperature > 0 else [])
    jobs = [(mode, t, name) for mode, t in modes for name in methods
            if mode == "greedy" or name in SAMPLING_METHODS or name not in METHODS]
    n_calls = sum(len(p) for p in prompts.values()) * len(jobs) * cfg.repeats
    sweep_calls = (len(cfg.gammas) + 2) * min(cfg.sweep_prompts, len(prompts.get("code", []))) * cfg.repeats
    bar = progress_bar(total=n_calls + sweep_calls, desc="bench", unit="call", enabled=progress)

    t_start = time.perf_counter()
    rows, refs = _measure_rows(methods, prompts, cfg, modes, jobs, bar)
    # the costs, and the teacher-forced agreement and alpha, behind the theory
    used = {ROLE_OF.get(n, n) for n in methods} | {"reference"}  # a draft's own method is named as the draft
    costs = measure_costs(teacher, {n: d for n, d in drafts.items() if n in used}, cfg)
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
        "fast_draft": None if "fast" not in methods else {k: getattr(drafts["fast"].config, k, None) for k in
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


