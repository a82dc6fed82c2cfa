"""Retrieval training: teach a draft's fusion layers to *look things up* (the knowledge-path issue; notebook 04).

The distillation run trains the fusion path on one fixed cache of 15 items whose answers also sit in the training
rows, so the draft can learn them by heart and never needs the cache. Retrieval training changes the task so that
the memory is the only route to the answer's item-specific part:

- **hundreds of items** (documented functions of the standard library's *training* files, :func:`code_items`),
  split by item into training and validation items; the protocol's held-out items come from other files;
- **a new memory every step**: each batch's rows restate some items in other words (the same two paraphrase
  templates as the protocol), and the memory holds those items among others (or, on a share of the steps, only
  others: then the right thing to learn is to ignore it);
- **the distilled draft frozen**: only the fusion blocks learn (as Flamingo and LLaMA-Adapter train their gated
  layers on a frozen backbone), with the gate started slightly open (``gate_init``) so the cross-attention gets a
  gradient from the first step. Detached, the trained draft is the distilled draft exactly.

The rows are each item's two paraphrases and its question itself (a positive control: after the question the
teacher's continuation *is* the cached answer), each continued greedily by the teacher; the loss is
KL(teacher || draft) on those continuations, the positions the protocol scores. The fusion blocks start from the
distilled weights (``fusion_init="keep"``) or as a similarity lookup (:func:`similarity_init`). Checkpoints are
chosen by the validation items' paraphrase agreement with their own memory, never by the protocol's held-out items.
:func:`copy_bound` says how much any lookup could add at most on a set of rows; :func:`measure_trained` runs the
protocol on a trained draft (``qd train-memory`` does all of it; notebook 04, section 7, reads the result).

    >>> cfg = RetrievalConfig(steps=10)
    >>> cfg.memory_items > cfg.batch_items
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import torch

from . import divergence
from .distill_data import EvalSet, paraphrase_eval_set
from .errors import ConfigError
from .io import atomic_path, torch_load_safe, torch_save_atomic, write_json_atomic
from .knowledge import KnowledgeCache, build_knowledge_cache, load_knowledge_cache
from .memory import arms_on, code_items, derangement, shuffled_memory
from .settings.training import RetrievalConfig
from .train import FitConfig, Recipe, fit
from .train.evaluate import score_arms

# ----------------------------------------------------------------------------- data


def retrieval_data(teacher, tokenizer, cfg: RetrievalConfig, run_dir, *, exclude: set[str] = frozenset()) -> dict:
    """The items' knowledge cache and their paraphrase rows, built once into ``run_dir`` (then read back).

    ``exclude``: function names that must not become items (the protocol's held-out items). Returns
    ``{"cache", "ids", "mask", "row_item", "kind"}``: row ``r`` is about item ``row_item[r]``, either one of its
    paraphrases (``kind`` 0) or its question itself (``kind`` 1: then the continuation is the cached answer, the
    case where a lookup is sure to pay).
    """
    run_dir = Path(run_dir)
    cache_dir, rows_path = run_dir / "items_cache", run_dir / "rows.pt"
    if not rows_path.exists():
        pool = code_items(cfg.items + len(exclude), split="train", seed=cfg.seed)
        items = [it for it in pool if it["id"].split("::")[1] not in exclude][: cfg.items]
        if len(items) < cfg.items:
            raise ConfigError(f"only {len(items)} training items are left after excluding {len(exclude)} names")
        build_knowledge_cache(teacher, tokenizer, items, answer_tokens=cfg.answer_tokens, progress=False).save(cache_dir)
        per_item = len(items[0]["eval_paraphrases"])  # each item's rows: its paraphrases, then its question
        with_question = [{**it, "eval_paraphrases": it["eval_paraphrases"] + [it["question"]]} for it in items]
        es = paraphrase_eval_set(teacher, tokenizer, with_question, cfg.new_tokens)
        ids, mask = es.ids, es.mask
        row_item = torch.arange(len(items)).repeat_interleave(per_item + 1)
        kind = torch.tensor([0] * per_item + [1]).repeat(len(items))
        torch_save_atomic({"ids": ids, "mask": mask, "row_item": row_item, "kind": kind}, rows_path)
    rows = torch_load_safe(rows_path)
    return {"cache": load_knowledge_cache(cache_dir, teacher=teacher), **rows}


def sub_cache(cache: KnowledgeCache, index) -> KnowledgeCache:
    """The cache of the items at ``index`` only (a memory of those items)."""
    index = torch.as_tensor(index, dtype=torch.long)
    return dataclasses.replace(cache, states=cache.states[index], mask=cache.mask[index],
                               input_ids=cache.input_ids[index],
                               question_lengths=[cache.question_lengths[i] for i in index.tolist()],
                               items=[cache.items[i] for i in index.tolist()])


def step_memory(step: int, train_items: list[int], cfg: RetrievalConfig) -> tuple[list[int], list[int], bool]:
    """Step ``step``'s batch items and memory items, and whether the memory is swapped (holds none of the batch).

    >>> cfg = RetrievalConfig(items=40, val_items=4, memory_items=6, batch_items=2)
    >>> batch, memory, swapped = step_memory(3, list(range(36)), cfg)
    >>> len(batch), len(memory), swapped == (not set(batch) <= set(memory))
    (2, 6, True)
    """
    rng = random.Random(cfg.seed * 1_000_003 + step)
    order = rng.sample(train_items, len(train_items))
    batch = order[: cfg.batch_items]
    swapped = rng.random() < cfg.swapped_share
    others = order[cfg.batch_items : cfg.batch_items + cfg.memory_items]
    memory = others if swapped else batch + others[: cfg.memory_items - cfg.batch_items]
    return batch, rng.sample(memory, len(memory)), swapped


# ----------------------------------------------------------------------------- training


def freeze_all_but_fusion(draft, gate_init: float) -> list[torch.nn.Parameter]:
    """Freeze the draft except its fusion blocks, set every gate to ``tanh(gate) = gate_init``; the fusion params."""
    if not len(getattr(draft, "fusion", {})):
        raise ConfigError("retrieval training needs a draft with the knowledge path (knowledge_enhancement.enabled)")
    params = []
    for name, p in draft.named_parameters():
        p.requires_grad_(name.startswith("fusion."))
        if p.requires_grad:
            params.append(p)
    with torch.no_grad():
        for block in draft.fusion.values():
            block.gate.fill_(math.atanh(gate_init))
    return params


@torch.no_grad()
def similarity_init(draft, scale: float = 3.0, seed: int = 0) -> None:
    """Start every fusion block as a similarity lookup: queries and keys through the same orthonormal projection
    ``W`` (so a draft state attends to the cached teacher states most like it), values through ``W`` and back out
    through ``W^T`` (so it reads those states themselves), and q/k-norm weights ``scale`` (sharper attention).

    The draft's layers were cut from the teacher's and distilled to predict what it predicts, so its states and the
    cached teacher states live in nearly the same space: at a position whose text the cache holds, the most similar
    cached state is the teacher's own state there, which already says the teacher's next token.
    """
    g = torch.Generator().manual_seed(seed)
    for block in draft.fusion.values():
        attn = block.attn
        hidden, width = attn.q_proj.in_features, attn.q_proj.out_features
        if attn.k_proj.in_features != hidden:
            raise ConfigError("a similarity lookup needs cached states as wide as the draft's (memory_size = hidden size)")
        W, _ = torch.linalg.qr(torch.randn(hidden, width, generator=g))  # (D, C), orthonormal columns
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight.copy_(W.T)
        attn.o_proj.weight.copy_(W)
        attn.q_norm.weight.fill_(scale)
        attn.k_norm.weight.fill_(scale)


def _kl_loss(teacher, draft, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)  # (B, T-1, V)
    lq = torch.log_softmax(draft(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)  # (B, T-1, V)
    m = mask[:, : ids.shape[1] - 1].float()  # (B, T-1)
    return (divergence.kl(lp, lq) * m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def arm_agreements(teacher, draft, data: dict, items: list[int], other: list[int], kind: int = 0) -> dict:
    """Top-1 agreement on ``items``' rows of ``kind`` (0: paraphrases, 1: the questions themselves) with their own
    memory, none, and the ``other`` items' memory."""
    rows = torch.isin(data["row_item"], torch.tensor(items)) & (data["kind"] == kind)
    es = EvalSet(data["ids"][rows], data["mask"][rows])
    arms = {arm: (draft, None if memory is None else sub_cache(data["cache"], memory))
            for arm, memory in (("own", items), ("detached", None), ("swapped", other))}
    return {arm: s["r"]["agreement"] for arm, s in score_arms(teacher, arms, {"r": es}).items()}


class MemoryRecipe(Recipe):
    """Retrieval training as a :class:`~qdlib.train.Recipe`: step ``s`` trains on :func:`step_memory`'s batch with
    its memory attached; the score is the validation items' paraphrase agreement with their own memory."""

    name = "fusion blocks"

    def __init__(self, teacher, draft, data: dict, cfg: RetrievalConfig):
        n = data["cache"].num_items
        self.teacher, self.draft, self.data, self.cfg = teacher, draft, data, cfg
        self.train_items, val_items = list(range(n - cfg.val_items)), list(range(n - cfg.val_items, n))
        self.val_own, self.val_other = val_items[: len(val_items) // 2], val_items[len(val_items) // 2 :]
        if cfg.fusion_init == "similarity":
            similarity_init(draft, cfg.similarity_scale, cfg.seed)
        self.params = freeze_all_but_fusion(draft, cfg.gate_init)

    def parameters(self):
        return self.params

    def batch(self, step: int, micro: int) -> tuple:
        batch, memory, swapped = step_memory(step, self.train_items, self.cfg)
        d = self.data
        rows = torch.isin(d["row_item"], torch.tensor(batch)) & (d["kind"] <= int(self.cfg.question_rows))
        return d["ids"][rows], d["mask"][rows], memory, swapped

    def loss(self, batch: tuple, autocast):
        ids, mask, memory, swapped = batch
        self.draft.set_knowledge(sub_cache(self.data["cache"], memory))
        return _kl_loss(self.teacher, self.draft, ids, mask), {"swapped": swapped}

    def score(self) -> tuple[float, dict]:
        arms = arm_agreements(self.teacher, self.draft, self.data, self.val_own, self.val_other)
        same = arm_agreements(self.teacher, self.draft, self.data, self.val_own, self.val_other, kind=1)
        gates = max(torch.tanh(b.gate).abs().max().item() for b in self.draft.fusion.values())
        info = {f"val_{k}": round(v, 4) for k, v in arms.items()}
        info |= {f"val_question_{k}": round(v, 4) for k, v in same.items()} | {"largest_gate": round(gates, 4)}
        return arms["own"], info

    def save(self, folder: Path, info: dict) -> None:
        record = {"step": info["step"], **info["eval"]}
        torch_save_atomic({"fusion": self.draft.fusion.state_dict(), "record": record}, folder / "fusion.pt")
        write_json_atomic(folder / "record.json", record)

    def state_dict(self) -> dict:
        return {"fusion": self.draft.fusion.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.draft.fusion.load_state_dict(state["fusion"])

    def config(self) -> dict:
        return dataclasses.asdict(self.cfg)

    def config_defaults(self) -> dict:
        return dataclasses.asdict(RetrievalConfig())

    def train_mode(self) -> None:
        self.draft.train()


def fit_config(cfg: RetrievalConfig) -> FitConfig:
    """The loop's settings of a retrieval run: evaluation and checkpoint every ``eval_every`` steps."""
    return FitConfig(steps=cfg.steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                     min_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0, checkpoint_every=cfg.eval_every,
                     eval_every=cfg.eval_every, may_change=("eval_every",))


def train_retrieval(teacher, draft, data: dict, cfg: RetrievalConfig, run_dir, *, log=print, on_step=None) -> dict:
    """Train ``draft``'s fusion blocks by retrieval with :func:`qdlib.train.fit` (resumable from ``run_dir/last.pt``);
    the best fusion weights, by the validation items' own-memory agreement, end in ``run_dir/best/fusion.pt``
    (:func:`load_fusion` reads it). Returns the best record (also in ``run_dir/best/record.json``)."""
    run_dir = Path(run_dir)
    fit(MemoryRecipe(teacher, draft, data, cfg), fit_config(cfg), run_dir, log=log, on_step=on_step, desc="memory")
    draft.set_knowledge(None)
    return json.loads((run_dir / "best" / "record.json").read_text())


# ----------------------------------------------------------------------------- the ceiling of any lookup


def _copy_prediction(context: list[int], memory_rows: list[list[int]], max_n: int) -> int | None:
    for n in range(min(max_n, len(context)), 0, -1):
        suffix = context[-n:]
        for r in memory_rows:
            for i in range(len(r) - n):
                if r[i : i + n] == suffix:
                    return r[i + n]
    return None


def copy_bound(ids: torch.Tensor, mask: torch.Tensor, memories: list[list[list[int]]], correct: torch.Tensor,
               max_n: int = 4) -> dict:
    """How much a copying lookup could add at most: at each scored position, the token that follows the longest match
    (up to ``max_n`` tokens) of the context's suffix in that row's memory (prompt lookup's rule).

    ``memories[r]``: the token rows row ``r`` may look up; ``correct``: ``(N, T)`` bool, where the draft's own top-1
    already matches. ``copy`` is the share of scored positions where the lookup names the teacher's token,
    ``copy_only`` the share where it does and the draft does not (the most a memory could add by copying).

    >>> ids = torch.tensor([[1, 2, 3, 1, 2, 3]]); mask = torch.tensor([[0, 0, 1, 1, 1, 0]]).bool()
    >>> copy_bound(ids, mask, [[[1, 2, 3, 4]]], torch.zeros(1, 6, dtype=torch.bool))
    {'copy': 0.6667, 'copy_only': 0.6667, 'positions': 3}
    """
    hit = only = total = 0
    for r in range(len(ids)):
        row = ids[r].tolist()
        for t in range(len(row) - 1):
            if not mask[r, t]:
                continue
            guess = _copy_prediction(row[: t + 1], memories[r], max_n)
            total += 1
            hit += guess == row[t + 1]
            only += guess == row[t + 1] and not bool(correct[r, t])
    return {"copy": round(hit / max(total, 1), 4), "copy_only": round(only / max(total, 1), 4), "positions": total}


def lookup_ceiling(es, row_item: list[int], own: KnowledgeCache, other: KnowledgeCache | None = None,
                   correct: torch.Tensor | None = None) -> dict:
    """:func:`copy_bound` of rows ``es`` (row ``r`` restates item ``row_item[r]`` of ``own``) with two memories:
    ``own``, the row's own item, and ``others``, every item of ``other`` (default: every *other* item of ``own``).
    ``correct`` (default: nowhere) marks where the draft is already right."""
    rows = [own.input_ids[i][own.mask[i]].tolist() for i in range(own.num_items)]
    pool = None if other is None else [other.input_ids[i][other.mask[i]].tolist() for i in range(other.num_items)]
    correct = torch.zeros(es.ids.shape, dtype=torch.bool) if correct is None else correct
    mine = [[rows[i]] for i in row_item]
    theirs = [pool if pool is not None else rows[:i] + rows[i + 1 :] for i in row_item]
    return {"own": copy_bound(es.ids, es.mask, mine, correct), "others": copy_bound(es.ids, es.mask, theirs, correct)}


# ----------------------------------------------------------------------------- the protocol on a trained fusion


def load_fusion(draft, path) -> dict:
    """Put the fusion weights of ``path`` (``best/fusion.pt`` of a run, or a ``.safetensors`` file) into ``draft``;
    returns the training record stored with them (empty for safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state, record = load_file(str(path)), {}
    else:
        ck = torch_load_safe(path)
        state, record = ck["fusion"], ck.get("record", {})
    draft.fusion.load_state_dict({k: v.float() for k, v in state.items()})
    return record


@torch.no_grad()
def _top1_correct(draft, es) -> torch.Tensor:
    """``(N, T)`` bool: where the detached draft's top-1 names the next token of the (teacher-greedy) rows."""
    before = draft.knowledge
    draft.set_knowledge(None)
    guess = draft(input_ids=es.ids, use_cache=False).logits.argmax(-1)  # (N, T)
    draft.set_knowledge(before)
    return torch.cat([guess[:, :-1] == es.ids[:, 1:], torch.zeros(len(guess), 1, dtype=torch.bool)], 1)


def measure_trained(out_path, trained, reference, teacher, tokenizer, *, n_items: int = 24, new_tokens: int = 32,
                    seed: int = 0, training: dict | None = None) -> dict:
    """The three-arm protocol on the held-out items (:func:`code_items`, as :func:`qdlib.memory.measure_reference`)
    for the ``reference`` draft and the retrieval-``trained`` one (same body, other fusion weights), on two kinds of
    rows: the items' paraphrases (the protocol's question) and the questions themselves (a positive control: there
    the teacher's continuation *is* the cached answer). Each kind also gets :func:`lookup_ceiling` with the item's own
    memory and with the swapped one (``others``). Written to ``out_path`` (JSON)."""
    items = code_items(2 * n_items, seed=seed)
    own = build_knowledge_cache(teacher, tokenizer, items[:n_items], progress=False)
    other = build_knowledge_cache(teacher, tokenizer, items[n_items:], progress=False)
    shuffled = shuffled_memory(teacher, tokenizer, own, derangement(n_items, seed))  # both kinds' shuffled arm
    record = {}
    for kind, its in (("paraphrase", items[:n_items]),
                      ("question", [{**it, "eval_paraphrases": [it["question"]]} for it in items[:n_items]])):
        es = paraphrase_eval_set(teacher, tokenizer, its, new_tokens)
        per_item = len(es.ids) // n_items
        record[kind] = arms_on(teacher, tokenizer, {"reference": reference, "retrieval": trained}, es, own, other,
                               shuffled=shuffled)
        record[kind]["copy_bound"] = lookup_ceiling(es, [r // per_item for r in range(len(es.ids))], own, other,
                                                    _top1_correct(reference, es))
    gates = {name: max(torch.tanh(b.gate).abs().max().item() for b in d.fusion.values())
             for name, d in (("reference", reference), ("retrieval", trained))}
    record.update(largest_gate=gates, training=training or {},
                  config={"n_items": n_items, "new_tokens": new_tokens, "seed": seed, "split": "stdlib val"},
                  item_ids=[it["id"] for it in items])
    write_json_atomic(out_path, record)
    return record


def export_fusion(best_path, out_path) -> Path:
    """The fusion weights of a run's ``best/fusion.pt`` as bf16 safetensors (atomically), for :func:`load_fusion`."""
    from safetensors.torch import save_file

    state = {k: v.to(torch.bfloat16).contiguous() for k, v in torch_load_safe(best_path)["fusion"].items()}
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp))
    return Path(out_path)
