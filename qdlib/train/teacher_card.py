"""The bundled teacher's card: its training log read back, the loss plot, and the card's text.

:func:`qdlib.teacher.export_teacher` measures the teacher and writes these next to its weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..corpus import SOURCES
from ..hardware import cpu_name
from ..metrics import running_mean


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


def log_rows(run_dir: Path) -> list[dict]:
    """The training rows of ``log.jsonl``, each step once (a resumed run's repeats dropped), with the held-out loss
    of the evaluation at that step as ``val_loss``."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            rows = {k: v for k, v in rows.items() if k < r["step"]} | {r["step"]: r}
        elif "eval" in r and r["step"] in rows:
            rows[r["step"]]["val_loss"] = r["eval"]["val_loss"]
    return list(rows.values())


def active_time(rows) -> float:
    """Training time from the log, with pauses (a stopped or suspended process) left out.

    A step that took more than 10x the median step is counted as a median step.

    >>> active_time([{"elapsed_s": 1.0}, {"elapsed_s": 2.0}, {"elapsed_s": 3.0}, {"elapsed_s": 900.0}])  # a pause
    4.0
    """
    t = [0.0] + [r["elapsed_s"] for r in rows]
    deltas = [b - a for a, b in zip(t, t[1:])]
    med = sorted(deltas)[len(deltas) // 2] if deltas else 0.0
    return sum(d if d <= 10 * med else med for d in deltas)


def plot_loss(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    loss = [r["ce"] for r in rows]
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


def model_card(cfg, m, manifest) -> str:
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
AdamW (learning rate {cfg.learning_rate}, betas 0.9/0.95, weight decay {cfg.weight_decay}), {cfg.warmup_steps} warm-up steps then cosine to
{int(cfg.min_lr_ratio * 100)}%, batch {cfg.batch_size} x {cfg.max_seq_length} tokens, gradient clipping {cfg.max_grad_norm}, bf16 autocast.
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
            f"a 4-gram, at a constant learning rate of {cfg.ul_learning_rate}. It brings greedy looping down (see below).")
