"""The knowledge cache: the teacher's states on a few frequent questions (notebook 02).

    >>> from qdlib import load_teacher, build_knowledge_cache, load_knowledge_cache
    >>> teacher, tok = load_teacher()
    >>> cache = build_knowledge_cache(teacher, tok, answer_tokens=16)   # the built-in items
    >>> cache.states.shape          # (items, max tokens, hidden)
    torch.Size([15, ..., 192])
    >>> path = cache.save("my_cache")
    >>> load_knowledge_cache("my_cache", teacher=teacher).items == cache.items
    True

Each item is a question written by the project; the answer stored in the
cache is **the teacher's own greedy continuation** of the question, because
the draft must predict what the teacher would say. One forward pass of the
teacher over question + answer gives the hidden states of one layer (default:
the last) for every token; they are padded into one tensor with a key-padding
mask and item boundaries.

Items live in YAML files (``qdlib/data/knowledge_*.yaml``) so instructors can
swap in their own. Each item has ``eval_paraphrases`` that are kept apart for
evaluation and never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import paths
from .corpus import pad_id
from .errors import ConfigError, MissingFileError, QdError
from .io import atomic_dir, atomic_path, how_to_restore, load_safetensors, read_json, write_json_atomic
from .models import is_bundled, model_name
from .progress import progress_bar
from .sampling import run_layers

FORMAT_VERSION = 1
ITEM_KEYS = {"id", "question", "reference_answer", "train_paraphrases", "eval_paraphrases"}


# ----------------------------------------------------------------------------- items


def builtin_items_path(teacher=None) -> Path:
    """The built-in item file for a teacher: Python questions for the bundled one, AI/ML Q&A otherwise."""
    name = getattr(getattr(teacher, "config", None), "_name_or_path", "") if teacher is not None else ""
    bundled = not name or is_bundled(name)  # no recorded name: an in-memory model, treat like the bundled one
    return paths.DATA_DIR / ("knowledge_tiny.yaml" if bundled else "knowledge_qwen3.yaml")


def load_items(path: str | os.PathLike | None = None, teacher=None) -> list[dict]:
    """Read knowledge items from YAML (default: the built-in set for ``teacher``), validated."""
    import yaml

    path = Path(path) if path else builtin_items_path(teacher)
    if not path.is_file():
        raise MissingFileError(f"knowledge item file {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected a top-level 'items:' list of knowledge items")
    seen = set()
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "question" not in it or "id" not in it:
            raise ConfigError(f"{path}: item {i} needs at least 'id' and 'question'")
        unknown = set(it) - ITEM_KEYS
        if unknown:
            raise ConfigError(f"{path}: item {it['id']!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(ITEM_KEYS)}")
        if it["id"] in seen:
            raise ConfigError(f"{path}: duplicate item id {it['id']!r}")
        seen.add(it["id"])
        it.setdefault("reference_answer", "")
        it.setdefault("train_paraphrases", [])
        it.setdefault("eval_paraphrases", [])
    return items


def save_items(items: list[dict], path: str | os.PathLike) -> Path:
    """Write knowledge items as the YAML that :func:`load_items` reads (atomically), e.g. the held-out items of
    :func:`qdlib.memory.code_items` for `qd build-cache --items FILE`. Only the item keys are kept."""
    import yaml

    rows = [{k: it[k] for k in ("id", "question", "reference_answer", "train_paraphrases", "eval_paraphrases") if k in it}
            for it in items]
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({"items": rows}, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------- fingerprint


def teacher_fingerprint(model) -> str:
    """A short hash of a model's config and weights that does not depend on dtype or device.

    Weights are rounded to bfloat16 and sampled (at most 4096 values per
    tensor, evenly strided) so the fingerprint is cheap even for Qwen3-0.6B and
    the same whether the model was loaded in float32 or bfloat16, on CPU or GPU.
    """
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures", "use_cache",
              "_attn_implementation", "attn_implementation"):
        cfg.pop(k, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to("cpu", torch.bfloat16).view(torch.int16)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the cache


@dataclass
class KnowledgeCache:
    """Teacher hidden states for N knowledge items, padded to M tokens.

    Attributes:
        states: ``(N, M, D)`` float32 hidden states of one teacher layer.
        mask: ``(N, M)`` bool, True for real tokens (False is padding).
        input_ids: ``(N, M)`` token ids of question + answer (padding id where masked).
        question_lengths: tokens of each item's question; the rest is the answer.
        items: the items (id, question, answer = the teacher's continuation, ...).
        layer: which teacher layer the states come from (0-based decoder layer index).
        teacher_name, fingerprint: where the states came from.
    """

    states: torch.Tensor
    mask: torch.Tensor
    input_ids: torch.Tensor
    question_lengths: list[int]
    items: list[dict]
    layer: int
    teacher_name: str
    fingerprint: str
    meta: dict = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return self.states.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[-1]

    def memory_bytes(self) -> int:
        """Bytes held by the cached tensors (states, mask, ids)."""
        return sum(t.numel() * t.element_size() for t in (self.states, self.mask, self.input_ids))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cache.safetensors`` + ``cache.json`` into the folder ``path``, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "teacher_name": self.teacher_name,
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "num_items": self.num_items,
            "max_tokens": self.states.shape[1],
            "hidden_size": self.hidden_size,
            "question_lengths": self.question_lengths,
            "items": self.items,
            **self.meta,
        }
        with atomic_dir(path) as tmp:
            save_file({"states": self.states.contiguous(), "mask": self.mask.contiguous(),
                       "input_ids": self.input_ids.contiguous()}, str(tmp / "cache.safetensors"))
            write_json_atomic(tmp / "cache.json", meta)
        return path


class KnowledgeCacheError(QdError, ValueError):
    """A knowledge cache is missing, corrupt, or was built for another teacher."""


def load_knowledge_cache(path: str | os.PathLike, teacher=None) -> KnowledgeCache:
    """Read a cache written by :meth:`KnowledgeCache.save`.

    Given ``teacher``, its fingerprint must match the cache's; otherwise a
    :class:`KnowledgeCacheError` says what differs and how to rebuild.
    """
    path = Path(path)
    st, js = path / "cache.safetensors", path / "cache.json"
    if not st.is_file() or not js.is_file():
        build = "build one with `qd build-cache` or qdlib.build_knowledge_cache"
        raise KnowledgeCacheError(f"no knowledge cache at {path} (expected cache.safetensors and cache.json); "
                                  f"{how_to_restore(path, build)}")
    fix = "rebuild it with `qd build-cache`"
    meta = read_json(js, what="knowledge cache metadata", fix=fix, error=KnowledgeCacheError)
    tensors = load_safetensors(st, what="knowledge cache", fix=fix, error=KnowledgeCacheError)
    if meta.get("format_version") != FORMAT_VERSION:
        raise KnowledgeCacheError(f"knowledge cache at {path} has format version {meta.get('format_version')}, "
                                  f"this qdlib reads {FORMAT_VERSION}; rebuild it with `qd build-cache`")
    missing = {"states", "mask", "input_ids"} - set(tensors)
    if missing:
        raise KnowledgeCacheError(f"knowledge cache at {path} lacks tensors {sorted(missing)}; rebuild it")
    states = tensors["states"]
    if tuple(states.shape) != (meta["num_items"], meta["max_tokens"], meta["hidden_size"]):
        raise KnowledgeCacheError(f"knowledge cache at {path}: states shape {tuple(states.shape)} disagrees with its "
                                  f"metadata ({meta['num_items']}, {meta['max_tokens']}, {meta['hidden_size']})")
    cache = KnowledgeCache(states=states, mask=tensors["mask"].bool(), input_ids=tensors["input_ids"],
                           question_lengths=meta["question_lengths"], items=meta["items"], layer=meta["layer"],
                           teacher_name=meta["teacher_name"], fingerprint=meta["fingerprint"])
    if teacher is not None:
        check_cache_matches(cache, teacher)
    return cache


def check_cache_matches(cache: KnowledgeCache, teacher) -> None:
    """Refuse a cache built for another teacher, saying what differs."""
    fp = teacher_fingerprint(teacher)
    if fp == cache.fingerprint:
        return
    diffs = []
    if teacher.config.hidden_size != cache.hidden_size:
        diffs.append(f"hidden size {cache.hidden_size} vs {teacher.config.hidden_size}")
    if cache.layer >= teacher.config.num_hidden_layers:
        diffs.append(f"layer {cache.layer} does not exist in a {teacher.config.num_hidden_layers}-layer teacher")
    name = model_name(teacher)
    what = "; ".join(diffs) or "same shapes, different weights"
    raise KnowledgeCacheError(
        f"knowledge cache was built for teacher {cache.teacher_name!r} (fingerprint {cache.fingerprint}), "
        f"not for {name!r} (fingerprint {fp}): {what}. Rebuild it for this teacher with `qd build-cache` "
        f"or qdlib.build_knowledge_cache(teacher, tokenizer)."
    )


@torch.no_grad()
def teacher_answers(teacher, tokenizer, questions: list[str], max_new_tokens: int = 48, *, batch_size: int = 16,
                    progress: bool = False) -> list[str]:
    """The teacher's own greedy continuation of each question (each stops at end-of-text), in left-padded batches:
    a batch costs about what one question costs alone, and each answer is the one the question gets alone (the
    padding is masked; tested against :func:`teacher_answer`)."""
    pad = pad_id(tokenizer, default=tokenizer.eos_token_id)
    batches = [questions[i : i + batch_size] for i in range(0, len(questions), batch_size)]
    answers = []
    for batch in progress_bar(batches, desc="teacher answers", enabled=progress):
        rows = [tokenizer(q)["input_ids"] for q in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, width), left-padded
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, width - len(r):], mask[j, width - len(r):] = torch.tensor(r), 1
        out = teacher.generate(ids.to(teacher.device), attention_mask=mask.to(teacher.device),
                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return answers


def teacher_answer(teacher, tokenizer, question: str, max_new_tokens: int = 48) -> str:
    """The teacher's own greedy continuation of ``question`` (stops at end-of-text)."""
    return teacher_answers(teacher, tokenizer, [question], max_new_tokens)[0]


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-item states ``(T_i, D)`` into one ``(N, M, D)`` tensor, M = the longest T_i, with its mask.

    Padding slots hold zeros; the mask ``(N, M)`` is True for real tokens, the cache's convention
    (the opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``, which marks the padding).

    >>> states, mask = pad_states([torch.ones(2, 3), torch.full((4, 3), 2.0)])
    >>> tuple(states.shape), mask.tolist()
    ((2, 4, 3), [[True, True, False, False], [True, True, True, True]])
    >>> states[0, 2:].abs().sum().item(), states.dtype
    (0.0, torch.float32)
    """
    if not states:
        raise ConfigError("pad_states needs at least one item's states")
    M = max(s.shape[0] for s in states)
    padded = states[0].new_zeros(len(states), M, states[0].shape[-1])  # (N, M, D)
    mask = torch.zeros(len(states), M, dtype=torch.bool, device=states[0].device)  # (N, M)
    for i, s in enumerate(states):
        padded[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return padded, mask


@torch.no_grad()
def build_knowledge_cache(teacher, tokenizer, items: list[dict] | str | os.PathLike | None = None, *,
                          layer: int | None = None, answer_tokens: int = 48, progress: bool = True,
                          answers: list[str] | None = None) -> KnowledgeCache:
    """Run the teacher once per item and keep one layer's hidden states for question + answer.

    Args:
        items: a list of item dicts, a YAML path, or None for the built-in set for this teacher.
        layer: teacher decoder layer whose output is kept (default: the last, after the final norm's input).
        answer_tokens: length of the teacher's greedy answer stored after each question.
        answers: the answer text of each item instead of the teacher's (the memory protocol's shuffled control).
    """
    if items is None or isinstance(items, (str, os.PathLike)):
        items = load_items(items, teacher)
    L = teacher.config.num_hidden_layers
    layer = L - 1 if layer is None else layer
    if not isinstance(layer, int) or not 0 <= layer < L:
        raise ConfigError(f"layer={layer!r} is not a decoder layer of this teacher; allowed: 0..{L - 1}")
    if answers is not None and len(answers) != len(items):
        raise ConfigError(f"answers: {len(answers)} given for {len(items)} items; give one per item, or None")
    if answers is None:
        answers = teacher_answers(teacher, tokenizer, [it["question"] for it in items], answer_tokens, progress=progress)
    rows, qlens, out_items = [], [], []
    for it, answer in zip(progress_bar(items, desc="knowledge cache", enabled=progress), answers):
        q_ids = tokenizer(it["question"], add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([q_ids + a_ids], device=teacher.device)
        # hidden[0] is the embedding output, hidden[i + 1] the residual stream after decoder layer i (no final norm)
        _, hidden = run_layers(teacher, ids, range(layer + 1), return_hidden=True)
        state = hidden[layer + 1][0]  # (T, D)
        rows.append((ids[0].cpu(), state.float().cpu()))
        qlens.append(len(q_ids))
        out_items.append({**it, "answer": answer})
    states, mask = pad_states([st for _, st in rows])  # (N, M, D), (N, M)
    input_ids = torch.full(mask.shape, tokenizer.pad_token_id, dtype=torch.long)  # (N, M)
    input_ids[mask] = torch.cat([ids for ids, _ in rows])  # each row's real tokens are a prefix, filled in row order
    return KnowledgeCache(states=states, mask=mask, input_ids=input_ids, question_lengths=qlens, items=out_items,
                          layer=layer, teacher_name=model_name(teacher), fingerprint=teacher_fingerprint(teacher))


@torch.no_grad()
def pooled_states(cache: KnowledgeCache) -> torch.Tensor:
    """Mean of each item's cached states over its real tokens: ``(N, D)``."""
    m = cache.mask[..., None].float()  # (N, M, 1)
    return (cache.states * m).sum(1) / m.sum(1)  # (N, D)


@torch.no_grad()
def prompt_state(teacher, tokenizer, prompt: str, layer: int) -> torch.Tensor:
    """Mean over the prompt's tokens of the teacher's states after ``layer``: ``(D,)``."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(teacher.device)
    return run_layers(teacher, ids, range(layer + 1), return_hidden=True)[1][layer + 1][0].float().mean(0).cpu()


@torch.no_grad()
def similarity_matrix(cache: KnowledgeCache, teacher, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Cosine similarity between each prompt and each cached item (mean-pooled states): ``(P, N)``."""
    items = pooled_states(cache)  # (N, D)
    rows = [torch.cosine_similarity(items, prompt_state(teacher, tokenizer, p, cache.layer)[None], dim=-1)
            for p in prompts]
    return torch.stack(rows)  # (P, N)


@torch.no_grad()
def nearest_items(cache: KnowledgeCache, teacher, tokenizer, prompt: str, k: int = 3) -> list[tuple[str, float]]:
    """The k cached items most similar to ``prompt``: cosine of mean-pooled states of the cache's layer."""
    sims = similarity_matrix(cache, teacher, tokenizer, [prompt])[0]  # (N,)
    order = sims.argsort(descending=True)[:k]
    return [(cache.items[i]["id"], round(sims[i].item(), 4)) for i in order.tolist()]


def attention_per_item(weights: torch.Tensor, cache: KnowledgeCache) -> torch.Tensor:
    """Sum attention weights over each item's slots: ``(..., N * M)`` -> ``(..., N)``.

    The fusion layers flatten the cache into one memory of N * M slots (item-major);
    this folds a weight map back into one value per item (padding slots get no weight).
    """
    N, M = cache.mask.shape
    return weights.reshape(*weights.shape[:-1], N, M).sum(-1)
