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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import paths
from .corpus import (SOURCES, bits_per_byte, build_manifest, corpus_files, greedy_repetition, heldout_files,
                     heldout_prompts, loss_by_position, random_prompts, read_source, repeated_ngram_share,
                     tokenize_corpus, train_tokenizer)
from .corpus import heldout_texts  # noqa: F401  notebooks 01 and 05 import it from here: remove once they use qdlib.corpus
from .errors import ConfigError
from .hardware import cpu_name, cpu_supports_bf16
from .io import append_jsonl, atomic_dir, torch_load_safe, torch_save_atomic, write_json_atomic
from .metrics import running_mean
from .progress import progress_bar
from .training import adamw, config_changes

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


@dataclass
class TeacherTrainConfig:
    steps: int = 2400
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    stdlib_weight: float = 0.7  # share of sequences drawn from the standard library ...
    final_stdlib_only: float = 0.2  # ... and the last 20% of steps use the standard library only
    hidden: int = 192
    vocab_size: int = 8192
    eval_every: int = 250
    ckpt_every: int = 50
    seed: int = 0
    bf16: bool | None = None  # None: use bf16 autocast where the CPU supports it
    sources: tuple = SOURCES  # corpus sources; the first must be "stdlib"
    max_files: int | None = None  # use only the first N files of each source (tests)
    compile: bool = True  # torch.compile the training forward (~25% faster here, ~2 min to compile)
    # Phase 2, after ``steps``: sequence-level unlikelihood polish (Welleck et al. 2019, "Neural text
    # generation with unlikelihood training"). Each step adds, to the ordinary stdlib loss, a penalty
    # -log(1 - p(token)) on the tokens of the model's own greedy continuations that repeat a 4-gram.
    ul_steps: int = 100
    ul_lr: float = 3e-4  # constant learning rate of the polish phase (the main phase's final rate)
    ul_weight: float = 1.0
    ul_batch: int = 8  # greedy continuations per step ...
    ul_prompt_tokens: int = 64  # ... of prompts cut from the training stdlib stream ...
    ul_new_tokens: int = 128  # ... continued this far


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
        start = int(torch.randint(len(stream) - cfg.seq_len - 1, (), generator=g))
        rows.append(stream[start : start + cfg.seq_len + 1].long())
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
_RESUMABLE_CHANGES = ("steps", "compile", "eval_every", "ckpt_every", "ul_steps", "ul_lr", "ul_weight", "ul_batch",
                      "ul_prompt_tokens", "ul_new_tokens")


def train_teacher(cfg: TeacherTrainConfig, run_dir: str | os.PathLike | None = None, log=print) -> Path:
    """Train (or resume training) the bundled teacher in ``run_dir``.

    Checkpoints (model, optimiser, scheduler, step) are written atomically to
    ``last.pt`` every ``ckpt_every`` steps; rerunning the same command resumes
    there. Progress goes to a tqdm bar and ``log.jsonl``.
    """
    from transformers import Qwen3ForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

    run_dir = Path(run_dir) if run_dir else paths.runs_dir() / "teacher"
    manifest, tokenizer, data, val_texts = prepare_data(run_dir, cfg, log)
    torch.manual_seed(cfg.seed)
    config = teacher_config(len(tokenizer), cfg.hidden)
    model = Qwen3ForCausalLM(config)
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps, min_lr_rate=cfg.min_lr_ratio)
    step, elapsed, tokens = 0, 0.0, 0
    ckpt = run_dir / "last.pt"
    if ckpt.exists():
        state = torch_load_safe(ckpt)
        diff = config_changes(state["config"], dataclasses.asdict(cfg), dataclasses.asdict(TeacherTrainConfig()),
                              may_change=_RESUMABLE_CHANGES)
        if diff:
            raise ConfigError(f"{ckpt} was made with a different configuration (saved, requested): {diff}; "
                              f"use another run folder or delete it")
        if state["config"]["steps"] != cfg.steps:
            log(f"changing the run length from {state['config']['steps']} to {cfg.steps} steps "
                f"(the cosine schedule is recomputed for the new length)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, elapsed, tokens = state["step"], state["elapsed"], state["tokens"]
        log(f"resuming from step {step}")
    use_bf16 = cpu_supports_bf16() if cfg.bf16 is None else cfg.bf16
    val_sample = _val_batch(tokenizer, val_texts, cfg)
    model.train()
    fwd = torch.compile(model) if cfg.compile else model
    total = cfg.steps + cfg.ul_steps
    bar = progress_bar(total=total, initial=step, desc="teacher", unit="step")
    t_last = time.time()
    while step < total:
        polish = step >= cfg.steps  # phase 2: unlikelihood polish at a constant small learning rate
        batch = _sample_batch(data, cfg, step)
        if polish:
            for group in opt.param_groups:
                group["lr"] = cfg.ul_lr
            ul, rep = _unlikelihood_loss(model, _ul_prompts(data["stdlib"], cfg, step), cfg.ul_new_tokens, use_bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = (model if polish else fwd)(input_ids=batch[:, :-1]).logits
        mle = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss = mle + cfg.ul_weight * ul if polish else mle
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if not polish:
            sched.step()
        step += 1
        tokens += batch[:, 1:].numel()
        now = time.time()
        elapsed += now - t_last
        t_last = now
        rec = {"step": step, "loss": round(mle.item(), 4), "lr": opt.param_groups[0]["lr"], "grad_norm": round(float(gnorm), 3),
               "tokens": tokens, "elapsed_s": round(elapsed, 1)}
        if polish:
            rec.update(ul_loss=round(ul.item(), 4), greedy_rep=round(rep, 4))
        if step % cfg.eval_every == 0 or step == cfg.steps or step == total:
            rec["val_loss"] = round(_val_loss(model, val_sample, use_bf16), 4)
            model.train()
        append_jsonl(run_dir / "log.jsonl", rec)
        bar.set_postfix(loss=f"{mle.item():.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}",
                        **({"rep": f"{rep:.2f}"} if polish else {}))
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step in (cfg.steps, total) or (polish and step % 10 == 0):
            torch_save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "step": step, "elapsed": elapsed, "tokens": tokens, "config": dataclasses.asdict(cfg)}, ckpt)
    bar.close()
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
    step = max(1, (len(ids) - cfg.seq_len - 1) // n)
    return torch.stack([ids[i * step : i * step + cfg.seq_len + 1] for i in range(n)])


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
    cfg = TeacherTrainConfig(**state["config"])
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    model = Qwen3ForCausalLM(teacher_config(len(tokenizer), cfg.hidden))
    model.load_state_dict(state["model"])
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
    log_rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    metrics = {
        "heldout_bits_per_byte": round(bpb["bpb"], 4),
        "heldout_tokens": bpb["tokens"],
        "heldout_bytes": bpb["bytes"],
        "greedy_repeated_4gram_share": round(rep["mean"], 4),
        "real_code_repeated_4gram_share": round(sum(real_rep) / len(real_rep), 4),
        "steps": state["step"],
        "tokens_seen": state["tokens"],
        "train_wall_time_s": round(_active_time(log_rows), 1),
        "final_train_loss": log_rows[-1]["loss"],
        "final_val_loss": next((r["val_loss"] for r in reversed(log_rows) if "val_loss" in r), None),
        "context_loss": loss_by_position(model, tokenizer, texts, context=model.config.max_position_embeddings,
                                         short=cfg.seq_len),
    }
    with atomic_dir(out_dir) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "manifest.json", manifest)
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "train_config.json", dataclasses.asdict(cfg))
        _plot_loss(log_rows, tmp / "loss_curve.png")
        (tmp / "README.md").write_text(_model_card(cfg, metrics, manifest) + context_section(metrics["context_loss"], cfg.seq_len))
    log(json.dumps(metrics, indent=2))
    return out_dir


def context_section(rows: list[dict], short: int) -> str:
    """The teacher card's section on context length, from :func:`qdlib.corpus.loss_by_position` rows measured
    with ``short`` (the training length) as the short window."""
    table = "\n".join(f"| {r['start']}-{r['end']} | {r['nats']:.3f} | {r['nats_short']:.3f} | {r['nats'] - r['nats_short']:+.3f} |"
                      for r in rows)
    worse = [r for r in rows if r["nats"] - r["nats_short"] > 0.02]
    verdict = (f"From position {worse[0]['start']} on, the whole window predicts **worse** than a sliding window of the "
               f"training length: positions the teacher never saw in training hurt it. Keep its context within the "
               f"training length (qdlib's course prompts and generations do) or slide a window over longer text."
               if worse else "Longer context never predicts worse than the training length here.")
    return f"""
## Context length (measured by `qdlib.corpus.loss_by_position`)

Trained on {short}-token windows, the teacher's config nevertheless allows {rows[-1]['end'] + 1} positions (the position
tables of Qwen3's RoPE are computed, not learned, so nothing stops a longer input). Mean next-token loss in nats on
held-out standard-library windows of {rows[-1]['end'] + 1} tokens ({rows[0]['tokens'] // (rows[0]['end'] - rows[0]['start'])} windows),
by position: with the whole window before each token, and with a sliding window of the {short} training positions
(each token then sees {short // 2} to {short} tokens):

| positions | whole window | training-length window | difference |
|---|---:|---:|---:|
{table}

{verdict}
"""


def _active_time(rows) -> float:
    """Training time from the log, with pauses (a stopped or suspended process) left out.

    A step that took more than 10x the median step is counted as a median step.
    """
    t = [0.0] + [r["elapsed_s"] for r in rows]
    deltas = [b - a for a, b in zip(t, t[1:])]
    med = sorted(deltas)[len(deltas) // 2] if deltas else 0.0
    return sum(d if d <= 10 * med else med for d in deltas)


def _plot_loss(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    smooth = running_mean(loss, 25)
    ax.plot(steps, smooth, label="train loss (running mean of 25 steps)")
    vs = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if vs:
        ax.plot(*zip(*vs), "o-", label="held-out stdlib loss")
    polish = [r["step"] for r in rows if "ul_loss" in r]
    if polish:
        ax.axvline(polish[0] - 0.5, color="grey", ls=":", label="unlikelihood polish starts")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Bundled teacher training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _model_card(cfg, m, manifest) -> str:
    n_files = {s: sum(1 for f in manifest["files"] if f[0] == s and f[2] == "train") for s in SOURCES}
    n_val = sum(1 for f in manifest["files"] if f[2] == "val")
    cpu = cpu_name()
    return f"""# qdlib bundled teacher

A Qwen3-architecture causal LM with **28 decoder layers** (the depth of Qwen3-0.6B) and width {cfg.hidden},
trained by `qd train-teacher` for the qdlib speculative-drafting course. It is the offline default teacher.

## Data
- Training: the `.py` sources of the Python {manifest['python_version']} standard library ({n_files['stdlib']} files;
  test packages, idlelib and site-packages left out) mixed with the Python sources of torch {manifest['package_versions']['torch']}
  ({n_files['torch']} files) and transformers {manifest['package_versions']['transformers']} ({n_files['transformers']} files).
  Sequences are drawn from the standard library with probability {cfg.stdlib_weight}, and only from it during the last
  {int(cfg.final_stdlib_only * 100)}% of steps.
- Held out: {n_val} standard-library files ({manifest['split_rule']}); listed with sha256 in `manifest.json`.
- Tokenizer: byte-level BPE, {cfg.vocab_size} entries, trained on the standard library's training files;
  `<|endoftext|>` (id 0) separates files, `<|pad|>` is id 1.

## Training
AdamW (lr {cfg.lr}, betas 0.9/0.95, weight decay {cfg.weight_decay}), {cfg.warmup_steps} warm-up steps then cosine to
{int(cfg.min_lr_ratio * 100)}%, batch {cfg.batch_size} x {cfg.seq_len} tokens, gradient clipping {cfg.grad_clip}, bf16 autocast.
{_polish_text(cfg, m)}
{m['steps']} steps, {m['tokens_seen']:,} tokens seen, {m['train_wall_time_s'] / 60:.0f} minutes of training (pauses and compilation excluded)
on {cpu} ({os.cpu_count()} cores), torch.compile on the training forward.
Final training loss {m['final_train_loss']}, held-out loss {m['final_val_loss']} nats/token.

## Quality (measured by `qd train-teacher --export`, checked by `tests/test_teacher_quality.py`)
- Bits per byte on the held-out standard-library files: **{m['heldout_bits_per_byte']}**
  ({m['heldout_tokens']:,} tokens, {m['heldout_bytes']:,} bytes, 256-token windows (the training length) with stride 128).
- Greedy repetition (share of repeated 4-grams in 128-token greedy continuations of 50 held-out prompts of 64 tokens):
  **{m['greedy_repeated_4gram_share']}**; the same measure on the real held-out code that follows those prompts:
  {m['real_code_repeated_4gram_share']}.

Course bars (issue: the foundation): bits per byte <= 1.40 ({'met' if m['heldout_bits_per_byte'] <= 1.40 else 'NOT met'});
greedy repetition <= 0.50 ({'met' if m['greedy_repeated_4gram_share'] <= 0.50 else 'NOT met: the teacher loops under greedy decoding more than the bar allows'}).

Weights are stored in bf16 (`model.safetensors`); `qdlib.load_teacher()` loads them as float32 on CPU, and the figures
above are measured that way.

![loss curve](loss_curve.png)
"""


def _polish_text(cfg, m) -> str:
    polish = m["steps"] - cfg.steps
    if polish <= 0:
        return ""
    return (f"Then {polish} steps of sequence-level unlikelihood polish (Welleck et al. 2019): each step adds to the\n"
            f"ordinary standard-library loss a penalty -log(1 - p) on the tokens of the model's own greedy continuations\n"
            f"({cfg.ul_batch} prompts of {cfg.ul_prompt_tokens} training tokens, {cfg.ul_new_tokens} new tokens) that repeat "
            f"a 4-gram, at a constant learning rate of {cfg.ul_lr}. It brings greedy looping down (see below).")
