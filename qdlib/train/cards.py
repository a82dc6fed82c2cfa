"""A distillation run's curves and card: the log read back, the plots, and :func:`export_draft`.

:func:`export_draft` measures the best draft of a run on the test prompts (never used for selection) and writes it
with its figures, its curves and a card that states every training stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from ..settings.distill import DistillConfig
from ..draft import DraftForCausalLM
from ..errors import MissingFileError
from ..hardware import cpu_name
from ..io import atomic_dir, write_json_atomic
from ..knowledge import load_items, load_knowledge_cache
from ..memories import is_live
from ..metrics import running_mean
from ..models import load_teacher, model_name
from ..schema import renamed
from .evaluate import EVAL_SEED_TEST, eval_sets, evaluate_draft

def read_log(run_dir) -> tuple[list[dict], list[dict]]:
    """Training rows and evaluation rows of ``log.jsonl``, as the surviving trajectory.

    A run interrupted between checkpoints has logged steps that its resumption repeats (it restarts
    from ``last.pt``); those superseded rows are dropped, so every step appears once.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval": {}}, {"step": 3, "loss": 9.0},
    ...         {"step": 3, "loss": 1.5}, {"step": 4, "loss": 1.0}, {"step": 4, "eval": {}}]
    >>> _ = (d / "log.jsonl").write_text("\\n".join(json.dumps(r) for r in rows))
    >>> train, evals = read_log(d)
    >>> [(r["step"], r["loss"]) for r in train], [r["step"] for r in evals]
    ([(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)], [2, 4])
    """
    train: list[dict] = []
    evals: list[dict] = []
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            while train and train[-1]["step"] >= r["step"]:  # superseded by a resumed run
                train.pop()
            while evals and evals[-1]["step"] >= r["step"]:
                evals.pop()
            train.append(r)
        elif "eval" in r:
            while evals and evals[-1]["step"] >= r["step"]:
                evals.pop()
            evals.append(r)
    return train, evals


def schedule_restarts(train: list[dict]) -> list[tuple[int, float, float]]:
    """Steps where the learning rate rose again after it had started to fall: ``(step, rate before, rate after)``.

    That happens when a run is resumed with more epochs (``num_epochs`` may change on resume):
    the cosine is re-stretched over the new length. Read from the log, so the card says so itself.

    >>> rows = [{"step": s, "lr": lr} for s, lr in enumerate([0.5, 1.0, 0.6, 0.1, 0.0, 0.3, 0.2], 1)]
    >>> schedule_restarts(rows)
    [(5, 0.0, 0.3)]
    """
    out, fell = [], False
    for prev, row in zip(train, train[1:]):
        if row["lr"] < prev["lr"]:
            fell = True
        elif fell and row["lr"] > prev["lr"]:
            out.append((prev["step"], prev["lr"], row["lr"]))
            fell = False
    return out


def plot_curves(run_dir, path=None):
    """Loss (running mean) and validation agreement per epoch; saved to ``path`` when given. Returns the figure."""
    import matplotlib.pyplot as plt

    train, evals = read_log(run_dir)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in train if r["loss"] is not None]
    loss = [r["loss"] for r in train if r["loss"] is not None]
    smooth = running_mean(loss, 20)
    a.plot(steps, smooth)
    a.set_xlabel("step")
    a.set_ylabel("distillation loss (running mean)")
    a.set_title("training loss")
    if evals:
        for key, style in (("heldout", "o-"), ("paraphrase", "s-"), ("heldout_no_cache", "o--")):
            pts = [(r["step"], r["eval"][key]["agreement"]) for r in evals if key in r["eval"]]
            if pts:
                b.plot(*zip(*pts), style, label=key.replace("_", " "))
        b.legend()
    b.set_xlabel("step")
    b.set_ylabel("top-1 agreement with the teacher")
    b.set_title("validation agreement (teacher's greedy continuations)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# ----------------------------------------------------------------------------- export


def export_draft(run_dir, out_dir, *, teacher=None, tokenizer=None, teacher_name: str | None = None,
                 cfg: DistillConfig | None = None, n_prompts: int = 50, title: str = "qdlib reference draft",
                 log=print) -> dict:
    """Measure the best draft of ``run_dir`` on the test prompts and write it to ``out_dir``.

    ``out_dir`` gets bf16 safetensors weights and config, the knowledge cache, ``metrics.json``
    (test prompts: seed 0, never used to pick the checkpoint), a card and the curves as PNG.
    The figures are measured on the weights as shipped (bf16 rounded, computed in float32).
    """
    import matplotlib.pyplot as plt


    run_dir, out_dir = Path(run_dir), Path(out_dir)
    best = run_dir / "best"
    if not (best / "config.json").exists():
        raise MissingFileError(f"{best} holds no trained draft; run the training first (without --export-only)")
    if teacher is None:
        teacher, tokenizer = load_teacher(teacher_name)
    draft = DraftForCausalLM.from_pretrained(best, dtype=torch.bfloat16).float().eval()
    cache = load_knowledge_cache(best / "knowledge_cache", teacher) if (best / "knowledge_cache").exists() else None
    kb = draft.config.knowledge_enhancement
    knowledge_on = kb["enabled"]
    if knowledge_on and kb.get("memory") == "live":
        cache = draft.set_knowledge("live").knowledge  # measured (and shipped) reading the verified text
    items = load_items(None, teacher)  # the paraphrase set is reported for every draft, cache or not
    log("measuring the draft on the test prompts ...")
    sets = eval_sets(teacher, tokenizer, n_prompts=n_prompts, seed=EVAL_SEED_TEST, items=items, unfamiliar=True)
    ev = evaluate_draft(teacher, draft, sets, cache)
    train, evals = read_log(run_dir)
    chosen = json.loads((best / "eval.json").read_text())
    stages = _training_stages(cfg, train)
    metrics = {
        "teacher": model_name(teacher),
        "layers": list(draft.config.kept_layers),
        "knowledge": knowledge_on,
        "memory": (f"live, teacher layers {list(cache.layers)}" if is_live(cache) else "static")
        if knowledge_on else None,
        "test_prompts": n_prompts,
        "test": ev,
        "agreement": ev["heldout"]["agreement"],
        "best_step": chosen["step"],
        "validation_agreement": chosen["validation_agreement"],
        "steps": sum(st["steps"] for st in stages),  # all stages: a run that started from a draft adds its budget
        "tokens_seen": sum(st["tokens_seen"] for st in stages),
        "train_wall_time_s": round(sum(st["train_wall_time_s"] for st in stages), 1),
        "stages": stages,
        "skipped_steps": sum(1 for r in train if r.get("skipped")),
        "hardware": f"{cpu_name()} ({os.cpu_count()} cores)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "config": dataclasses.asdict(cfg) if cfg is not None else None,
        "schedule_restarts": schedule_restarts(train),
        "fusion_gate_max": max((g.gate.detach().float().tanh().abs().max().item() for g in draft.fusion.values()), default=None),
    }
    notes = run_dir / "NOTES.md"  # hand-written circumstances of the run (shared cores, interruptions), if any
    with atomic_dir(out_dir) as tmp:
        draft.to(torch.bfloat16).save_pretrained(tmp)
        if (best / "knowledge_cache").exists() and not is_live(cache):
            shutil.copytree(best / "knowledge_cache", tmp / "knowledge_cache")
        write_json_atomic(tmp / "metrics.json", metrics)
        fig = plot_curves(run_dir, tmp / "curves.png")
        plt.close(fig)
        (tmp / "README.md").write_text(_draft_card(title, metrics, evals,
                                                   notes.read_text().strip() if notes.exists() else None))
    log(json.dumps({k: metrics[k] for k in ("agreement", "validation_agreement", "steps", "train_wall_time_s")}))
    return metrics


def _training_stages(cfg: DistillConfig | None, train: list[dict]) -> list[dict]:
    """The training behind a draft: the stages of the draft it started from (``training.init_from``), then this run.

    A stage is ``{"steps", "tokens_seen", "train_wall_time_s", "data"}``; the card states every stage, and its totals
    are what a comparison of budgets (the ablation's against the reference draft's) reads.
    """
    t = cfg.training if cfg is not None else None
    this = {"steps": train[-1]["step"] if train else 0, "tokens_seen": train[-1]["tokens"] if train else 0,
            "train_wall_time_s": train[-1]["elapsed_s"] if train else 0.0,
            "data": _stage_data(dataclasses.asdict(t) if t is not None else {})}
    if t is None or not t.init_from:
        return [this]
    m = Path(t.init_from) / "metrics.json"
    if not m.is_file():  # a draft folder without a card (e.g. save_pretrained): its budget is unknown
        return [{"steps": 0, "tokens_seen": 0, "train_wall_time_s": 0.0, "data": f"unknown ({t.init_from})"}, this]
    before = json.loads(m.read_text())
    earlier = before.get("stages") or [{k: before.get(k, 0) for k in ("steps", "tokens_seen", "train_wall_time_s")}
                                       | {"data": _stage_data((before.get("config") or {}).get("training", {}))}]
    return [*earlier, this]


def _stage_data(t: dict) -> str:
    """One line on a stage's data mix."""
    if not t:
        return "unknown"
    return (f"text of {t.get('text_sources', 'stdlib')}; teacher continuations {t.get('generated_share')}, items "
            f"{t.get('item_share')}, on-policy {t.get('on_policy_share') or 0}")


def _sources_text(t: dict) -> str:
    src = [x.strip() for x in str(t.get("text_sources", "stdlib")).split(",")]
    names = {"stdlib": "standard-library training files", "torch": "torch sources", "transformers": "transformers sources"}
    return ", ".join(names.get(x, x) for x in src)


def _on_policy_text(t: dict) -> str:
    share = t.get("on_policy_share") or 0
    return (f"; on-policy rows: continuations the current draft samples itself, scored by the teacher (share {share})"
            if share else "")


def _stages_text(m: dict) -> str:
    stages = m.get("stages") or []
    if len(stages) < 2:
        return ""
    rows = "".join(f"\n- stage {i + 1}: {st['steps']} steps, {st['tokens_seen']:,} tokens, "
                   f"{st['train_wall_time_s'] / 60:.0f} minutes; {st['data']}" for i, st in enumerate(stages))
    return (f"\nThe run continued a draft trained before it (training.init_from); the totals above count every stage, "
            f"the curves and validation figures below are the last stage's:{rows}")


def _unfamiliar_bar(m: dict) -> str:
    u = m["test"].get("unfamiliar")
    return (f"\nOn unfamiliar code (bar >= 0.80, {'met' if u['agreement'] >= 0.80 else 'NOT met'}): **{u['agreement']:.3f}**."
            if u else "")


def _memory_text(m: dict) -> str:
    if not m["knowledge"]:
        return "off"
    if str(m.get("memory") or "").startswith("live"):
        return (f"on, reading a live memory ({m['memory']}): the teacher's states of the verified text, fed by "
                f"the verification passes (`qdlib.memories`); \"no cache\" below is the same weights detached")
    return "on (the cache of the knowledge items is in `knowledge_cache/`)"


def _draft_card(title: str, m: dict, evals: list[dict], notes: str | None = None) -> str:
    rows = []
    for name, v in m["test"].items():
        rows.append(f"| {name.replace('_', ' ')} | {v['agreement']:.3f} | {v['alpha']:.3f} | {v['kl']:.3f} | "
                    f"{v['ce']:.3f} | {v['ppl']:.1f} | {v['positions']} |")
    per_epoch = ", ".join(f"{r['eval']['heldout']['agreement']:.3f}" for r in evals)
    cfg = m["config"]
    t = cfg["training"] if cfg else {}
    restarts = "".join(f"\nAt step {s} the run was resumed with more epochs: the cosine schedule was re-stretched over the "
                       f"new length, so the learning rate jumped from {a:.2g} to {b:.2g}." for s, a, b in m.get("schedule_restarts", []))
    gates = (f"\nFusion gates after training: largest |tanh(gate)| {m['fusion_gate_max']:.4f} (0 = closed, 1 = fully open)."
             if m.get("fusion_gate_max") is not None else "")
    no_cache = any(k.endswith("_no_cache") for k in m["test"])
    notes = f"\n## Run notes\n{notes}\n" if notes else ""
    return f"""# {title}

A draft model for speculative decoding with the teacher `{m['teacher']}`: teacher decoder layers {m['layers']},
knowledge fusion {_memory_text(m)}.
Trained by `qd distill` (qdlib, notebook 04); load it with `qdlib.load_draft()`.

## Training
{m['steps']} optimizer steps, {m['tokens_seen']:,} scored tokens, {m['train_wall_time_s'] / 60:.0f} minutes on {m['hardware']}.
Loss: {t.get('kl_divergence_weight')} x T^2 x {str(t.get('objective', 'kl')).upper()}(teacher || draft) + {1 - t.get('kl_divergence_weight', 0):.1f} x CE, T = {t.get('temperature')};
batch {t.get('batch_size')} x {t.get('max_seq_length')} tokens, learning rate {t.get('learning_rate')} (warm-up, cosine), train_params {t.get('train_params')}.
Data: the teacher's training text ({_sources_text(t)}), {t.get('generated_sequences')} training prompts continued
greedily by the teacher (share {t.get('generated_share')}), item-conditioned sequences: the knowledge questions and their
training paraphrases continued by the teacher (share {t.get('item_share')}; the evaluation paraphrases are never trained on){_on_policy_text(t)}.{_stages_text(m)}
Validation agreement per epoch (32 held-out prompts, seed 1): {per_epoch}; the best epoch (step {m['best_step']}) is shipped.
Skipped (non-finite) steps: {m['skipped_steps']}.{restarts}{gates}
{notes}
## Test figures (never used for selection)
Agreement = teacher-forced top-1 agreement with the teacher on its own greedy continuations (alpha for greedy
decoding); alpha = E[sum_x min(p, q)] (the expected acceptance probability); KL = KL(teacher || draft) in nats;
CE / ppl = the draft's cross-entropy / perplexity on the scored tokens. "heldout": the {m['test_prompts']} test prompts
(64 tokens from held-out standard-library files, seed 0) continued 64 tokens by the teacher; "unfamiliar": 48 prompts
of third-party package sources that no training here uses (`outputs/heldout_code`), continued 64 tokens; "paraphrase": the
knowledge items' evaluation paraphrases continued 48 tokens; "text": held-out text windows (real code, not the
teacher's).{' "no cache": the same draft with its knowledge cache detached.' if no_cache else ''}

| set | agreement | alpha | KL | CE | ppl | positions |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Course bar: held-out agreement >= 0.80 ({'met' if m['agreement'] >= 0.80 else 'NOT met'}): **{m['agreement']:.3f}**.{_unfamiliar_bar(m)}

![curves](curves.png)
"""


def fast_card(m: dict) -> str:
    """The fast draft's card (README.md) from its measured figures ``m`` (``metrics.json``)."""
    a, cfg, init = m["agreement"], renamed(m["config"]), m.get("init")
    rows = "\n".join(f"| {k.replace('_', ' ')} | {v['depth1']:.3f} | {v['depth2']:.3f} | {v['positions']} |"
                     for k, v in a.items())
    speeds = ", ".join(f"{g}: {s:.1f}" for g, s in m["gamma_speeds_validation"].items())
    n = m["num_layers"]
    layers = f"{n} decoder layer" + ("s" if n > 1 else "")
    positions = m["steps"] * cfg["batch_size"] * cfg["max_seq_length"]
    planned = "" if m["steps"] == cfg["steps"] else f" (of {cfg['steps']} planned: the best checkpoint)"
    start = "initialised from the teacher's last layers"
    grown = ""
    if init:
        start = "grown from an earlier trained draft"
        grown = (f"- Continued from an earlier {init['num_layers']}-layer fast draft ({init['steps']} steps, "
                 f"{init['positions'] / 1e6:.1f}M token positions, {init['train_time_s'] / 60:.0f} min), grown to {n} "
                 f"layers by layers whose output projections start at zero (`feature_train.grow_from`): the grown "
                 f"draft starts as exactly the earlier one.\n")
    return f"""# The fast draft (feature-fed, {layers})

A draft that reads the teacher (EAGLE, Li et al. 2024): at each position it takes the teacher's last hidden
state before the token and the token's embedding, runs them through {layers}
({start}) and predicts the teacher's next hidden state, which the teacher's own
head turns into a distribution. Load it with `qdlib.load_draft("fast")`; decode with
`qdlib.speculative_generate(teacher, draft, input_ids)` (it carries its tuned gamma). It cannot serve as
transformers' `assistant_model` (generate() does not pass the teacher's hidden states to an assistant).

## Training
{grown}- {m['steps']} steps{planned} of {cfg['batch_size']} x {cfg['max_seq_length']} tokens ({positions / 1e6:.1f}M
  token positions), {m['train_time_s'] / 60:.0f} min of training on a 2-core CPU.
- Data: windows of the teacher's own training mix (source weights {cfg['source_weights']}, at most
  {cfg['max_tokens_per_source']} tokens per source) and, for {cfg['generated_share']:.0%} of rows, the teacher's
  greedy continuations of {cfg['generated']} training prompts. No held-out standard-library file and no third-party
  package of `qdlib.heldout_code` was used.
- Loss: KL(teacher || draft) + {cfg['feature_weight']} x smooth-L1 on the predicted features, at depth 1 (teacher
  features) and depth 2 (the draft's own predicted features, weight {cfg['unroll_weight']}). AdamW, learning rate {cfg['learning_rate']},
  {cfg['warmup_steps']} warm-up steps then cosine to {cfg['min_lr_ratio']:.0%}.
- Best checkpoint by validation agreement (mean of depths 1 and 2 on held-out standard-library prompts, seed 1):
  {m['validation_agreement']:.3f}.

## Measured (from the exported bf16 weights)

Teacher-forced top-1 agreement with the teacher's greedy continuations. Depth 1: the draft reads the teacher's
true feature (its first proposal of a round); depth 2: it reads its own predicted feature (its second proposal).

| prompts | depth 1 | depth 2 | positions |
|---|---:|---:|---:|
{rows}

- Step cost c (one draft step over one teacher step, micro-benchmark): {m['c']:.3f}.
- Tuned gamma {m['gamma']} (fastest on 6 validation prompts; tokens/s by gamma: {speeds}).
- Speed-ups over the teacher's `generate` and over `generate_plain` are measured by `qd bench`
  (`outputs/bench_fast/report.md`: this draft beside the reference draft, on unfamiliar and standard-library code).
"""
