"""The distillation trainer behind `qd distill` (notebook 04).

    from qdlib.settings import load_config
    from qdlib.trainer import distill
    result = distill(load_config("qdlib/configs/distill_tiny.yaml"), run_dir="outputs/runs/distill/tiny")

It is built on Accelerate, so the same command runs on one CPU, one GPU, or
several processes (``accelerate launch -m qdlib.cli distill ...``): every process
takes its own slice of one deterministic global batch, and gradients are averaged.

Training runs on the one loop, :func:`qdlib.train.fit` (AdamW, warm-up and cosine, accumulation, clipping,
bf16 autocast where the hardware supports it, the NaN guard, ``last.pt`` and resume bit for bit, ``best/``,
``log.jsonl``, Ctrl-C), with :class:`DistillRecipe`: an evaluation every epoch on held-out validation prompts;
``best/`` (a ``save_pretrained`` folder plus the knowledge cache) is replaced only by a draft with higher
validation agreement. With ``knowledge_enhancement.memory: live`` the fusion blocks read the teacher's states of
the row itself (:mod:`qdlib.memories`), from the same teacher pass that gives the KL targets, each position
lagging 1..``training.live_max_lag`` tokens behind as drafting does. The evaluation (:mod:`qdlib.train.evaluate`) and the card (:mod:`qdlib.train.cards`) are
importable from here too, as the notebooks use them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import paths
from .corpus import heldout_texts, pad_id
from .distill import ce_loss, distill_loss
from .settings.distill import DistillConfig, text_sources, validate
from .distill_data import DistillData, build_distill_data
from .draft import build_draft
from .hardware import use_bf16
from .errors import ConfigError, MissingFileError
from .io import torch_load_safe, torch_save_atomic, write_json_atomic
from .knowledge import build_knowledge_cache, check_cache_matches, load_items, load_knowledge_cache, teacher_fingerprint
from .memories import LiveMemory, draw_lags, is_live, teacher_states
from .metrics import strategy_layers
from .models import load_teacher, model_name
from .sampling import layer_importance
from .settings.names import EARLY_EXIT
from .train import FitConfig, Recipe, TrainingStopped, fit
from .train.cards import export_draft, plot_curves, read_log, schedule_restarts
from .train.evaluate import EVAL_SEED_TEST, EVAL_SEED_VALIDATION, eval_sets, evaluate_draft, text_eval_set
from .train.optim import adamw

__all__ = ["DistillRecipe", "EVAL_SEED_TEST", "EVAL_SEED_VALIDATION", "TrainingStopped", "distill", "distill_recipe",
           "draft_layers", "eval_sets", "evaluate_draft", "export_draft", "plot_curves", "read_log", "schedule_restarts",
           "set_trainable", "share_prepared", "start_from", "text_eval_set"]

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
    ``draft``; fusion weights that the saved draft lacks, holds in another shape (a live memory of several layers is
    wider than one), or trained to read another kind of memory (a static cache, for a live run) keep their fresh
    initialisation, the gates at ``knowledge_enhancement.gate_init``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    saved = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if saved is None or not (folder / "model.safetensors").is_file():
        raise MissingFileError(f"training.init_from={str(folder)!r} is not a draft folder (config.json and "
                               f"model.safetensors)")
    if saved.get("kept_layers") != draft.config.kept_layers:
        raise ConfigError(f"training.init_from={str(folder)!r} keeps layers {saved.get('kept_layers')}, this run "
                          f"{draft.config.kept_layers}")
    mine = draft.state_dict()
    other_memory = (saved.get("knowledge_enhancement") or {}).get("memory", "static") != \
        draft.config.knowledge_enhancement.get("memory", "static")
    saved_state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
                   if not (k.startswith("fusion.") and (other_memory or (k in mine and mine[k].shape != v.shape)))}
    missing, unexpected = draft.load_state_dict(saved_state, strict=False)
    missing = [k for k in missing if not k.startswith("fusion.") and k != "lm_head.weight"]
    if missing or unexpected:
        raise ConfigError(f"training.init_from={str(folder)!r} does not fit this draft (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); same layers and knowledge block needed")
    draft.tie_weights()


def set_trainable(draft, which: str) -> list[str]:
    """``all``, ``fusion`` (cross-attention fusion only) or ``body`` (all but embeddings and head); returns the names.

    >>> set_trainable(draft, "head")
    Traceback (most recent call last):
    ...
    ValueError: train_params='head'; allowed: all, fusion, body
    """
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


_BOOKKEEPING = ("num_epochs", "checkpoint_every", "eval_prompts", "eval_new_tokens", "eval_text_windows",
                "mixed_precision")


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
class DistillRecipe(Recipe):
    """Layer-sampled distillation as a :class:`~qdlib.train.Recipe` (prepared by :func:`distill_recipe`).

    A micro-batch is this process's slice of one deterministic global batch (on-policy rows replaced first when
    configured); the loss is the configured objective against the teacher's logits (or plain CE); the score is the
    validation agreement on held-out prompts; ``best/`` is a ``save_pretrained`` folder with the knowledge cache.
    """

    cfg: DistillConfig
    acc: object  # the accelerate.Accelerator
    teacher: object
    tokenizer: object
    draft: object  # the unwrapped draft (what is saved and evaluated)
    data: DistillData
    cache: object  # the knowledge cache, or None
    items: list
    layers: list[int]
    trainable: list[str]
    teacher_label: str  # the teacher's name, as model_name() gives it
    fingerprint: str
    run_dir: Path
    steps_per_epoch: int
    say: object
    val_sets: dict | None = None
    tokens: int = 0  # scored tokens, over all processes
    model: object = None  # the draft as prepared by Accelerate (what is trained)

    @property
    def device(self):
        return self.acc.device

    def parameters(self):
        return [p for p in self.draft.parameters() if p.requires_grad]

    def optimizer(self, fc: FitConfig) -> torch.optim.Optimizer:
        """AdamW (fusion blocks at ``fusion_lr_scale`` times the rate), prepared by Accelerate with the draft."""
        fusion = [p for n, p in self.draft.named_parameters() if n.startswith("fusion.") and p.requires_grad]
        opt = adamw(self.parameters(), fc.learning_rate, fc.weight_decay, scaled=fusion, scale=self.cfg.training.fusion_lr_scale)
        self.model, opt = self.acc.prepare(self.draft, opt)
        self.draft = self.acc.unwrap_model(self.model)
        return opt

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """``(inputs, labels, scored, lags)``, each ``(B, T)``; ``lags`` (a live memory's, else None) is drawn from
        a generator seeded by the step, so a resumed run sees the same ones."""
        t, acc = self.cfg.training, self.acc
        index = step * t.gradient_accumulation_steps + micro
        ids, valid = self.data.batch(index, t.batch_size, t.max_seq_length, offset=acc.process_index,
                                     stride=acc.num_processes)
        if t.on_policy_share > 0:
            ids, valid = _on_policy_rows(self.draft, ids, valid, t, step * 100 + micro)
        self.tokens += int(valid.sum()) * acc.num_processes
        lags = None
        if is_live(self.cache):
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + index * 64 + acc.process_index)
            lags = draw_lags((ids.shape[0], ids.shape[1] - 1), t.live_max_lag, gen).to(acc.device)  # (B, T)
        return ids[:, :-1].to(acc.device), ids[:, 1:].to(acc.device), valid.to(acc.device), lags  # (B, T) each

    def loss(self, batch, autocast) -> tuple[torch.Tensor, dict]:
        """The configured objective on one micro-batch: distillation from the teacher's logits, or plain CE.

        With a live memory the one teacher pass gives the logits and the states the draft reads."""
        (x, y, m, lags), t = batch, self.cfg.training
        memory = {}
        with torch.no_grad(), autocast():
            if lags is None:
                p = self.teacher(input_ids=x, use_cache=False).logits  # (B, T, V)
            else:
                p, states = teacher_states(self.teacher, x, self.cache.layers)  # (B, T, V), (B, T, D)
                memory = {"memory": LiveMemory(self.cache.layers, states), "memory_lags": lags}
        with autocast():
            q = self.model(input_ids=x, use_cache=False, **memory).logits.float()  # (B, T, V), float32 for the loss
        if t.use_knowledge_distillation:
            loss = distill_loss(q, p, y, m, kl_weight=t.kl_divergence_weight, temperature=t.temperature,
                                objective=t.objective)
        else:
            loss = ce_loss(q, y, m)
        return loss, {"tokens": self.tokens}

    def score(self) -> tuple[float, dict]:
        ev = evaluate_draft(self.teacher, self.draft, self.val_sets, self.cache)
        self.say(f"validation agreement {ev['heldout']['agreement']:.3f}, alpha {ev['heldout']['alpha']:.3f}, "
                 f"KL {ev['heldout']['kl']:.3f}")
        return ev["heldout"]["agreement"], ev

    def save(self, folder: Path, info: dict) -> None:
        self.draft.save_pretrained(folder)
        if self.cache is not None and not is_live(self.cache):  # a live memory is built while decoding, not saved
            self.cache.save(folder / "knowledge_cache")
        write_json_atomic(folder / "eval.json", {"validation_agreement": info["score"], "step": info["step"],
                                                 "eval": info["eval"], "teacher": self.teacher_label, "layers": self.layers})

    def state_dict(self) -> dict:
        return {"model": self.draft.state_dict(), "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.draft.load_state_dict(state["model"])
        self.tokens = state["tokens"]

    def config(self) -> dict:
        return dataclasses.asdict(self.cfg) | {"teacher_fingerprint": self.fingerprint}

    def check_resume(self, saved: dict, fc: FitConfig, where: Path) -> None:
        if saved.get("teacher_fingerprint") != self.fingerprint:
            raise ConfigError(f"{where} belongs to another teacher (fingerprint {saved.get('teacher_fingerprint')}, "
                              f"this one {self.fingerprint}); use another run folder or delete it")
        super().check_resume(saved, fc, where)

    def config_defaults(self) -> dict:
        return dataclasses.asdict(DistillConfig())

    def train_mode(self) -> None:
        self.model.train()


def _accelerator():
    from accelerate import Accelerator

    # Mixed precision is qdlib's own autocast (FitConfig.bf16) and accumulation fit()'s own, so every run creates
    # Accelerate's process-wide state the same way and several runs in one process (notebooks, tests) need no reset.
    return Accelerator()


def _prepare_data(cfg: DistillConfig, teacher, tokenizer, items, fp: str, run_dir: Path, progress: bool, say) -> None:
    """Build the knowledge cache and the training data in ``run_dir`` unless they are there (main process only)."""
    t = cfg.training
    cache_dir, data_path = run_dir / "knowledge_cache", run_dir / "data.pt"
    static = cfg.knowledge_enhancement.enabled and cfg.knowledge_enhancement.memory == "static"
    if static and not (cache_dir / "cache.safetensors").exists():
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


def _knowledge(cfg: DistillConfig, draft, teacher, run_dir: Path):
    """The run's memory, attached to ``draft``: the knowledge cache, a live memory (the layers it reads; the states
    come with each batch), or None without knowledge enhancement."""
    if not cfg.knowledge_enhancement.enabled:
        return None
    if cfg.knowledge_enhancement.memory == "live":
        return draft.set_knowledge("live").knowledge
    cache = load_knowledge_cache(run_dir / "knowledge_cache")
    check_cache_matches(cache, teacher)
    draft.set_knowledge(cache)
    return cache


def distill_recipe(cfg: DistillConfig, run_dir=None, *, teacher=None, tokenizer=None, teacher_name: str | None = None,
                   progress: bool = True, log=print) -> tuple[DistillRecipe, FitConfig]:
    """The accelerator, the teacher, the draft with its knowledge cache, the data (built once by the main process,
    then read by all) and the validation sets: the recipe and the loop settings of a distillation run."""
    t, acc = cfg.training, _accelerator()
    say = log if acc.is_main_process else (lambda *_: None)
    if teacher is None:
        teacher, tokenizer = load_teacher(teacher_name, device=acc.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the teacher")
    teacher.eval().requires_grad_(False)
    validate(cfg, teacher.config.num_hidden_layers)
    fp = teacher_fingerprint(teacher)
    run_dir = Path(run_dir) if run_dir else paths.runs_dir() / "distill" / "run"
    layers, keep_ends = draft_layers(cfg, teacher, tokenizer)
    torch.manual_seed(t.seed)
    draft = build_draft(teacher, layers, keep_ends=keep_ends, knowledge_enhancement=cfg.knowledge_block()).float()
    if t.init_from:
        start_from(draft, t.init_from)
    items = load_items(None, teacher)  # item rows are trained on (shared by the no-knowledge ablation); eval paraphrases scored
    if acc.is_main_process:
        _prepare_data(cfg, teacher, tokenizer, items, fp, run_dir, progress, say)
    acc.wait_for_everyone()
    data = DistillData.from_state_dict(torch_load_safe(run_dir / "data.pt"))
    cache = _knowledge(cfg, draft, teacher, run_dir)
    trainable = set_trainable(draft, t.train_params)
    steps_per_epoch = t.steps_per_epoch or max(1, len(data.text) // (t.max_seq_length * t.batch_size *
                                                                     t.gradient_accumulation_steps * acc.num_processes))
    recipe = DistillRecipe(cfg=cfg, acc=acc, teacher=teacher, tokenizer=tokenizer, draft=draft, data=data, cache=cache,
                           items=items, layers=layers, trainable=trainable, teacher_label=model_name(teacher), fingerprint=fp,
                           run_dir=run_dir, steps_per_epoch=steps_per_epoch, say=say)
    if acc.is_main_process:
        recipe.val_sets = eval_sets(teacher, tokenizer, n_prompts=t.eval_prompts, seed=EVAL_SEED_VALIDATION, items=items,
                                    new_tokens=t.eval_new_tokens, text_windows=t.eval_text_windows)
    return recipe, _fit_config(cfg, steps_per_epoch * t.num_epochs, steps_per_epoch)


def _fit_config(cfg: DistillConfig, total: int, steps_per_epoch: int) -> FitConfig:
    """The loop's settings: an evaluation at every epoch's end; epochs, evaluation and bookkeeping may change."""
    t = cfg.training
    return FitConfig(steps=total, learning_rate=t.learning_rate, warmup_steps=int(t.warmup_ratio * total),
                     min_lr_ratio=0.0, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                     accumulation=t.gradient_accumulation_steps, bf16=use_bf16(t.mixed_precision),
                     max_bad_steps=t.max_bad_steps, checkpoint_every=t.checkpoint_every, eval_every=steps_per_epoch,
                     may_change=tuple(f"training.{k}" for k in _BOOKKEEPING))


def distill(cfg: DistillConfig, run_dir: str | os.PathLike | None = None, *, teacher=None, tokenizer=None,
            teacher_name: str | None = None, progress: bool = True, log=print, on_step=None) -> dict:
    """Train (or resume) a draft as ``cfg`` says; returns a summary with the run folder and the history.

    :func:`distill_recipe` prepares the run (accelerator, teacher, draft, cache and data, validation sets);
    :func:`qdlib.train.fit` trains it (schedule, NaN guard, ``last.pt``, ``best/``, the log, Ctrl-C).

    Args:
        teacher, tokenizer: an already loaded teacher (notebooks); otherwise ``teacher_name``
            (None: the default teacher, ``$QD_MODEL`` or the bundled one) is loaded on every process.
        on_step: called as ``on_step(step)`` after every optimizer step (tests use it to interrupt).
    """
    recipe, fc = distill_recipe(cfg, run_dir, teacher=teacher, tokenizer=tokenizer, teacher_name=teacher_name,
                                progress=progress, log=log)
    t, acc = cfg.training, recipe.acc
    recipe.say(f"distilling a draft of layers {recipe.layers} from {recipe.teacher_label}: {fc.steps} steps x {t.batch_size} "
               f"rows x {t.gradient_accumulation_steps} accumulation x {acc.num_processes} process(es), bf16 "
               f"{fc.bf16}, training {len(recipe.trainable)} tensors")
    state = fit(recipe, fc, recipe.run_dir, log=log, on_step=on_step, accelerator=acc, progress=progress, desc="distill")
    history = [json.loads(x) for x in (recipe.run_dir / "log.jsonl").read_text().splitlines()] if acc.is_main_process else []
    acc.wait_for_everyone()
    return {"run_dir": recipe.run_dir, "best_dir": recipe.run_dir / "best",
            "best_validation_agreement": -1.0 if state.best is None else state.best, "steps": state.step,
            "bad_steps": state.bad_steps, "tokens": recipe.tokens, "elapsed_s": state.elapsed,
            "layers": recipe.layers, "history": history, "model": recipe.draft}


@torch.no_grad()
def _on_policy_rows(draft, ids: torch.Tensor, valid: torch.Tensor, t, seed: int, prompt_tokens: int = 32):
    """Replace a share of the rows by continuations the current draft samples itself (DistillSpec's on-policy data).

    A draft with a live memory samples them with its memory empty (``generate`` has no teacher states to give it),
    that is as the detached draft; the teacher scores the rows as any other."""
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
