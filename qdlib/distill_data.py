"""Data for distillation (notebook 04): what the draft learns from, and what it is measured on.

Training rows come from three sources, mixed per batch:

- **text**: the teacher's training text (the standard library's *training* files;
  the held-out files are never used), cut into windows;
- **generated**: prompts from that text continued by the teacher itself, greedily
  (sequence-level distillation: at decoding time the draft must predict the
  teacher's own continuations, not the data);
- **items**: the knowledge questions and their *training* paraphrases, each followed
  by the teacher's continuation, so the fusion gate has a reason to open (the
  evaluation paraphrases are never trained on).

On-policy rows (continuations sampled from the draft, scored by the teacher) are
produced by the trainer, because they depend on the current draft.

Evaluation sets are held-out prompts continued greedily by the teacher; a draft's
teacher-forced top-1 agreement on them is alpha for greedy decoding.

    >>> from qdlib import load_teacher
    >>> teacher, tok = load_teacher()
    >>> data = build_distill_data(teacher, tok, generated=2, seq_len=64, max_text_tokens=4000)
    >>> ids, mask = data.batch(step=0, rows=8, seq_len=64)
    >>> ids.shape, mask.shape       # targets are ids[:, 1:]; mask says which of them are scored
    (torch.Size([8, 65]), torch.Size([8, 64]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .corpus import corpus_files, heldout_prompts, pad_id, random_prompts, read_source
from .errors import ConfigError
from .heldout_code import heldout_code_prompts
from .progress import progress_bar


def training_stream(tokenizer, max_files: int | None = None, max_tokens: int | None = None,
                    source: str = "stdlib") -> torch.Tensor:
    """One corpus source's training files (for the standard library never the held-out ones), tokenized and
    joined by end-of-text: ``(N,)``. ``source`` is one of the teacher's sources (stdlib, torch, transformers)."""
    files = [f for f in corpus_files(source) if f.split == "train"][:max_files]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for f in files:
        text = read_source(f.path)
        if not text:
            continue
        ids += ([eos] if eos is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.int32)


@torch.no_grad()
def continue_greedy(teacher, prompts: torch.Tensor, new_tokens: int, batch_size: int = 32, progress=None) -> torch.Tensor:
    """The teacher's greedy continuations of equal-length ``prompts`` ``(N, P)``: returns ``(N, P + new_tokens)``."""
    device = next(teacher.parameters()).device
    pad = pad_id(teacher.config)
    out = []
    for i in range(0, len(prompts), batch_size):
        x = prompts[i : i + batch_size].long().to(device)  # (b, P)
        y = teacher.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
        out.append(y.cpu())
        if progress is not None:
            progress(len(x))
    return torch.cat(out)  # (N, P + new_tokens)


@torch.no_grad()
def continue_texts(teacher, tokenizer, texts: list[str], new_tokens: int, batch_size: int = 16) -> list[tuple[list[int], int]]:
    """Greedy continuations of texts of different lengths (left-padded batches).

    Returns ``(ids, prompt_length)`` per text, where ``ids`` is the prompt's ids followed by
    ``new_tokens`` teacher tokens, without padding.
    """
    device = next(teacher.parameters()).device
    pad = pad_id(tokenizer)
    out = []
    for i in range(0, len(texts), batch_size):
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[i : i + batch_size]]
        P = max(len(r) for r in rows)
        x = torch.full((len(rows), P), pad, dtype=torch.long)
        am = torch.zeros(len(rows), P, dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, P - len(r) :] = torch.tensor(r)
            am[j, P - len(r) :] = 1
        y = teacher.generate(x.to(device), attention_mask=am.to(device), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad).cpu()
        out += [(r + y[j, P:].tolist(), len(r)) for j, r in enumerate(rows)]
    return out


def item_texts(items: list[dict], which: str = "train") -> list[str]:
    """``which="train"``: each question and its training paraphrases; ``"eval"``: the evaluation paraphrases only."""
    if which not in ("train", "eval"):
        raise ValueError(f"which={which!r}; allowed: 'train' or 'eval'")
    texts = []
    for it in items:
        texts += ([it["question"]] + list(it["train_paraphrases"])) if which == "train" else list(it["eval_paraphrases"])
    return texts


def item_sequences(teacher, tokenizer, items: list[dict], new_tokens: int = 64, which: str = "train") -> list[list[int]]:
    """Knowledge questions (and their training paraphrases) each followed by the teacher's greedy continuation.

    The evaluation paraphrases are only ever produced with ``which="eval"``, for measurement.
    """
    return [ids for ids, _ in continue_texts(teacher, tokenizer, item_texts(items, which), new_tokens)]


@dataclass
class EvalSet:
    """Sequences ``(N, T)`` (right-padded) and the mask ``(N, T)`` of positions whose next token is scored.

    ``mask[i, t]`` is True when position t's prediction (of token t+1) is part of the
    teacher's continuation: the prompt itself is not scored.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    name: str = ""


def _pad_rows(rows: list[list[int]], starts: list[int], pad: int) -> EvalSet:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, s - 1 : len(r) - 1] = True  # predictions of tokens s .. len(r)-1
    return EvalSet(ids, mask)


def heldout_eval_set(teacher, tokenizer, texts: list[str], n_prompts: int = 50, prompt_tokens: int = 64,
                     new_tokens: int = 64, seed: int = 0) -> EvalSet:
    """Held-out prompts (from :func:`qdlib.corpus.heldout_prompts`) and the teacher's greedy continuations."""
    prompts = heldout_prompts(tokenizer, texts, n_prompts=n_prompts, prompt_tokens=prompt_tokens, seed=seed)
    if len(prompts) < n_prompts:
        raise ConfigError(f"the held-out texts give only {len(prompts)} prompts of {prompt_tokens} tokens, "
                          f"{n_prompts} were asked for")
    seqs = continue_greedy(teacher, torch.tensor(prompts), new_tokens)
    pad = pad_id(tokenizer)
    es = _pad_rows(seqs.tolist(), [prompt_tokens] * len(seqs), pad)
    es.name = "heldout"
    return es


def paraphrase_eval_set(teacher, tokenizer, items: list[dict], new_tokens: int = 48) -> EvalSet:
    """The knowledge items' *evaluation* paraphrases, each continued greedily by the teacher."""
    texts = item_texts(items, "eval")
    if not texts:
        raise ValueError("the knowledge items have no eval_paraphrases to evaluate on")
    rows = continue_texts(teacher, tokenizer, texts, new_tokens)
    pad = pad_id(tokenizer)
    es = _pad_rows([r for r, _ in rows], [p for _, p in rows], pad)
    es.name = "paraphrase"
    return es


def unfamiliar_eval_set(teacher, tokenizer, n_prompts: int = 48, new_tokens: int = 64) -> EvalSet:
    """Third-party code (:mod:`qdlib.heldout_code`) continued greedily by the teacher."""
    prompts = heldout_code_prompts(tokenizer, n_prompts, 64)
    seqs = continue_greedy(teacher, torch.tensor(prompts), new_tokens)
    mask = torch.zeros(seqs.shape, dtype=torch.bool)
    mask[:, 63:-1] = True  # predictions of the generated tokens
    return EvalSet(seqs.long(), mask, "unfamiliar")


@dataclass
class DistillData:
    """The training mix. ``batch(step, rows, seq_len)`` is deterministic in ``step``.

    Attributes:
        text: ``(N,)`` token stream of training text.
        generated: ``(G, L)`` teacher continuations of training-text prompts (may be empty).
        items: item-conditioned sequences (question or training paraphrase + teacher continuation).
        generated_share, item_share: chance that a row comes from ``generated`` / ``items``;
            the rest come from ``text``.
    """

    text: torch.Tensor
    generated: torch.Tensor
    items: list[list[int]]
    generated_share: float = 0.5
    item_share: float = 0.0
    pad_id: int = 0
    seed: int = 0

    def state_dict(self) -> dict:
        L = max((len(r) for r in self.items), default=1)
        items = torch.full((len(self.items), L), -1, dtype=torch.int32)
        for i, r in enumerate(self.items):
            items[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        return {"text": self.text, "generated": self.generated.int(), "items": items,
                "shares": torch.tensor([self.generated_share, self.item_share], dtype=torch.float64),
                "pad_id": self.pad_id, "seed": self.seed}

    @classmethod
    def from_state_dict(cls, s: dict) -> "DistillData":
        items = [[int(v) for v in row if v >= 0] for row in s["items"].tolist()]
        return cls(text=s["text"], generated=s["generated"], items=items, generated_share=float(s["shares"][0]),
                   item_share=float(s["shares"][1]), pad_id=int(s["pad_id"]), seed=int(s["seed"]))

    def batch(self, step: int, rows: int, seq_len: int, offset: int = 0, stride: int | None = None):
        """Rows ``offset, offset + stride, ...`` of the global batch for ``step``.

        Returns ``ids`` ``(rows, seq_len + 1)`` and ``mask`` ``(rows, seq_len)``: True where the
        prediction of the next id is scored (padding is not). With ``stride = rows`` and
        ``offset = 0`` (one process) this is the whole batch; several processes each take
        their own slice of one deterministic global batch.
        """
        stride = stride or 1
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        total = offset + stride * (rows - 1) + 1
        ids = torch.full((total, seq_len + 1), self.pad_id, dtype=torch.long)
        valid = torch.zeros(total, seq_len + 1, dtype=torch.bool)
        for r in range(total):
            u = torch.rand((), generator=g).item()
            if u < self.item_share and self.items:
                row = self.items[int(torch.randint(len(self.items), (), generator=g))][: seq_len + 1]
                ids[r, : len(row)] = torch.tensor(row)
                valid[r, : len(row)] = True
            elif u < self.item_share + self.generated_share and len(self.generated):
                row = self.generated[int(torch.randint(len(self.generated), (), generator=g))][: seq_len + 1]
                ids[r, : len(row)] = row.long()
                valid[r, : len(row)] = True
            else:
                s = int(torch.randint(len(self.text) - seq_len - 1, (), generator=g))
                ids[r] = self.text[s : s + seq_len + 1].long()
                valid[r] = True
        take = slice(offset, total, stride)
        return ids[take], valid[take][:, 1:]  # (rows, T+1), (rows, T)


def build_distill_data(teacher, tokenizer, *, generated: int = 512, prompt_tokens: int = 32, seq_len: int = 256,
                       items: list[dict] | None = None, item_new_tokens: int = 96, generated_share: float = 0.5,
                       item_share: float = 0.1, max_text_tokens: int | None = None, max_files: int | None = None,
                       sources: tuple[str, ...] = ("stdlib",), seed: int = 0, progress: bool = True) -> DistillData:
    """Tokenize the training text of ``sources`` (each capped at ``max_text_tokens``, joined), let the teacher
    continue ``generated`` prompts drawn from all of it, add item sequences."""
    text = torch.cat([training_stream(tokenizer, max_files=max_files, max_tokens=max_text_tokens, source=s)
                      for s in sources])
    if len(text) < seq_len + 2:
        raise ConfigError(f"only {len(text)} training tokens, fewer than one window of {seq_len}; raise "
                          f"training.max_text_tokens or lower training.max_seq_length")
    gen = torch.zeros(0, seq_len + 1, dtype=torch.int32)
    prompt_tokens = min(prompt_tokens, seq_len // 2)
    if generated:
        prompts = random_prompts(text, generated, prompt_tokens, seed + 12345)
        bar = progress_bar(total=generated, desc="teacher continuations", unit="seq", enabled=progress)
        gen = continue_greedy(teacher, prompts, seq_len + 1 - prompt_tokens, progress=bar.update).int()
        bar.close()
    item_rows = item_sequences(teacher, tokenizer, items, item_new_tokens) if items else []
    pad = pad_id(tokenizer)
    return DistillData(text=text, generated=gen, items=item_rows, generated_share=generated_share if generated else 0.0,
                       item_share=item_share if item_rows else 0.0, pad_id=pad, seed=seed)


def perplexity(ce: float) -> float:
    return math.exp(min(ce, 50.0))
