"""The distillation trainer behind `qd distill` (notebook 04).

    from qdlib.distill import load_config
    from qdlib.trainer import distill
    result = distill(load_config("qdlib/configs/distill_tiny.yaml"), run_dir="outputs/runs/distill/tiny")

It is built on Accelerate, so the same command runs on one CPU, one GPU, or
several processes (``accelerate launch -m qdlib.cli distill ...``): every process
takes its own slice of one deterministic global batch, and gradients are averaged.

What a user can rely on:

- AdamW, linear warm-up then cosine decay (``transformers.get_cosine_schedule_with_warmup``),
  gradient accumulation, gradient clipping, bf16 autocast where the hardware supports it;
- a NaN/Inf guard: a step whose loss or gradient norm is not finite is skipped and
  counted, and training stops with a clear message after ``max_bad_steps``;
- ``last.pt`` (model, optimizer, scheduler, step) written atomically every
  ``checkpoint_every`` steps, at every epoch end and on Ctrl-C; rerunning the same
  call resumes there and gives the same weights as an uninterrupted run;
- an evaluation every epoch on held-out validation prompts; ``best/`` (a
  ``save_pretrained`` folder plus the knowledge cache) is replaced only by a draft
  with higher validation agreement;
- a tqdm bar and a JSON log (``log.jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from . import paths
from .distill import DistillConfig, ce_loss, distill_loss, validate
from .distill_data import DistillData, EvalSet, build_distill_data, heldout_eval_set, paraphrase_eval_set, perplexity
from .errors import ConfigError, MissingFileError, QdError
from .io import append_jsonl, atomic_dir, torch_load_safe, torch_save_atomic, write_json_atomic
from .metrics import distribution_sums
from .progress import progress_bar

EVAL_SEED_VALIDATION = 1  # prompts that pick the best checkpoint
EVAL_SEED_TEST = 0  # prompts of the reported figures and the agreement bar (never used for selection)


class TrainingStopped(QdError, RuntimeError):
    """Training stopped on purpose (for example: too many non-finite losses)."""

    exit_code = 3


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _pair_metrics(teacher, draft, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 8) -> dict:
    """Sums over masked positions of KL(p||q), top-1 agreement, sum_x min(p, q) and the draft's CE on the ids."""
    dev_t = next(teacher.parameters()).device
    dev_d = next(draft.parameters()).device
    tot = {"kl": 0.0, "agreement": 0.0, "alpha": 0.0, "ce": 0.0, "n": 0}
    for i in range(0, len(ids), chunk):
        x = ids[i : i + chunk]
        m = mask[i : i + chunk, : x.shape[1] - 1]  # (b, T-1): predictions of tokens 1..T-1
        lp = torch.log_softmax(teacher(input_ids=x.to(dev_t), use_cache=False).logits[:, :-1].float().cpu(), -1)
        lq = torch.log_softmax(draft(input_ids=x.to(dev_d), use_cache=False).logits[:, :-1].float().cpu(), -1)
        for k, v in distribution_sums(lp, lq, m).items():
            tot[k] += v
        tot["ce"] += (-lq.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1) * m).sum().item()
    return tot


def evaluate_draft(teacher, draft, sets: dict[str, EvalSet], cache=None) -> dict:
    """Per set: KL(teacher || draft), top-1 agreement, expected sampling acceptance alpha = E[sum min(p, q)],
    and the draft's cross-entropy and perplexity, over the scored positions.

    With a knowledge ``cache`` and a draft that has fusion layers, every set is scored twice:
    with the cache attached (``name``) and detached (``name + "_no_cache"``). The draft's own
    attached cache is restored afterwards.
    """
    was_training, before = draft.training, draft.knowledge
    draft.eval()
    modes = [("", cache)]
    if cache is not None and len(getattr(draft, "fusion", [])):
        modes.append(("_no_cache", None))
    out = {}
    try:
        for suffix, c in modes:
            if hasattr(draft, "set_knowledge"):
                draft.set_knowledge(c)
            for name, es in sets.items():
                t = _pair_metrics(teacher, draft, es.ids, es.mask)
                n = max(t["n"], 1)
                out[name + suffix] = {"kl": t["kl"] / n, "agreement": t["agreement"] / n, "alpha": t["alpha"] / n,
                                      "ce": t["ce"] / n, "ppl": perplexity(t["ce"] / n), "positions": t["n"]}
    finally:
        if hasattr(draft, "set_knowledge"):
            draft.set_knowledge(before)
        draft.train(was_training)
    return out


def text_eval_set(tokenizer, texts, seq_len: int = 128, n: int = 16) -> EvalSet:
    """Held-out text windows, every position scored (cross-entropy / perplexity on real text)."""
    from .metrics import text_windows

    ids = text_windows(tokenizer, texts, seq_len=seq_len, n=n)
    return EvalSet(ids, torch.ones(ids.shape, dtype=torch.bool), "text")


def eval_sets(teacher, tokenizer, *, n_prompts: int, seed: int, items=None, texts=None,
              new_tokens: int = 64, text_windows: int = 16) -> dict[str, EvalSet]:
    """Held-out prompts continued by the teacher (and the items' evaluation paraphrases, and held-out text)."""
    from .teacher import heldout_texts

    texts = texts if texts is not None else heldout_texts()
    sets = {"heldout": heldout_eval_set(teacher, tokenizer, texts, n_prompts=n_prompts, seed=seed, new_tokens=new_tokens)}
    if items:
        sets["paraphrase"] = paraphrase_eval_set(teacher, tokenizer, items, new_tokens=min(new_tokens, 48))
    sets["text"] = text_eval_set(tokenizer, texts, n=text_windows)
    return sets


# ----------------------------------------------------------------------------- the draft to train


def draft_layers(cfg: DistillConfig, teacher, tokenizer=None) -> tuple[list[int], bool]:
    """The teacher layers the config asks for, and whether the ends must be kept."""
    from .metrics import strategy_layers, text_windows

    d = cfg.draft_model
    L = teacher.config.num_hidden_layers
    if d.sampled_indices is not None:
        return list(d.sampled_indices), True
    scores = None
    if d.strategy == "importance":
        from .sampling import layer_importance
        from .teacher import heldout_texts

        scores = layer_importance(teacher, text_windows(tokenizer, heldout_texts()[:4], seq_len=128, n=4))
    return strategy_layers(L, d.num_sampled_layers, d.strategy, scores), d.strategy != "first-k"


def set_trainable(draft, which: str) -> list[str]:
    """``all``, ``fusion`` (cross-attention fusion only) or ``body`` (all but embeddings and head); returns the names."""
    names = []
    for n, p in draft.named_parameters():
        if which == "all":
            on = True
        elif which == "fusion":
            on = n.startswith("fusion.")
        elif which == "body":
            on = not (n.startswith("model.embed_tokens") or n.startswith("lm_head"))
        else:
            raise ValueError(f"train_params={which!r}; allowed: all, fusion, body")
        p.requires_grad_(on)
        names += [n] if on else []
    return names


# ----------------------------------------------------------------------------- training


def _mixed_precision(choice: str) -> str:
    from .teacher import cpu_supports_bf16

    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_supports_bf16() else "no"


_BOOKKEEPING = ("num_epochs", "checkpoint_every", "eval_prompts", "eval_new_tokens", "eval_text_windows",
                "mixed_precision")


def _config_key(cfg: DistillConfig) -> dict:
    """Settings that must match to resume a run (epochs, evaluation and bookkeeping may change)."""
    d = dataclasses.asdict(cfg)
    for k in _BOOKKEEPING:
        d["training"].pop(k, None)
    return d


def _same_config(saved: dict, cfg: DistillConfig) -> bool:
    """Whether a checkpoint's config key matches ``cfg``.

    A key the checkpoint lacks (one added to the config after it was written) counts as
    its default value, so a run resumes when only such keys, left at their defaults, are new.
    """
    now = _config_key(cfg)
    defaults = _config_key(DistillConfig())
    saved = {sec: (dict(v) if isinstance(v, dict) else v) for sec, v in saved.items()}
    for sec, v in now.items():
        if isinstance(v, dict) and isinstance(saved.get(sec), dict):
            for k in v.keys() - saved[sec].keys():
                saved[sec][k] = defaults[sec][k]
            for k in _BOOKKEEPING:
                saved[sec].pop(k, None)
    return saved == now


def share_prepared(src, dst) -> Path:
    """Start run folder ``dst`` with the training data and knowledge cache that run ``src`` already built.

    ``distill`` reuses them when the data settings match (it checks a key and rebuilds otherwise),
    so runs that differ only in objective or schedule skip the teacher's generation (notebook 04).
    """
    import shutil

    src, dst = Path(src), Path(dst)
    if not (src / "data.pt").exists():
        raise FileNotFoundError(f"{src} holds no training data (data.pt); run distill there first")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "data.pt", dst / "data.pt")
    if (src / "knowledge_cache").is_dir() and not (dst / "knowledge_cache").exists():
        shutil.copytree(src / "knowledge_cache", dst / "knowledge_cache")
    return dst


def distill(cfg: DistillConfig, run_dir: str | os.PathLike | None = None, *, teacher=None, tokenizer=None,
            teacher_name: str | None = None, progress: bool = True, log=print, on_step=None) -> dict:
    """Train (or resume) a draft as ``cfg`` says; returns a summary with the run folder and the history.

    Args:
        teacher, tokenizer: an already loaded teacher (notebooks); otherwise ``teacher_name``
            (None: the default teacher, ``$QD_MODEL`` or the bundled one) is loaded on every process.
        on_step: called as ``on_step(step)`` after every optimizer step (tests use it to interrupt).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_cosine_schedule_with_warmup

    from .draft import build_draft
    from .knowledge import build_knowledge_cache, check_cache_matches, load_items, load_knowledge_cache, teacher_fingerprint
    from .models import load_teacher, model_name

    t = cfg.training
    AcceleratorState._reset_state()  # a fresh state per run (notebooks and tests call this more than once)
    acc = Accelerator(mixed_precision=_mixed_precision(t.mixed_precision),
                      gradient_accumulation_steps=t.gradient_accumulation_steps)
    main = acc.is_main_process
    say = log if main else (lambda *_: None)
    if teacher is None:
        teacher, tokenizer = load_teacher(teacher_name, device=acc.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the teacher")
    teacher.eval().requires_grad_(False)
    validate(cfg, teacher.config.num_hidden_layers)
    name = model_name(teacher)
    fp = teacher_fingerprint(teacher)
    run_dir = Path(run_dir) if run_dir else paths.runs_dir() / "distill" / "run"
    # no mkdir here: the first atomic write creates the folder, so Ctrl-C before it leaves no empty run folder

    # ---- the draft, its knowledge cache, the data (built once by the main process, then read by all)
    layers, keep_ends = draft_layers(cfg, teacher, tokenizer)
    torch.manual_seed(t.seed)
    draft = build_draft(teacher, layers, keep_ends=keep_ends, knowledge_enhancement=cfg.knowledge_block())
    draft.float()
    knowledge_on = cfg.knowledge_enhancement.enabled
    items = load_items(None, teacher)  # item rows are trained on (shared by the no-knowledge ablation); eval paraphrases scored
    cache = None
    cache_dir = run_dir / "knowledge_cache"
    data_path = run_dir / "data.pt"
    if main:
        if knowledge_on and not (cache_dir / "cache.safetensors").exists():
            say("building the knowledge cache ...")
            build_knowledge_cache(teacher, tokenizer, items, answer_tokens=t.knowledge_answer_tokens,
                                  progress=progress).save(cache_dir)
        data_key = json.dumps({k: getattr(t, k) for k in ("generated_sequences", "max_seq_length", "generated_share",
                                                          "item_share", "max_text_tokens", "seed", "item_new_tokens")} | {"teacher": fp})
        if not data_path.exists() or torch_load_safe(data_path).get("key") != data_key:
            say("preparing the training data (the teacher continues training prompts) ...")
            data = build_distill_data(
                teacher, tokenizer, generated=t.generated_sequences, seq_len=t.max_seq_length,
                items=items if t.item_share > 0 else None, item_new_tokens=t.item_new_tokens,
                generated_share=t.generated_share,
                item_share=t.item_share, max_text_tokens=t.max_text_tokens, seed=t.seed, progress=progress)
            torch_save_atomic(data.state_dict() | {"key": data_key}, data_path)
    acc.wait_for_everyone()
    data = DistillData.from_state_dict(torch_load_safe(data_path))
    if knowledge_on:
        cache = load_knowledge_cache(cache_dir)
        check_cache_matches(cache, teacher)
        draft.set_knowledge(cache)
    trainable = set_trainable(draft, t.train_params)
    params = [p for p in draft.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.learning_rate, betas=(0.9, 0.95))
    steps_per_epoch = t.steps_per_epoch or max(1, len(data.text) // (t.max_seq_length * t.batch_size *
                                                                     t.gradient_accumulation_steps * acc.num_processes))
    total = steps_per_epoch * t.num_epochs
    sched = get_cosine_schedule_with_warmup(opt, int(t.warmup_ratio * total), total)

    # ---- resume
    step, bad_steps, elapsed, tokens = 0, 0, 0.0, 0
    ckpt = run_dir / "last.pt"
    best_json = run_dir / "best" / "eval.json"
    best = json.loads(best_json.read_text())["validation_agreement"] if best_json.exists() else -1.0
    if ckpt.exists():
        state = torch_load_safe(ckpt)
        if not _same_config(state["config_key"], cfg) or state["teacher_fingerprint"] != fp:
            raise ConfigError(f"{ckpt} belongs to another configuration or teacher; use another run folder or delete it")
        draft.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, bad_steps, elapsed, tokens = state["step"], state["bad_steps"], state["elapsed"], state["tokens"]
        say(f"resuming from step {step} of {total}")
        if main and state.get("total_steps", total) != total:  # num_epochs changed: the cosine is re-stretched
            say(f"the schedule now ends at step {total} instead of {state['total_steps']}")
            append_jsonl(run_dir / "log.jsonl", {"step": step, "event": "schedule", "total_steps": total,
                                                 "previous_total_steps": state["total_steps"]})
    model, opt = acc.prepare(draft, opt)
    unwrapped = acc.unwrap_model(model)

    val_sets = None
    if main:
        val_sets = eval_sets(teacher, tokenizer, n_prompts=t.eval_prompts, seed=EVAL_SEED_VALIDATION, items=items,
                             new_tokens=t.eval_new_tokens, text_windows=t.eval_text_windows)

    def save_last():
        if main:
            torch_save_atomic({"model": unwrapped.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "step": step, "bad_steps": bad_steps,
                               "elapsed": elapsed, "tokens": tokens, "total_steps": total, "config_key": _config_key(cfg),
                               "teacher_fingerprint": fp}, ckpt)
        acc.wait_for_everyone()

    def end_of_epoch():
        nonlocal best
        if main:
            ev = evaluate_draft(teacher, unwrapped, val_sets, cache)
            agree = ev["heldout"]["agreement"]
            rec = {"step": step, "epoch": step // steps_per_epoch, "eval": ev, "elapsed_s": round(elapsed, 1)}
            append_jsonl(run_dir / "log.jsonl", rec)
            say(f"epoch {step // steps_per_epoch}: validation agreement {agree:.3f}, alpha {ev['heldout']['alpha']:.3f}, "
                f"KL {ev['heldout']['kl']:.3f}")
            if agree > best:
                with atomic_dir(run_dir / "best") as tmp:
                    unwrapped.save_pretrained(tmp)
                    if cache is not None:
                        cache.save(tmp / "knowledge_cache")
                    write_json_atomic(tmp / "eval.json", {"validation_agreement": agree, "step": step, "eval": ev,
                                                          "teacher": name, "layers": layers})
                best = agree
        save_last()

    model.train()
    mp = acc.mixed_precision
    say(f"distilling a draft of layers {layers} from {name}: {total} steps x {t.batch_size} rows x "
        f"{t.gradient_accumulation_steps} accumulation x {acc.num_processes} process(es), mixed precision {mp}, "
        f"training {len(trainable)} tensors")
    bar = progress_bar(total=total, initial=step, desc="distill", unit="step", enabled=progress and main)
    t_last = time.time()
    try:
        while step < total:
            window_bad, loss_sum = False, 0.0
            for micro in range(t.gradient_accumulation_steps):
                ids, valid = data.batch(step * t.gradient_accumulation_steps + micro, t.batch_size, t.max_seq_length,
                                        offset=acc.process_index, stride=acc.num_processes)
                if t.on_policy_share > 0:
                    ids, valid = _on_policy_rows(unwrapped, ids, valid, t, step * 100 + micro)
                x, y, m = ids[:, :-1].to(acc.device), ids[:, 1:].to(acc.device), valid.to(acc.device)
                with acc.accumulate(model):
                    with torch.no_grad(), acc.autocast():
                        p = teacher(input_ids=x, use_cache=False).logits  # (B, T, V)
                    q = model(input_ids=x, use_cache=False).logits  # (B, T, V)
                    if t.use_knowledge_distillation:
                        loss = distill_loss(q, p, y, m, kl_weight=t.kl_divergence_weight, temperature=t.temperature,
                                            objective=t.objective)
                    else:
                        loss = ce_loss(q, y, m)
                    bad = acc.reduce(torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=acc.device), "sum")
                    if bad.item() > 0:
                        window_bad = True
                    else:
                        acc.backward(loss)
                        loss_sum += loss.item() / t.gradient_accumulation_steps
                    tokens += int(m.sum()) * acc.num_processes
            gnorm = float("nan")
            if not window_bad:
                gnorm = float(acc.clip_grad_norm_(params, t.max_grad_norm))
                window_bad = not math.isfinite(gnorm)
            if window_bad:
                bad_steps += 1
                say(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_steps} so far)")
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped first step would make torch warn about the call order
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                sched.step()  # a skipped step still advances the schedule, so resumed runs line up
            step += 1
            now = time.time()
            elapsed += now - t_last
            t_last = now
            if main:
                append_jsonl(run_dir / "log.jsonl", {"step": step, "loss": None if window_bad else round(loss_sum, 5),
                                                     "lr": sched.get_last_lr()[0], "grad_norm": round(gnorm, 4),
                                                     "skipped": window_bad, "tokens": tokens, "elapsed_s": round(elapsed, 1)})
            bar.set_postfix(loss="nan" if window_bad else f"{loss_sum:.3f}", best=f"{max(best, 0):.3f}")
            bar.update(1)
            if bad_steps > t.max_bad_steps:
                save_last()
                raise TrainingStopped(f"{bad_steps} steps had a non-finite loss or gradient (max_bad_steps="
                                      f"{t.max_bad_steps}); lower training.learning_rate or check the data. "
                                      f"The last good weights are in {ckpt}")
            if step % steps_per_epoch == 0:
                end_of_epoch()
            elif step % t.checkpoint_every == 0:
                save_last()
            t_last = time.time()  # evaluation and checkpoint time is not training time
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        bar.close()
        save_last()  # the message says what was kept (the qd command prints it as its last line)
        raise KeyboardInterrupt(f"interrupted at step {step} of {total}; rerun the same call to resume from {ckpt}") from None
    bar.close()
    if step % steps_per_epoch != 0:  # a run that stopped between epochs (cannot happen with whole epochs)
        end_of_epoch()
    history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()] if main else []
    acc.wait_for_everyone()
    return {"run_dir": run_dir, "best_dir": run_dir / "best", "best_validation_agreement": best, "steps": step,
            "bad_steps": bad_steps, "tokens": tokens, "elapsed_s": elapsed, "layers": layers, "history": history,
            "model": unwrapped}


@torch.no_grad()
def _on_policy_rows(draft, ids: torch.Tensor, valid: torch.Tensor, t, seed: int, prompt_tokens: int = 32):
    """Replace a share of the rows by continuations the current draft samples itself (DistillSpec's on-policy data)."""
    n = int(round(t.on_policy_share * len(ids)))
    if n == 0:
        return ids, valid
    was = draft.training
    draft.eval()
    torch.manual_seed(seed)
    prompts = ids[:n, :prompt_tokens].to(draft.device)
    new = ids.shape[1] - prompt_tokens
    pad = draft.config.pad_token_id if draft.config.pad_token_id is not None else 0
    gen = draft.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                         do_sample=True, temperature=1.0, top_k=0, pad_token_id=pad).cpu()
    draft.train(was)
    ids, valid = ids.clone(), valid.clone()
    ids[:n] = gen[:, : ids.shape[1]]
    valid[:n] = True
    return ids, valid


# ----------------------------------------------------------------------------- curves


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
    from .metrics import running_mean

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
    import shutil

    import matplotlib.pyplot as plt

    from .draft import DraftForCausalLM
    from .knowledge import load_items, load_knowledge_cache
    from .models import load_teacher, model_name
    from .teacher import _cpu_name

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    best = run_dir / "best"
    if not (best / "config.json").exists():
        raise MissingFileError(f"{best} holds no trained draft; run the training first (without --export-only)")
    if teacher is None:
        teacher, tokenizer = load_teacher(teacher_name)
    draft = DraftForCausalLM.from_pretrained(best, dtype=torch.bfloat16).float().eval()
    cache = load_knowledge_cache(best / "knowledge_cache", teacher) if (best / "knowledge_cache").exists() else None
    knowledge_on = draft.config.knowledge_enhancement["enabled"]
    items = load_items(None, teacher)  # the paraphrase set is reported for every draft, cache or not
    log("measuring the draft on the test prompts ...")
    sets = eval_sets(teacher, tokenizer, n_prompts=n_prompts, seed=EVAL_SEED_TEST, items=items)
    ev = evaluate_draft(teacher, draft, sets, cache)
    train, evals = read_log(run_dir)
    chosen = json.loads((best / "eval.json").read_text())
    metrics = {
        "teacher": model_name(teacher),
        "layers": list(draft.config.kept_layers),
        "knowledge": knowledge_on,
        "test_prompts": n_prompts,
        "test": ev,
        "agreement": ev["heldout"]["agreement"],
        "best_step": chosen["step"],
        "validation_agreement": chosen["validation_agreement"],
        "steps": train[-1]["step"] if train else 0,
        "tokens_seen": train[-1]["tokens"] if train else 0,
        "train_wall_time_s": train[-1]["elapsed_s"] if train else 0.0,
        "skipped_steps": sum(1 for r in train if r.get("skipped")),
        "hardware": f"{_cpu_name()} ({os.cpu_count()} cores)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "config": dataclasses.asdict(cfg) if cfg is not None else None,
        "schedule_restarts": schedule_restarts(train),
        "fusion_gate_max": max((g.gate.detach().float().tanh().abs().max().item() for g in draft.fusion.values()), default=None),
    }
    notes = run_dir / "NOTES.md"  # hand-written circumstances of the run (shared cores, interruptions), if any
    with atomic_dir(out_dir) as tmp:
        draft.to(torch.bfloat16).save_pretrained(tmp)
        if cache is not None:
            shutil.copytree(best / "knowledge_cache", tmp / "knowledge_cache")
        write_json_atomic(tmp / "metrics.json", metrics)
        fig = plot_curves(run_dir, tmp / "curves.png")
        plt.close(fig)
        (tmp / "README.md").write_text(_draft_card(title, metrics, evals,
                                                   notes.read_text().strip() if notes.exists() else None))
    log(json.dumps({k: metrics[k] for k in ("agreement", "validation_agreement", "steps", "train_wall_time_s")}))
    return metrics


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
knowledge fusion {'on (the cache of the knowledge items is in `knowledge_cache/`)' if m['knowledge'] else 'off'}.
Trained by `qd distill` (qdlib, notebook 04); load it with `qdlib.load_draft()`.

## Training
{m['steps']} optimizer steps, {m['tokens_seen']:,} scored tokens, {m['train_wall_time_s'] / 60:.0f} minutes on {m['hardware']}.
Loss: {t.get('kl_divergence_weight')} x T^2 x {str(t.get('objective', 'kl')).upper()}(teacher || draft) + {1 - t.get('kl_divergence_weight', 0):.1f} x CE, T = {t.get('temperature')};
batch {t.get('batch_size')} x {t.get('max_seq_length')} tokens, learning rate {t.get('learning_rate')} (warm-up, cosine), train_params {t.get('train_params')}.
Data: the teacher's training text (standard-library training files), {t.get('generated_sequences')} training prompts continued
greedily by the teacher (share {t.get('generated_share')}), item-conditioned sequences: the knowledge questions and their
training paraphrases continued by the teacher (share {t.get('item_share')}; the evaluation paraphrases are never trained on).
Validation agreement per epoch (32 held-out prompts, seed 1): {per_epoch}; the best epoch (step {m['best_step']}) is shipped.
Skipped (non-finite) steps: {m['skipped_steps']}.{restarts}{gates}
{notes}
## Test figures (never used for selection)
Agreement = teacher-forced top-1 agreement with the teacher on its own greedy continuations (the per-token
greedy acceptance rate); alpha = E[sum_x min(p, q)] (the sampling acceptance); KL = KL(teacher || draft) in nats;
CE / ppl = the draft's cross-entropy / perplexity on the scored tokens. "heldout": the {m['test_prompts']} test prompts
(64 tokens from held-out standard-library files, seed 0) continued 64 tokens by the teacher; "paraphrase": the
knowledge items' evaluation paraphrases continued 48 tokens; "text": held-out text windows (real code, not the
teacher's).{' "no cache": the same draft with its knowledge cache detached.' if no_cache else ''}

| set | agreement | alpha | KL | CE | ppl | positions |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Course bar: held-out agreement >= 0.80 ({'met' if m['agreement'] >= 0.80 else 'NOT met'}): **{m['agreement']:.3f}**.

![curves](curves.png)
"""
