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
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import paths
from .corpus import heldout_texts, pad_id
from .distill import DistillConfig, ce_loss, distill_loss, text_sources, validate
from .distill_data import (DistillData, EvalSet, build_distill_data, heldout_eval_set, paraphrase_eval_set, perplexity,
                           unfamiliar_eval_set)
from .draft import DraftForCausalLM, build_draft
from .hardware import cpu_name, cpu_supports_bf16
from .errors import ConfigError, MissingFileError, QdError
from .io import append_jsonl, atomic_dir, torch_load_safe, torch_save_atomic, write_json_atomic
from .knowledge import build_knowledge_cache, check_cache_matches, load_items, load_knowledge_cache, teacher_fingerprint
from .metrics import distribution_sums, running_mean, strategy_layers, text_windows
from .models import load_teacher, model_name
from .progress import progress_bar
from .sampling import EARLY_EXIT, layer_importance
from .training import adamw, config_changes

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


# ----------------------------------------------------------------------------- the draft to train


def draft_layers(cfg: DistillConfig, teacher, tokenizer=None) -> tuple[list[int], bool]:
    """The teacher layers the config asks for, and whether the ends must be kept."""
    d = cfg.draft_model
    L = teacher.config.num_hidden_layers
    if d.sampled_indices is not None:
        return list(d.sampled_indices), True
    scores = None
    if d.strategy == "importance":
        scores = layer_importance(teacher, tokenizer, heldout_texts()[:4])  # 4 held-out files, as qd compare-layers
    return strategy_layers(L, d.num_sampled_layers, d.strategy, scores), d.strategy != EARLY_EXIT


def start_from(draft, folder) -> None:
    """Load the weights of the draft in ``folder`` (a ``save_pretrained`` folder of the same kept layers) into
    ``draft``; fusion blocks that the saved draft lacks keep their fresh, closed-gate initialisation."""
    from safetensors.torch import load_file

    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if saved is None or not (folder / "model.safetensors").is_file():
        raise MissingFileError(f"training.init_from={str(folder)!r} is not a draft folder (config.json and "
                               f"model.safetensors)")
    if saved.get("kept_layers") != draft.config.kept_layers:
        raise ConfigError(f"training.init_from={str(folder)!r} keeps layers {saved.get('kept_layers')}, this run "
                          f"{draft.config.kept_layers}")
    missing, unexpected = draft.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith("fusion.") and k != "lm_head.weight"]
    if missing or unexpected:
        raise ConfigError(f"training.init_from={str(folder)!r} does not fit this draft (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); same layers and knowledge block needed")
    draft.tie_weights()


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


def share_prepared(src, dst) -> Path:
    """Start run folder ``dst`` with the training data and knowledge cache that run ``src`` already built.

    ``distill`` reuses them when the data settings match (it checks a key and rebuilds otherwise),
    so runs that differ only in objective or schedule skip the teacher's generation (notebook 04).
    """
    src, dst = Path(src), Path(dst)
    if not (src / "data.pt").exists():
        raise FileNotFoundError(f"{src} holds no training data (data.pt); run distill there first")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "data.pt", dst / "data.pt")
    if (src / "knowledge_cache").is_dir() and not (dst / "knowledge_cache").exists():
        shutil.copytree(src / "knowledge_cache", dst / "knowledge_cache")
    return dst


@dataclass
class TrainState:
    """The counters of a distillation run; ``last.pt`` saves them with the weights."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient
    elapsed: float = 0.0  # training seconds (evaluation and checkpoints excluded)
    tokens: int = 0  # scored tokens, over all processes
    best: float = -1.0  # best validation agreement so far (-1: no evaluation yet)


@dataclass
class _Run:
    """Everything one distillation run trains with, prepared once by :func:`_prepare_run`."""

    cfg: DistillConfig
    acc: object  # the accelerate.Accelerator
    teacher: object
    tokenizer: object
    draft: object  # the unwrapped draft (what is saved and evaluated)
    model: object  # the draft as prepared by Accelerate (what is trained)
    opt: torch.optim.Optimizer
    sched: object
    params: list
    data: DistillData
    cache: object  # the knowledge cache, or None
    items: list
    layers: list[int]
    trainable: list[str]
    name: str
    fingerprint: str
    run_dir: Path
    steps_per_epoch: int
    total: int
    say: object
    val_sets: dict | None = None

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def precision(self) -> str:
        """``bf16`` or ``no``: the configured mixed precision, applied by :meth:`autocast`."""
        return _mixed_precision(self.cfg.training.mixed_precision)

    def autocast(self):
        """bf16 autocast on the run's device when mixed precision is on (qdlib's own, not Accelerate's: the
        process-wide ``AcceleratorState`` then never needs resetting between runs)."""
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "last.pt"


def _accelerator(t):
    from accelerate import Accelerator

    # Mixed precision is qdlib's own autocast (_Run.autocast), so every run creates Accelerate's process-wide state
    # the same way and several runs in one process (notebooks, tests) need no private reset between them.
    return Accelerator(gradient_accumulation_steps=t.gradient_accumulation_steps)


def _prepare_data(cfg: DistillConfig, teacher, tokenizer, items, fp: str, run_dir: Path, progress: bool, say) -> None:
    """Build the knowledge cache and the training data in ``run_dir`` unless they are there (main process only)."""
    t = cfg.training
    cache_dir, data_path = run_dir / "knowledge_cache", run_dir / "data.pt"
    if cfg.knowledge_enhancement.enabled and not (cache_dir / "cache.safetensors").exists():
        say("building the knowledge cache ...")
        build_knowledge_cache(teacher, tokenizer, items, answer_tokens=t.knowledge_answer_tokens,
                              progress=progress).save(cache_dir)
    data_key = json.dumps({k: getattr(t, k) for k in ("generated_sequences", "max_seq_length", "generated_share",
                                                      "item_share", "max_text_tokens", "seed", "item_new_tokens")}
                          | {"teacher": fp} | ({"sources": text_sources(t)} if text_sources(t) != ("stdlib",) else {}))
    if not data_path.exists() or torch_load_safe(data_path).get("key") != data_key:
        say("preparing the training data (the teacher continues training prompts) ...")
        data = build_distill_data(
            teacher, tokenizer, generated=t.generated_sequences, seq_len=t.max_seq_length,
            items=items if t.item_share > 0 else None, item_new_tokens=t.item_new_tokens,
            generated_share=t.generated_share,
            item_share=t.item_share, max_text_tokens=t.max_text_tokens, sources=text_sources(t), seed=t.seed,
            progress=progress)
        torch_save_atomic(data.state_dict() | {"key": data_key}, data_path)


def _prepare_run(cfg: DistillConfig, run_dir, teacher, tokenizer, teacher_name, progress: bool, log) -> _Run:
    """The accelerator, the teacher, the draft with its knowledge cache, the data, the optimiser and the schedule."""
    from transformers import get_cosine_schedule_with_warmup

    t = cfg.training
    acc = _accelerator(t)
    say = log if acc.is_main_process else (lambda *_: None)
    if teacher is None:
        teacher, tokenizer = load_teacher(teacher_name, device=acc.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the teacher")
    teacher.eval().requires_grad_(False)
    validate(cfg, teacher.config.num_hidden_layers)
    fp = teacher_fingerprint(teacher)
    run_dir = Path(run_dir) if run_dir else paths.runs_dir() / "distill" / "run"
    # no mkdir here: the first atomic write creates the folder, so Ctrl-C before it leaves no empty run folder

    # ---- the draft, its knowledge cache, the data (built once by the main process, then read by all)
    layers, keep_ends = draft_layers(cfg, teacher, tokenizer)
    torch.manual_seed(t.seed)
    draft = build_draft(teacher, layers, keep_ends=keep_ends, knowledge_enhancement=cfg.knowledge_block())
    draft.float()
    if t.init_from:
        start_from(draft, t.init_from)
    items = load_items(None, teacher)  # item rows are trained on (shared by the no-knowledge ablation); eval paraphrases scored
    if acc.is_main_process:
        _prepare_data(cfg, teacher, tokenizer, items, fp, run_dir, progress, say)
    acc.wait_for_everyone()
    data = DistillData.from_state_dict(torch_load_safe(run_dir / "data.pt"))
    cache = None
    if cfg.knowledge_enhancement.enabled:
        cache = load_knowledge_cache(run_dir / "knowledge_cache")
        check_cache_matches(cache, teacher)
        draft.set_knowledge(cache)
    trainable = set_trainable(draft, t.train_params)
    params = [p for p in draft.parameters() if p.requires_grad]
    fusion = [p for n, p in draft.named_parameters() if n.startswith("fusion.") and p.requires_grad]
    opt = adamw(params, t.learning_rate, t.weight_decay, scaled=fusion, scale=t.fusion_lr_scale)
    steps_per_epoch = t.steps_per_epoch or max(1, len(data.text) // (t.max_seq_length * t.batch_size *
                                                                     t.gradient_accumulation_steps * acc.num_processes))
    total = steps_per_epoch * t.num_epochs
    sched = get_cosine_schedule_with_warmup(opt, int(t.warmup_ratio * total), total)
    return _Run(cfg=cfg, acc=acc, teacher=teacher, tokenizer=tokenizer, draft=draft, model=draft, opt=opt, sched=sched,
                params=params, data=data, cache=cache, items=items, layers=layers, trainable=trainable,
                name=model_name(teacher), fingerprint=fp, run_dir=run_dir, steps_per_epoch=steps_per_epoch,
                total=total, say=say)


def _resume(run: _Run) -> TrainState:
    """The counters to start from: those of ``last.pt`` (weights, optimiser and schedule restored), else zeros."""
    best_json = run.run_dir / "best" / "eval.json"
    state = TrainState(best=json.loads(best_json.read_text())["validation_agreement"] if best_json.exists() else -1.0)
    if not run.ckpt.exists():
        return state
    saved = torch_load_safe(run.ckpt)
    diff = config_changes(saved["config_key"], dataclasses.asdict(run.cfg), dataclasses.asdict(DistillConfig()),
                          may_change=[f"training.{k}" for k in _BOOKKEEPING])
    if diff or saved["teacher_fingerprint"] != run.fingerprint:
        what = (f"another configuration (saved, requested): {diff}" if diff else
                f"another teacher (fingerprint {saved['teacher_fingerprint']}, this one {run.fingerprint})")
        raise ConfigError(f"{run.ckpt} belongs to {what}; use another run folder or delete it")
    run.draft.load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["optimizer"])
    run.sched.load_state_dict(saved["scheduler"])
    state.step, state.bad_steps, state.elapsed, state.tokens = (saved["step"], saved["bad_steps"], saved["elapsed"],
                                                                saved["tokens"])
    run.say(f"resuming from step {state.step} of {run.total}")
    if run.main and saved.get("total_steps", run.total) != run.total:  # num_epochs changed: the cosine is re-stretched
        run.say(f"the schedule now ends at step {run.total} instead of {saved['total_steps']}")
        append_jsonl(run.run_dir / "log.jsonl", {"step": state.step, "event": "schedule", "total_steps": run.total,
                                                 "previous_total_steps": saved["total_steps"]})
    return state


def _save_last(run: _Run, state: TrainState) -> None:
    """Write ``last.pt`` (weights, optimiser, schedule, counters) atomically; every process waits for it."""
    if run.main:
        torch_save_atomic({"model": run.draft.state_dict(), "optimizer": run.opt.state_dict(),
                           "scheduler": run.sched.state_dict(), "step": state.step, "bad_steps": state.bad_steps,
                           "elapsed": state.elapsed, "tokens": state.tokens, "total_steps": run.total,
                           "config_key": _config_key(run.cfg), "teacher_fingerprint": run.fingerprint}, run.ckpt)
    run.acc.wait_for_everyone()


def _micro_batch(run: _Run, state: TrainState, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and scored-position mask of one micro-batch (on-policy rows replaced first when configured)."""
    t, acc = run.cfg.training, run.acc
    ids, valid = run.data.batch(state.step * t.gradient_accumulation_steps + micro, t.batch_size, t.max_seq_length,
                                offset=acc.process_index, stride=acc.num_processes)
    if t.on_policy_share > 0:
        ids, valid = _on_policy_rows(run.draft, ids, valid, t, state.step * 100 + micro)
    return ids[:, :-1].to(acc.device), ids[:, 1:].to(acc.device), valid.to(acc.device)  # (B, T) each


def _loss(run: _Run, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The configured objective on one micro-batch: distillation from the teacher's logits, or plain CE."""
    t = run.cfg.training
    with torch.no_grad(), run.autocast():
        p = run.teacher(input_ids=x, use_cache=False).logits  # (B, T, V)
    with run.autocast():
        q = run.model(input_ids=x, use_cache=False).logits.float()  # (B, T, V), float32 for the loss
    if t.use_knowledge_distillation:
        return distill_loss(q, p, y, m, kl_weight=t.kl_divergence_weight, temperature=t.temperature, objective=t.objective)
    return ce_loss(q, y, m)


def _train_step(run: _Run, state: TrainState) -> tuple[bool, float, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches, with the NaN guard.

    A step whose loss (on any process) or gradient norm is not finite is skipped: no update, counted
    in ``state.bad_steps``. The schedule advances either way, so a resumed run lines up.
    Returns ``(skipped, loss, grad_norm)``.
    """
    t, acc = run.cfg.training, run.acc
    skipped, loss_sum = False, 0.0
    for micro in range(t.gradient_accumulation_steps):
        x, y, m = _micro_batch(run, state, micro)
        with acc.accumulate(run.model):
            loss = _loss(run, x, y, m)
            bad = acc.reduce(torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=acc.device), "sum")
            if bad.item() > 0:
                skipped = True
            else:
                acc.backward(loss)
                loss_sum += loss.item() / t.gradient_accumulation_steps
            state.tokens += int(m.sum()) * acc.num_processes
    gnorm = float("nan")
    if not skipped:
        gnorm = float(acc.clip_grad_norm_(run.params, t.max_grad_norm))
        skipped = not math.isfinite(gnorm)
    if skipped:
        state.bad_steps += 1
        run.say(f"step {state.step + 1}: non-finite loss or gradient, step skipped ({state.bad_steps} so far)")
    else:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step would make torch warn about the call order
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        run.sched.step()  # a skipped step still advances the schedule, so resumed runs line up
    state.step += 1
    return skipped, loss_sum, gnorm


def _end_of_epoch(run: _Run, state: TrainState) -> None:
    """Evaluate on the validation sets, replace ``best/`` when the agreement improved, save ``last.pt``."""
    if run.main:
        ev = evaluate_draft(run.teacher, run.draft, run.val_sets, run.cache)
        agree = ev["heldout"]["agreement"]
        epoch = state.step // run.steps_per_epoch
        append_jsonl(run.run_dir / "log.jsonl", {"step": state.step, "epoch": epoch, "eval": ev,
                                                 "elapsed_s": round(state.elapsed, 1)})
        run.say(f"epoch {epoch}: validation agreement {agree:.3f}, alpha {ev['heldout']['alpha']:.3f}, "
                f"KL {ev['heldout']['kl']:.3f}")
        if agree > state.best:
            with atomic_dir(run.run_dir / "best") as tmp:
                run.draft.save_pretrained(tmp)
                if run.cache is not None:
                    run.cache.save(tmp / "knowledge_cache")
                write_json_atomic(tmp / "eval.json", {"validation_agreement": agree, "step": state.step, "eval": ev,
                                                      "teacher": run.name, "layers": run.layers})
            state.best = agree
    _save_last(run, state)


def _after_step(run: _Run, state: TrainState, skipped: bool, loss: float, gnorm: float) -> None:
    """Log the step; stop on too many bad steps; evaluate at an epoch's end, else checkpoint when due."""
    t = run.cfg.training
    if run.main:
        append_jsonl(run.run_dir / "log.jsonl", {"step": state.step, "loss": None if skipped else round(loss, 5),
                                                 "lr": run.sched.get_last_lr()[0], "grad_norm": round(gnorm, 4),
                                                 "skipped": skipped, "tokens": state.tokens,
                                                 "elapsed_s": round(state.elapsed, 1)})
    if state.bad_steps > t.max_bad_steps:
        _save_last(run, state)
        raise TrainingStopped(f"{state.bad_steps} steps had a non-finite loss or gradient (max_bad_steps="
                              f"{t.max_bad_steps}); lower training.learning_rate or check the data. "
                              f"The last good weights are in {run.ckpt}")
    if state.step % run.steps_per_epoch == 0:
        _end_of_epoch(run, state)
    elif state.step % t.checkpoint_every == 0:
        _save_last(run, state)


def distill(cfg: DistillConfig, run_dir: str | os.PathLike | None = None, *, teacher=None, tokenizer=None,
            teacher_name: str | None = None, progress: bool = True, log=print, on_step=None) -> dict:
    """Train (or resume) a draft as ``cfg`` says; returns a summary with the run folder and the history.

    The named steps, in order: :func:`_prepare_run` (accelerator, teacher, draft, cache and data, optimiser),
    :func:`_resume` (``last.pt``, if any), then per optimizer step :func:`_train_step` (micro-batches and the
    NaN guard) and :func:`_after_step` (the log; :func:`_end_of_epoch` or a checkpoint when due). The
    counters live in one :class:`TrainState`.

    Args:
        teacher, tokenizer: an already loaded teacher (notebooks); otherwise ``teacher_name``
            (None: the default teacher, ``$QD_MODEL`` or the bundled one) is loaded on every process.
        on_step: called as ``on_step(step)`` after every optimizer step (tests use it to interrupt).
    """
    run = _prepare_run(cfg, run_dir, teacher, tokenizer, teacher_name, progress, log)
    state = _resume(run)
    run.model, run.opt = run.acc.prepare(run.draft, run.opt)
    run.draft = run.acc.unwrap_model(run.model)
    t = cfg.training
    if run.main:
        run.val_sets = eval_sets(run.teacher, run.tokenizer, n_prompts=t.eval_prompts, seed=EVAL_SEED_VALIDATION,
                                 items=run.items, new_tokens=t.eval_new_tokens, text_windows=t.eval_text_windows)
    run.model.train()
    run.say(f"distilling a draft of layers {run.layers} from {run.name}: {run.total} steps x {t.batch_size} rows x "
            f"{t.gradient_accumulation_steps} accumulation x {run.acc.num_processes} process(es), mixed precision "
            f"{run.precision}, training {len(run.trainable)} tensors")
    bar = progress_bar(total=run.total, initial=state.step, desc="distill", unit="step", enabled=progress and run.main)
    t_last = time.time()
    try:
        while state.step < run.total:
            skipped, loss, gnorm = _train_step(run, state)
            state.elapsed += time.time() - t_last
            bar.set_postfix(loss="nan" if skipped else f"{loss:.3f}", best=f"{max(state.best, 0):.3f}")
            bar.update(1)
            _after_step(run, state, skipped, loss, gnorm)
            t_last = time.time()  # evaluation and checkpoint time is not training time
            if on_step is not None:
                on_step(state.step)
    except KeyboardInterrupt:
        bar.close()
        _save_last(run, state)  # the message says what was kept (the qd command prints it as its last line)
        raise KeyboardInterrupt(f"interrupted at step {state.step} of {run.total}; rerun the same call to resume "
                                f"from {run.ckpt}") from None
    bar.close()
    history = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()] if run.main else []
    run.acc.wait_for_everyone()
    return {"run_dir": run.run_dir, "best_dir": run.run_dir / "best", "best_validation_agreement": state.best,
            "steps": state.step, "bad_steps": state.bad_steps, "tokens": state.tokens, "elapsed_s": state.elapsed,
            "layers": run.layers, "history": history, "model": run.draft}


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
    pad = pad_id(draft.config)
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
    knowledge_on = draft.config.knowledge_enhancement["enabled"]
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
        if cache is not None:
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
Data: the teacher's training text ({_sources_text(t)}), {t.get('generated_sequences')} training prompts continued
greedily by the teacher (share {t.get('generated_share')}), item-conditioned sequences: the knowledge questions and their
training paraphrases continued by the teacher (share {t.get('item_share')}; the evaluation paraphrases are never trained on){_on_policy_text(t)}.{_stages_text(m)}
Validation agreement per epoch (32 held-out prompts, seed 1): {per_epoch}; the best epoch (step {m['best_step']}) is shipped.
Skipped (non-finite) steps: {m['skipped_steps']}.{restarts}{gates}
{notes}
## Test figures (never used for selection)
Agreement = teacher-forced top-1 agreement with the teacher on its own greedy continuations (the per-token
greedy acceptance rate); alpha = E[sum_x min(p, q)] (the sampling acceptance); KL = KL(teacher || draft) in nats;
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
