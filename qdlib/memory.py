"""Does a draft *use* its knowledge cache? The three-arm protocol (notebook 04; the knowledge-path issue).

A memory earns its keep only if the draft reads it: put items the draft never trained on into the cache at
test time (the weights untouched), and compare its agreement with the teacher on those items' paraphrases

- ``own``: the cache holds exactly those items;
- ``detached``: no cache at all;
- ``swapped``: the cache holds as many *other* items;
- ``shuffled``: each cached row pairs one item's question with another item's answer (the teacher run again over
  each mismatched text, :func:`shuffled_memory`).

The path is proven only if ``own`` beats ``detached`` and the gain disappears under ``swapped`` and
``shuffled``; a gain that survives them comes from having *a* memory, not from what is in it.

Items the draft never saw come from :func:`code_items`: documented functions of the standard library's
*held-out* files (which neither the teacher nor any draft trained on), the question being the function's header
and the first line of its docstring, the way the course's own items are written.

    >>> items = code_items(n=3)
    >>> [sorted(it) for it in items][0]
    ['eval_paraphrases', 'id', 'question', 'train_paraphrases']
    >>> items[0]["question"].startswith("def ") and items[0]["question"].count('"' * 3) == 2
    True
"""

from __future__ import annotations

import ast
import random

import torch

from .corpus import corpus_files, read_source
from .distill_data import paraphrase_eval_set
from .draft_files import load_draft
from .errors import ConfigError
from .io import write_json_atomic
from .knowledge import KnowledgeCache, build_knowledge_cache
from .models import load_teacher
from .train.evaluate import score_arms

ARMS = ("own", "detached", "swapped", "shuffled")


def _documented_functions(text: str):
    """``(name, args source, first docstring line)`` of each documented function with a one-line summary."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
            continue
        doc = (ast.get_docstring(node) or "").strip().splitlines()
        if not doc or not 12 <= len(doc[0]) <= 80 or '"""' in doc[0] or "\\" in doc[0]:
            continue
        args = [a for a in ast.unparse(node.args).split(", ") if a not in ("self", "cls")]
        yield node.name, ", ".join(args), doc[0].strip()


def _item(relpath: str, name: str, args: str, doc: str) -> dict:
    method_args = ", ".join(["self"] + ([args] if args else []))
    return {"id": f"{relpath}::{name}",
            "question": f'def {name}({args}):\n    """{doc}"""\n',
            "train_paraphrases": [],
            "eval_paraphrases": [f'class Helper:\n    def {name}({method_args}):\n        """{doc}"""\n',
                                 f"# {doc}\ndef {name}({args}):\n"]}


def code_items(n: int = 48, *, source: str = "stdlib", split: str = "val", seed: int = 0) -> list[dict]:
    """``n`` knowledge items cut from documented functions of the corpus' ``split`` files (distinct names).

    Each item's question is ``def name(args):`` plus the docstring's first line; its evaluation paraphrases say the
    same in other words of code: the function as a method of a class, and the summary as a comment above a bare
    header. There are no training paraphrases: these items are for memories the draft never trained on. The files
    are visited in a seeded order, one function per file per pass, so the items spread over the files.
    """
    files = [f for f in corpus_files(source) if f.split == split]
    random.Random(seed).shuffle(files)
    found = [list(_documented_functions(read_source(f.path) or "")) for f in files]
    items, seen = [], set()
    for depth in range(max((len(x) for x in found), default=0)):
        for f, funcs in zip(files, found):
            if depth < len(funcs) and funcs[depth][0] not in seen and len(items) < n:
                seen.add(funcs[depth][0])
                items.append(_item(f.relpath, *funcs[depth]))
    if len(items) < n:
        raise ConfigError(f"the {source} {split} files hold only {len(items)} documented functions, {n} were asked for")
    return items


def shuffled_memory(teacher, tokenizer, cache: KnowledgeCache, perm: list[int]) -> KnowledgeCache:
    """The memory of ``cache``'s items with item ``i``'s question followed by item ``perm[i]``'s answer, the teacher
    run again over each mismatched text.

    Re-pairing the stored states would test nothing: the fusion reads all items' slots as one unordered memory (no
    positions), so the same states in another arrangement read exactly the same. Run again, each answer's states
    carry the wrong question as their context, while the set of answer tokens stays the same.
    """
    if sorted(perm) != list(range(cache.num_items)):
        raise ConfigError(f"perm must be a permutation of range({cache.num_items}), got {perm}")
    shuffled = build_knowledge_cache(teacher, tokenizer, cache.items, layer=cache.layer, progress=False,
                                     answers=[cache.items[j]["answer"] for j in perm])
    shuffled.items = [{**cache.items[i], "answer": cache.items[j]["answer"], "shuffled_answer_of": cache.items[j]["id"]}
                      for i, j in enumerate(perm)]
    return shuffled


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation of ``range(n)`` without fixed points (a random order, each item paired with the next).

    >>> p = derangement(5); sorted(p) == list(range(5)) and all(i != j for i, j in enumerate(p))
    True
    """
    if n < 2:
        raise ConfigError(f"a shuffled memory needs at least 2 items, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    perm = [0] * n
    for k, i in enumerate(order):
        perm[i] = order[(k + 1) % n]
    return perm


@torch.no_grad()
def memory_arms(teacher, tokenizer, draft, items: list[dict], other_items: list[dict], *, new_tokens: int = 32,
                answer_tokens: int = 48, seed: int = 0) -> dict:
    """Teacher-forced top-1 agreement of ``draft`` on ``items``' evaluation paraphrases (the teacher's greedy
    continuations) under the four arms; ``gain`` is each arm's agreement minus the detached one, and ``kl`` the mean
    KL(teacher || draft) per arm (it moves even where the top token does not).

    ``other_items`` fill the swapped memory (as many as ``items``). The draft's own attached cache is restored.
    """
    if len(other_items) != len(items):
        raise ConfigError(f"the swapped memory needs as many items as the memory under test: {len(other_items)} "
                          f"against {len(items)}")
    es = paraphrase_eval_set(teacher, tokenizer, items, new_tokens)
    own = build_knowledge_cache(teacher, tokenizer, items, answer_tokens=answer_tokens, progress=False)
    other = build_knowledge_cache(teacher, tokenizer, other_items, answer_tokens=answer_tokens, progress=False)
    return arms_on(teacher, tokenizer, {"draft": draft}, es, own, other, seed=seed)["draft"]


def arms_on(teacher, tokenizer, drafts: dict, es, own: KnowledgeCache, other: KnowledgeCache, *,
            seed: int = 0, shuffled: KnowledgeCache | None = None) -> dict:
    """:func:`memory_arms` for each of ``drafts`` (``name: draft``) on rows ``es`` already continued by the teacher,
    with the memory under test ``own`` and the swapped memory ``other`` already built (the shuffled one is made
    from ``own`` unless given): ``{name: result}``. One teacher pass serves every draft's arms."""
    if shuffled is None:
        shuffled = shuffled_memory(teacher, tokenizer, own, derangement(own.num_items, seed))
    caches = {"own": own, "detached": None, "swapped": other, "shuffled": shuffled}
    arms = {(name, arm): (d, cache) for name, d in drafts.items() for arm, cache in caches.items()}
    scores = score_arms(teacher, arms, {"p": es})
    out = {}
    for name in drafts:
        agree = {arm: scores[name, arm]["p"]["agreement"] for arm in caches}
        out[name] = {**agree, "gain": {arm: agree[arm] - agree["detached"] for arm in ARMS if arm != "detached"},
                     "kl": {arm: scores[name, arm]["p"]["kl"] for arm in caches}, "items": own.num_items,
                     "positions": int(es.mask.sum())}
    return out


def measure_reference(out_path, draft=None, teacher=None, tokenizer=None, *, n_items: int = 24, new_tokens: int = 32,
                      seed: int = 0) -> dict:
    """The protocol on a draft (the course's reference draft by default) with ``2 * n_items`` held-out items: the
    first half in the memory under test, the second half as the swapped memory; written to ``out_path`` (JSON)."""
    if teacher is None:
        teacher, tokenizer = load_teacher("tiny")
    draft = load_draft() if draft is None else draft
    items = code_items(2 * n_items, seed=seed)
    result = memory_arms(teacher, tokenizer, draft, items[:n_items], items[n_items:], new_tokens=new_tokens, seed=seed)
    gates = [torch.tanh(f.gate).abs().max().item() for f in getattr(draft, "fusion", {}).values()]
    record = {**result, "config": {"n_items": n_items, "new_tokens": new_tokens, "seed": seed, "split": "stdlib val"},
              "largest_gate": max(gates, default=0.0), "item_ids": [it["id"] for it in items]}
    write_json_atomic(out_path, record)
    return record
