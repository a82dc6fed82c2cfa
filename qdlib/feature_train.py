"""Training the feature-fed draft (notebook 07; ``qd train-fast``).

The teacher is frozen; each step runs it once over a batch of windows to get its features ``f`` and
distributions ``p``, then trains the draft to predict ``f[i]`` and ``p[i]`` from ``(f[i-1], x[i])``:

    loss = KL(p || q) + feature_weight * smooth_l1(f', f)

and once more with the draft fed its *own* predicted features instead of the teacher's (``unroll`` depths,
weighted ``unroll_weight``), because that is what it sees from its second proposal on ("training-time test", EAGLE-3).

Data: windows of the teacher's own training mix (the standard library's training files, torch, transformers,
weighted by ``source_weights``) and the teacher's greedy continuations of prompts cut from it. The held-out
standard-library files and the unfamiliar third-party code (:mod:`qdlib.heldout_code`) are never trained on.

Training runs on the one loop, :func:`qdlib.train.fit` (schedule, NaN guard, resume, best checkpoint), with
:class:`FeatureRecipe`: ``last.pt`` (atomic) every ``ckpt_every`` steps; the best validation agreement is kept in
``best/`` and never replaced by a worse one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import divergence, paths
from .corpus import heldout_prompts, heldout_texts, random_prompts
from .distill_data import EvalSet, continue_greedy, heldout_eval_set, training_stream, unfamiliar_eval_set
from .errors import ConfigError
from .feature_draft import (HEAD_TOKENS, FeatureDraft, build_feature_draft, frequent_tokens, load_feature_draft,
                            save_feature_draft, teacher_features)
from .hardware import use_bf16
from .io import torch_load_safe, torch_save_atomic, write_json_atomic
from .models import load_teacher
from .schema import renamed
from .settings.training import FeatureTrainConfig
from .speculative import speculative_generate
from .timing import feature_step_time, step_time
from .train import FitConfig, Recipe, fit
from .train.cards import fast_card
from .train.data import MixData

EVAL_SEED_VALIDATION = 1  # the same split of roles as the trainer: seed 1 selects, seed 0 reports
EVAL_SEED_TEST = 0


# ---------------------------------------------------------------------------------------------- data


def prepare_data(teacher, tokenizer, cfg: FeatureTrainConfig, run_dir: Path, log=print) -> MixData:
    """Tokenize each source and let the teacher continue prompts, once; cached (atomically) in ``run_dir``."""
    streams = {}
    for src, w in cfg.source_weights.items():
        if w <= 0:
            continue
        p = run_dir / f"tokens_{src}.pt"
        if not p.exists():
            log(f"tokenizing {src} ...")
            torch_save_atomic(training_stream(tokenizer, cfg.max_files, cfg.max_tokens_per_source, source=src), p)
        streams[src] = torch_load_safe(p)
    p = run_dir / "generated.pt"
    if not p.exists():
        log(f"teacher continuations of {cfg.generated} prompts ...")
        gen = torch.zeros(0, cfg.max_seq_length + 1, dtype=torch.int32)
        if cfg.generated:
            base = streams.get("stdlib", next(iter(streams.values())))
            prompts = random_prompts(base, cfg.generated, cfg.prompt_tokens, cfg.seed + 4242)
            gen = continue_greedy(teacher, prompts, cfg.max_seq_length + 1 - cfg.prompt_tokens).int()
        torch_save_atomic(gen, p)
    return MixData(streams, dict(cfg.source_weights), torch_load_safe(p), cfg.generated_share, cfg.seed)


# ---------------------------------------------------------------------------------------------- loss


def feature_loss(teacher, draft: FeatureDraft, ids: torch.Tensor, cfg: FeatureTrainConfig, bf16: bool = False):
    """The training loss on a batch ``ids`` ``(B, T+1)``; returns ``(loss, {"agreement": depth-1 top-1 match})``."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        f = teacher_features(teacher, ids).float()  # (B, T+1, H): f[:, i] predicts x[i+1]
        lp = torch.log_softmax(teacher.lm_head(f[:, 1:]).float(), -1)  # (B, T, V)
    target = f[:, 1:]  # (B, T, H): what the draft should predict at positions 1..T
    feats = f[:, :-1]  # (B, T, H): the feature before each input token
    loss, stats = 0.0, {}
    for depth in range(cfg.unroll):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred, logits = draft(feats, ids[:, 1:])  # (B, T, H), (B, T, Vd)
        lq = torch.log_softmax(draft.full_logits(logits.float()), -1)  # (B, T, V)
        kl = divergence.kl(lp, lq.clamp(min=-1e4)).mean()
        fl = F.smooth_l1_loss(pred.float(), target)
        w = 1.0 if depth == 0 else cfg.unroll_weight
        loss = loss + w * (kl + cfg.feature_weight * fl)
        with torch.no_grad():
            stats[f"kl{depth + 1}"] = kl.item()
            stats[f"agreement{depth + 1}"] = (lq.argmax(-1) == lp.argmax(-1)).float().mean().item()
        feats = own_features(f, pred.float())  # the next depth reads its own predictions
    return loss, stats


def own_features(f: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """What the draft reads one depth further: its own predicted features instead of the teacher's.

    ``f`` ``(B, T+1, H)`` are the teacher's features, ``pred`` ``(B, T, H)`` the draft's predictions from
    ``f[:, :-1]`` (``pred[:, t]`` predicts ``f[:, t+1]``). The first position keeps the teacher's feature (a round
    always starts from a verified one); every later position reads the draft's prediction for it.

    >>> f, pred = torch.zeros(1, 4, 2), torch.ones(1, 3, 2)
    >>> own_features(f, pred)[0, :, 0].tolist()
    [0.0, 1.0, 1.0]
    """
    return torch.cat([f[:, :1], pred[:, :-1]], dim=1)


@torch.no_grad()
def feature_agreement(teacher, draft: FeatureDraft, es: EvalSet, chunk: int = 8) -> dict:
    """Teacher-forced top-1 agreement with the teacher's greedy continuations in ``es``.

    ``depth1``: the draft reads the teacher's true feature before each token (its first proposal of a round);
    ``depth2``: it reads its own prediction there instead (its second proposal).
    """
    hits = {"depth1": 0.0, "depth2": 0.0}
    n = 0
    for i in range(0, len(es.ids), chunk):
        x = es.ids[i : i + chunk].to(draft.device)  # (b, T)
        m = es.mask[i : i + chunk, 1:-1].to(draft.device)  # (b, T-2): predictions of tokens 2..T-1
        f = teacher_features(teacher, x).float()  # (b, T, H)
        pred, logits = draft(f[:, :-1], x[:, 1:])  # (b, T-1, ...): position k+1 predicts x[k+2]
        tgt = x[:, 2:]  # (b, T-2)
        top = draft.vocab_ids[logits[:, :-1].argmax(-1)]
        hits["depth1"] += ((top == tgt) & m).sum().item()
        _, logits2 = draft(own_features(f, pred), x[:, 1:])
        hits["depth2"] += ((draft.vocab_ids[logits2[:, :-1].argmax(-1)] == tgt) & m).sum().item()
        n += m.sum().item()
    return {k: v / max(n, 1) for k, v in hits.items()} | {"positions": int(n)}


# ---------------------------------------------------------------------------------------------- training


def grow_from(draft: FeatureDraft, trained: FeatureDraft) -> FeatureDraft:
    """Start ``draft`` from a ``trained`` draft with as many or fewer layers, computing the same function.

    Shared weights are copied; each extra layer keeps its teacher initialisation but has its two output
    projections (attention ``o_proj``, MLP ``down_proj``) zeroed, so it adds nothing to the residual stream
    until training opens it (zero-initialised like a LoRA ``B`` or a Flamingo gate).
    """
    n_old, n_new = len(trained.layers), len(draft.layers)
    if n_old > n_new or trained.head.out_features != draft.head.out_features:
        raise ConfigError(f"cannot grow a {n_old}-layer draft with a {trained.head.out_features}-row head into "
                          f"a {n_new}-layer draft with a {draft.head.out_features}-row head")
    with torch.no_grad():
        draft.load_state_dict(trained.state_dict(), strict=False)
        for layer in draft.layers[n_old:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return draft


class FeatureRecipe(Recipe):
    """The feature-fed draft as a :class:`~qdlib.train.Recipe`: :func:`feature_loss` on :class:`MixData` batches,
    scored by the validation agreement (mean of depths 1 and 2, :func:`feature_agreement`)."""

    name = "fast draft"

    def __init__(self, teacher, draft: FeatureDraft, data: MixData, val: EvalSet, cfg: FeatureTrainConfig, bf16: bool):
        self.teacher, self.draft, self.data, self.val, self.cfg, self.bf16 = teacher, draft, data, val, cfg, bf16

    def parameters(self):
        return list(self.draft.trainable_parameters())

    def batch(self, step: int, micro: int) -> torch.Tensor:
        return self.data.batch(step, self.cfg.batch_size, self.cfg.max_seq_length)  # (B, T+1)

    def loss(self, ids: torch.Tensor, autocast):
        return feature_loss(self.teacher, self.draft, ids, self.cfg, self.bf16)

    def score(self) -> tuple[float, dict]:
        self.draft.eval()
        ev = feature_agreement(self.teacher, self.draft, self.val)
        return (ev["depth1"] + ev["depth2"]) / 2, ev  # both proposals of a round matter

    def save(self, folder: Path, info: dict) -> None:
        ev = info["eval"]
        extra = {"validation_agreement": info["score"], "step": info["step"], **ev,
                 "train_time_s": round(info["elapsed_s"], 1)}
        save_feature_draft(self.draft, folder, dtype=torch.float32, extra={"eval.json": extra})

    def state_dict(self) -> dict:
        return {"draft": self.draft.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.draft.load_state_dict(state["draft"])

    def config(self) -> dict:
        return dataclasses.asdict(self.cfg)

    def config_defaults(self) -> dict:  # source_weights: compared whole
        return {k: v for k, v in dataclasses.asdict(FeatureTrainConfig()).items() if not isinstance(v, dict)}

    def train_mode(self) -> None:
        self.draft.train()


def fit_config(cfg: FeatureTrainConfig, bf16: bool = False) -> FitConfig:
    """The loop's settings of a feature-draft run (``steps``, ``eval_every``, ``checkpoint_every`` may change on
    resume)."""
    return FitConfig(steps=cfg.steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                     min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                     bf16=bf16, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                     may_change=("steps", "eval_every", "checkpoint_every"))


def feature_recipe(cfg: FeatureTrainConfig, run_dir: Path, teacher=None, tokenizer=None,
                   log=print) -> tuple[FeatureRecipe, FitConfig]:
    """The recipe and loop settings of a run in ``run_dir``: the data (prepared once), the validation set, the draft."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if teacher is None:
        teacher, tokenizer = load_teacher("tiny")
    for p in teacher.parameters():
        p.requires_grad_(False)
    bf16 = use_bf16(cfg.mixed_precision, teacher.device)
    torch.manual_seed(cfg.seed)
    write_json_atomic(run_dir / "config.json", dataclasses.asdict(cfg))
    data = prepare_data(teacher, tokenizer, cfg, run_dir, log)
    val = heldout_eval_set(teacher, tokenizer, heldout_texts(), n_prompts=cfg.eval_prompts, seed=EVAL_SEED_VALIDATION)
    return FeatureRecipe(teacher, initial_draft(teacher, cfg), data, val, cfg, bf16), fit_config(cfg, bf16)


def initial_draft(teacher, cfg: FeatureTrainConfig) -> FeatureDraft:
    """The draft a run starts from: initialised from the teacher's last layers, or grown from ``cfg.init_from``
    (whose full head is loaded even where its folder trims it on load: training scores every token)."""
    draft = build_feature_draft(teacher, cfg.num_layers).float().train()
    if cfg.init_from:
        grow_from(draft, load_feature_draft(cfg.init_from, trim_head=False))
    return draft


def train_feature_draft(cfg: FeatureTrainConfig, run_dir: str | os.PathLike | None = None, teacher=None,
                        tokenizer=None, log=print, on_step=None) -> Path:
    """Train (or resume) a feature-fed draft in ``run_dir`` with :func:`qdlib.train.fit`; returns the run folder
    (best draft in ``best/``). ``on_step(step)`` is called after every step (tests use it to interrupt)."""
    run_dir = Path(run_dir) if run_dir else paths.runs_dir() / "fast_draft"
    recipe, fc = feature_recipe(cfg, run_dir, teacher, tokenizer, log)
    fit(recipe, fc, run_dir, log=log, on_step=on_step, desc="fast draft")
    return run_dir


# ---------------------------------------------------------------------------------------------- export


def _tune_gamma(teacher, draft, prompts: list[list[int]], gammas=(1, 2, 3, 4, 5, 6), new_tokens: int = 64) -> dict:
    """Measured tokens/s of speculative decoding at each gamma on ``prompts`` (validation prompts, never the test
    sets), interleaved and repeated twice; returns ``{gamma: tokens/s}``."""
    speed = {g: [] for g in gammas}
    for _ in range(2):
        for g in gammas:
            t0, n = time.perf_counter(), 0
            for p in prompts:
                out, st = speculative_generate(teacher, draft, torch.tensor([p]), gamma=g, max_new_tokens=new_tokens)
                n += st.new_tokens
            speed[g].append(n / (time.perf_counter() - t0))
    return {g: max(v) for g, v in speed.items()}


def export_fast_draft(run_dir: str | os.PathLike, out_dir: str | os.PathLike, teacher=None, tokenizer=None,
                      log=print) -> Path:
    """Measure the run's best draft and write it (bf16 safetensors, tuned gamma, card) to ``out_dir``.

    Every figure on the card is measured here from the exported weights: test agreement on the standard
    library's test prompts and on the unfamiliar third-party code, the step cost c, and the gamma that was
    fastest on the validation prompts.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if teacher is None:
        teacher, tokenizer = load_teacher("tiny")
    best = load_feature_draft(run_dir / "best")
    info = json.loads((run_dir / "best" / "eval.json").read_text())
    cfg = renamed(json.loads((run_dir / "config.json").read_text()))
    with tempfile.TemporaryDirectory() as tmp:  # measure what is shipped: the bf16 weights, loaded back
        save_feature_draft(best, tmp)
        draft = load_feature_draft(tmp)
    val_prompts = heldout_prompts(tokenizer, heldout_texts(), n_prompts=6, prompt_tokens=64, seed=EVAL_SEED_VALIDATION)
    speeds = _tune_gamma(teacher, draft, val_prompts)
    draft.config.gamma = max(speeds, key=speeds.get)
    sets = {"stdlib_test": heldout_eval_set(teacher, tokenizer, heldout_texts(), n_prompts=50, seed=EVAL_SEED_TEST),
            "unfamiliar": unfamiliar_eval_set(teacher, tokenizer)}
    agreement = {k: feature_agreement(teacher, draft, es) for k, es in sets.items()}
    c = feature_step_time(draft) / step_time(teacher)
    metrics = {"agreement": agreement, "c": c, "gamma": draft.config.gamma, "gamma_speeds_validation": speeds,
               "steps": info["step"], "validation_agreement": info["validation_agreement"],
               "train_time_s": info["train_time_s"], "config": cfg, "num_layers": draft.config.num_layers,
               "init": _init_summary(cfg.get("init_from"))}
    card = fast_card(metrics)
    save_feature_draft(draft, out_dir, extra={"metrics.json": metrics})
    (out_dir / "README.md").write_text(card, encoding="utf-8")  # the folder is complete; the card is regenerable
    log(card)
    return out_dir


def training_token_counts(tokenizer, source_weights: dict | None = None, max_tokens_per_source: int = 1_000_000
                          ) -> torch.Tensor:
    """Token frequencies ``(V,)`` of the teacher's training mix: each source's share of its first
    ``max_tokens_per_source`` training tokens, weighted as ``source_weights`` (default: the fast draft's mix).
    Only the teacher's own training sources are read, never a held-out file or a third-party package."""
    weights = source_weights or FeatureTrainConfig().source_weights
    counts = torch.zeros(len(tokenizer), dtype=torch.float64)
    for src, w in weights.items():
        if w > 0:
            ids = training_stream(tokenizer, None, max_tokens_per_source, source=src).long()
            counts += w * torch.bincount(ids, minlength=len(counts)).double()[: len(counts)] / max(len(ids), 1)
    return counts


def trim_head(folder: str | os.PathLike, tokenizer, n: int, teacher=None) -> dict:
    """Trim the head of the feature-fed draft in ``folder`` to the ``n`` tokens most frequent in the teacher's
    training mix (FR-Spec) by writing ``head_tokens.json`` beside its weights (they stay as they are), and measure
    the trimmed draft's agreement on both test sets; returns that block, also added to ``metrics.json``."""
    folder = Path(folder)
    if teacher is None:
        teacher, _ = load_teacher("tiny")
    counts = training_token_counts(tokenizer)
    ids = frequent_tokens(counts, n).tolist()
    write_json_atomic(folder / HEAD_TOKENS, {"ids": ids, "n": n, "chosen_by": "token frequency in the teacher's "
                      "training mix (stdlib 0.5, torch 0.25, transformers 0.25; first 1M tokens of each)"})
    draft = load_feature_draft(folder)
    sets = {"stdlib_test": heldout_eval_set(teacher, tokenizer, heldout_texts(), n_prompts=50, seed=EVAL_SEED_TEST),
            "unfamiliar": unfamiliar_eval_set(teacher, tokenizer)}
    block = {"n": n, "agreement": {k: feature_agreement(teacher, draft, es) for k, es in sets.items()},
             "c": feature_step_time(draft) / step_time(teacher)}
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["head_tokens"] = block
    write_json_atomic(folder / "metrics.json", metrics)
    return block


def _init_summary(init_from: str | None) -> dict | None:
    """What a continued run started from, read from that draft's own card figures."""
    if not init_from:
        return None
    m = json.loads((Path(init_from) / "metrics.json").read_text())
    prev = m.get("init") or {"steps": 0, "positions": 0, "train_time_s": 0.0}
    c = m["config"]
    return {"num_layers": m["num_layers"], "steps": prev["steps"] + m["steps"],
            "positions": prev["positions"] + m["steps"] * c["batch_rows"] * c["seq_len"],
            "train_time_s": prev["train_time_s"] + m["train_time_s"]}
