"""The bundled teacher's training: ``qd train-teacher`` (training, unlikelihood polish, export, card).

The course needs a 28-layer Qwen3-architecture teacher that runs offline, so it
trains one itself on the corpus of :mod:`qdlib.corpus` (the ``.py`` sources of the
standard library, torch and transformers). Notebook 00 introduces it.

    qd train-teacher                       # trains (resumable) into outputs/runs/teacher
    qd train-teacher --export              # writes outputs/teacher (bf16 safetensors, card)

The corpus, its split, the tokenizer, the prompts and the held-out measures live in
:mod:`qdlib.corpus`; import them from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import paths
from .corpus import (bits_per_byte, build_manifest, corpus_files, greedy_repetition, heldout_files,
                     heldout_prompts, loss_by_position, random_prompts, read_source, repeated_ngram_share,
                     tokenize_corpus, train_tokenizer)
from .errors import ConfigError
from .schema import renamed
from .settings.training import TeacherTrainConfig
from .hardware import use_bf16
from .io import atomic_dir, torch_load_safe, torch_save_atomic, write_json_atomic
from .train import FORMAT, FitConfig, Recipe, fit
from .train.teacher_card import active_time, context_section, log_rows, model_card, plot_loss

# --------------------------------------------------------------------------- model


def teacher_config(vocab_size: int = 8192, hidden: int = 192, layers: int = 28):
    """The bundled teacher's Qwen3 config: Qwen3-0.6B's depth, a small width."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        attn_implementation="sdpa",
    )


# --------------------------------------------------------------------------- training


def _sample_batch(data: dict[str, torch.Tensor], cfg: TeacherTrainConfig, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    w_std = 1.0 if step >= cfg.steps * (1 - cfg.final_stdlib_only) else cfg.stdlib_weight
    others = [s for s in data if s != "stdlib"]
    rows = []
    for _ in range(cfg.batch_size):
        if not others or torch.rand((), generator=g).item() < w_std:
            src = "stdlib"
        else:
            src = others[int(torch.randint(len(others), (), generator=g))]
        stream = data[src]
        start = int(torch.randint(len(stream) - cfg.max_seq_length - 1, (), generator=g))
        rows.append(stream[start : start + cfg.max_seq_length + 1].long())
    return torch.stack(rows)  # (B, T+1)


def prepare_data(run_dir: Path, cfg: TeacherTrainConfig, log=print):
    """Manifest, tokenizer and token streams, built once and cached in ``run_dir``."""
    from transformers import AutoTokenizer

    run_dir.mkdir(parents=True, exist_ok=True)
    man_path = run_dir / "manifest.json"
    if not man_path.exists():
        log("building corpus manifest ...")
        write_json_atomic(man_path, build_manifest(cfg.sources))
    manifest = json.loads(man_path.read_text())
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        log("training the BPE tokenizer on the standard library's training files ...")
        files = [f for f in corpus_files("stdlib") if f.split == "train"][: cfg.max_files]
        texts = [t for f in files for t in [read_source(f.path)] if t]
        tok = train_tokenizer(texts, cfg.vocab_size)
        with atomic_dir(tok_dir) as tmp:
            tok.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = {}
    for src in cfg.sources:
        p = run_dir / f"tokens_{src}_train.pt"
        if not p.exists():
            log(f"tokenizing {src} ...")
            files = [f for f in corpus_files(src) if f.split == "train"][: cfg.max_files]
            torch_save_atomic(tokenize_corpus(tokenizer, files), p)
        data[src] = torch_load_safe(p)
    val_texts = [read_source(p) for p in heldout_files(manifest)[0]]
    return manifest, tokenizer, data, val_texts


# settings that may change between a run and its resumption
_RESUMABLE_CHANGES = ("steps", "compile", "eval_every", "checkpoint_every", "ul_steps", "ul_learning_rate", "ul_weight",
                      "ul_batch", "ul_prompt_tokens", "ul_new_tokens")


class TeacherRecipe(Recipe):
    """The bundled teacher as a :class:`~qdlib.train.Recipe`: next-token cross-entropy on the corpus mix, plus the
    unlikelihood penalty from step ``cfg.steps`` on; scored by the held-out standard-library loss (lower is better,
    so the score is its negative)."""

    name = "teacher"

    def __init__(self, model, data: dict, val_batch: torch.Tensor, cfg: TeacherTrainConfig, bf16: bool):
        self.model, self.data, self.val_batch, self.cfg, self.bf16 = model, data, val_batch, cfg, bf16
        self.fwd = torch.compile(model) if cfg.compile else model
        self.tokens = 0

    def parameters(self):
        return list(self.model.parameters())

    def batch(self, step: int, micro: int) -> tuple:
        polish = step >= self.cfg.steps  # phase 2: unlikelihood polish at a constant small learning rate
        return _sample_batch(self.data, self.cfg, step), _ul_prompts(self.data["stdlib"], self.cfg, step) if polish else None

    def loss(self, batch: tuple, autocast):
        ids, prompts = batch
        stats = {}
        if prompts is not None:
            ul, rep = _unlikelihood_loss(self.model, prompts, self.cfg.ul_new_tokens, self.bf16)
            stats = {"ul_loss": round(ul.item(), 4), "greedy_rep": round(rep, 4)}
        with autocast():
            logits = (self.model if prompts is not None else self.fwd)(input_ids=ids[:, :-1]).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        self.tokens += ids[:, 1:].numel()
        loss = ce + self.cfg.ul_weight * ul if prompts is not None else ce
        return loss, {"ce": round(ce.item(), 4), "tokens": self.tokens, **stats}

    def score(self) -> tuple[float, dict]:
        val = _val_loss(self.model, self.val_batch, self.bf16)
        return -val, {"val_loss": round(val, 4)}

    def save(self, folder: Path, info: dict) -> None:
        self.model.save_pretrained(folder)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.tokens = state["tokens"]

    def config(self) -> dict:
        return dataclasses.asdict(self.cfg)

    def config_defaults(self) -> dict:
        return dataclasses.asdict(TeacherTrainConfig())

    def train_mode(self) -> None:
        self.model.train()


def teacher_recipe(cfg: TeacherTrainConfig, run_dir: Path, log=print) -> tuple[TeacherRecipe, FitConfig]:
    """The data (prepared once in ``run_dir``), a fresh model and the loop settings: the cosine over ``steps``, then
    ``ul_steps`` of polish at the constant ``ul_learning_rate``."""
    from transformers import Qwen3ForCausalLM

    cfg.validate()

    manifest, tokenizer, data, val_texts = prepare_data(run_dir, cfg, log)
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(teacher_config(len(tokenizer), cfg.hidden))
    bf16 = use_bf16(cfg.mixed_precision, "cpu")
    recipe = TeacherRecipe(model, data, _val_batch(tokenizer, val_texts, cfg), cfg, bf16)
    fc = FitConfig(steps=cfg.steps + cfg.ul_steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                   min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                   bf16=bf16, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                   may_change=_RESUMABLE_CHANGES, decay_steps=cfg.steps,
                   tail_lr=cfg.ul_learning_rate if cfg.ul_steps else None)
    return recipe, fc


def train_teacher(cfg: TeacherTrainConfig, run_dir: str | os.PathLike | None = None, log=print, on_step=None) -> Path:
    """Train (or resume training) the bundled teacher in ``run_dir`` with :func:`qdlib.train.fit`.

    ``last.pt`` (atomic) every ``checkpoint_every`` steps and after every evaluation; rerunning the same command resumes
    there. Progress goes to a tqdm bar and ``log.jsonl``; the best held-out loss is kept in ``best/``.
    """
    run_dir = Path(run_dir) if run_dir else paths.runs_dir() / "teacher"
    recipe, fc = teacher_recipe(cfg, run_dir, log)
    fit(recipe, fc, run_dir, log=log, on_step=on_step, progress=True, desc="teacher")
    return run_dir


def _ul_prompts(stream: torch.Tensor, cfg: TeacherTrainConfig, step: int) -> torch.Tensor:
    """``ul_batch`` prompts of ``ul_prompt_tokens`` ids from the training stream (deterministic per step)."""
    return random_prompts(stream, cfg.ul_batch, cfg.ul_prompt_tokens, cfg.seed * 1_000_003 + step + 7_777_777)


def repeated_token_mask(ids: torch.Tensor, n: int = 4) -> torch.Tensor:
    """True for every token that belongs to an n-gram already seen earlier in its row.

    >>> repeated_token_mask(torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 5]])).int().tolist()
    [[0, 0, 0, 0, 1, 1, 1, 1, 0]]
    """
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        seen = set()
        for i in range(len(row) - n + 1):
            g = tuple(row[i : i + n])
            if g in seen:
                mask[b, i : i + n] = True
            seen.add(g)
    return mask


def _unlikelihood_loss(model, prompts: torch.Tensor, new_tokens: int, use_bf16: bool) -> tuple[torch.Tensor, float]:
    """Sequence-level unlikelihood loss on the model's own greedy continuations of ``prompts``.

    Returns the loss (mean over continuation tokens of ``-log(1 - p(token))`` on the
    tokens of repeated 4-grams, 0 elsewhere) and the continuations' repeated-4-gram share.
    """
    P = prompts.size(1)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        seq = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    model.train()
    cont = seq[:, P:]  # (B, N)
    mask = repeated_token_mask(cont)  # (B, N)
    rep = sum(repeated_ngram_share(r) for r in cont.tolist()) / len(cont)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(input_ids=seq[:, :-1]).logits[:, P - 1 :]  # (B, N, V): predictions of the continuation
    p = logits.float().softmax(-1).gather(-1, cont.unsqueeze(-1)).squeeze(-1)  # (B, N)
    ul = -torch.log((1 - p).clamp_min(1e-5)) * mask
    return ul.sum() / mask.numel(), rep


def _val_batch(tokenizer, texts, cfg, n: int = 16) -> torch.Tensor:
    ids = []
    for t in texts:
        ids += [tokenizer.eos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids)
    step = max(1, (len(ids) - cfg.max_seq_length - 1) // n)
    return torch.stack([ids[i * step : i * step + cfg.max_seq_length + 1] for i in range(n)])


def _val_loss(model, batch, use_bf16) -> float:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)).item()


def export_teacher(run_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Write the trained teacher as bf16 safetensors + tokenizer + manifest + card + loss plot."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    run_dir = Path(run_dir) if run_dir else paths.runs_dir() / "teacher"
    out_dir = Path(out_dir) if out_dir else paths.TEACHER_DIR
    state = torch_load_safe(run_dir / "last.pt")
    if state.get("format") != FORMAT:
        raise ConfigError(f"{run_dir / 'last.pt'} was written by an older qdlib training loop; export it with the "
                          f"qdlib that trained it, or train again")
    cfg = TeacherTrainConfig(**renamed(state["config"]))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    model = Qwen3ForCausalLM(teacher_config(len(tokenizer), cfg.hidden))
    model.load_state_dict(state["trainee"]["model"])
    model.eval()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    log("measuring bits per byte and greedy repetition on held-out files ...")
    val_paths, _ = heldout_files(manifest)
    texts = [read_source(p) for p in val_paths]
    # measure the weights as shipped: bf16 rounded, computed in float32
    model = model.to(torch.bfloat16).to(torch.float32)
    bpb = bits_per_byte(model, tokenizer, texts)
    rep = greedy_repetition(model, heldout_prompts(tokenizer, texts))
    real_rep = [repeated_ngram_share(p2[64:192]) for p2 in heldout_prompts(tokenizer, texts, prompt_tokens=192)]
    rows = log_rows(run_dir)
    metrics = {
        "heldout_bits_per_byte": round(bpb["bpb"], 4),
        "heldout_tokens": bpb["tokens"],
        "heldout_bytes": bpb["bytes"],
        "greedy_repeated_4gram_share": round(rep["mean"], 4),
        "real_code_repeated_4gram_share": round(sum(real_rep) / len(real_rep), 4),
        "steps": state["step"],
        "tokens_seen": state["trainee"]["tokens"],
        "train_wall_time_s": round(active_time(rows), 1),
        "final_train_loss": rows[-1]["ce"],
        "final_val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
        "context_loss": loss_by_position(model, tokenizer, texts, context=model.config.max_position_embeddings,
                                         short=cfg.max_seq_length),
    }
    with atomic_dir(out_dir) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "manifest.json", manifest)
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "train_config.json", dataclasses.asdict(cfg))
        plot_loss(rows, tmp / "loss_curve.png")
        (tmp / "README.md").write_text(model_card(cfg, metrics, manifest) + context_section(metrics["context_loss"], cfg.max_seq_length))
    log(json.dumps(metrics, indent=2))
    return out_dir
