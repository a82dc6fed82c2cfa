"""Micro-benchmarks of one decoding step: the costs behind the speed-up formula (bench, cards, notebook 06).

``c`` is one draft step over one teacher step, both with a KV cache after the same context;
``verify_cost[g]`` is one teacher pass over ``g + 1`` tokens over one teacher step. Both are medians of
many single calls, measured outside any decoding loop, with the forward the decoding loops use.
:func:`verify_split` splits ``v(g) - 1`` into arithmetic (the pass's own matrix products, run alone, weights read
from memory as the pass reads them) and overhead (everything else).
"""

from __future__ import annotations

import statistics
import time

import torch

from .target_engine import ENGINES, TargetEngine, supports


@torch.no_grad()
def step_time(model, context: int = 96, tokens: int = 1, n: int = 30, engine: str = "auto", memory=None) -> float:
    """Median seconds of one cached forward over ``tokens`` new tokens after ``context`` cached ones.

    ``engine``: the forward the decoding loops use, "auto" (qdlib's :class:`~qdlib.target_engine.TargetEngine`
    where it supports the model, as :func:`qdlib.speculative_generate` does), "qdlib" or "transformers".
    A draft's fusion blocks read its attached memory on the lean forward, or ``memory`` (a live memory).
    """
    from transformers import DynamicCache

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {', '.join(ENGINES)}")
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, model.config.vocab_size, (1, context), generator=g).to(dev)
    new = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g).to(dev)
    if engine == "qdlib" or (engine == "auto" and supports(model) is None):
        eng = TargetEngine(model, context + tokens)
        hooks = model.fusion_hooks(memory) if hasattr(model, "fusion_hooks") else None  # a draft's attached memory
        eng(prefix[0], hooks=hooks)
        call, undo = (lambda: eng(new[0], tokens, hooks=hooks)), (lambda: eng.crop(context))
    else:
        cache = DynamicCache(config=model.config)
        model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
        call = lambda: model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=tokens)  # noqa: E731
        undo = lambda: cache.crop(-tokens)  # noqa: E731
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        undo()
    return statistics.median(times[2:])


def _pass_matmuls(model, engine: str) -> list[tuple[torch.Tensor, bool]]:
    """The weight matrices one forward of ``engine`` multiplies by, in the order it does: ``(weight, transposed)``,
    where ``transposed`` means the forward computes ``x @ weight`` (qdlib's engine) rather than ``x @ weight.T``."""
    if engine == "qdlib" or (engine == "auto" and supports(model) is None):
        eng = TargetEngine(model, 1)
        return [(w, True) for layer in eng.stack.layers for w in (layer[1], layer[3], layer[5], layer[6])] + \
            [(eng.head, True)]
    return [(m.weight, False) for m in model.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def matmul_time(model, rows: int, n: int = 30, engine: str = "auto") -> float:
    """Median seconds of the matrix products one forward over ``rows`` tokens runs, alone: every projection of every
    layer and the head, in the order the forward of ``engine`` runs them and with its weight layout, each weight read
    from memory as a real pass reads it. What the forward spends beyond this is overhead (norms, attention, rotary
    embeddings, cache writes, Python)."""
    mats = _pass_matmuls(model, engine)
    dev, dtype = mats[0][0].device, mats[0][0].dtype
    xs = {}
    for w, t in mats:
        width = w.shape[0] if t else w.shape[1]
        xs.setdefault(width, torch.randn(rows, width, device=dev, dtype=dtype))
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        for w, t in mats:
            if t:
                xs[w.shape[0]] @ w
            else:
                torch.nn.functional.linear(xs[w.shape[1]], w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def verify_split(model, gammas=(1, 2, 4, 6, 8), context: int = 96, n: int = 30, engine: str = "auto") -> dict:
    """Where a verification pass's extra cost goes: ``v(g)`` = one pass over ``g + 1`` tokens / one step, split
    into the arithmetic (:func:`matmul_time`: the pass's matrix products, weights read from memory as the pass reads
    them) and everything else (overhead: norms, masks, cache writes, attention, Python).

    Returns ``{"step_ms", "step_arithmetic_ms", "rows": [{"gamma", "v", "pass_ms", "arithmetic_ms",
    "overhead_ms", "v_arithmetic", "v_overhead"}, ...]}``, where ``v = 1 + v_arithmetic + v_overhead``
    (the extra over one step, in teacher steps).

        >>> split = verify_split(teacher, gammas=(2,), n=5)
        >>> row = split["rows"][0]; abs(1 + row["v_arithmetic"] + row["v_overhead"] - row["v"]) < 1e-9
        True
    """
    step, step_mm = step_time(model, context, 1, n, engine), matmul_time(model, 1, n, engine)
    rows = []
    for g in gammas:
        t, mm = step_time(model, context, g + 1, n, engine), matmul_time(model, g + 1, n, engine)
        rows.append({"gamma": g, "v": t / step, "pass_ms": 1e3 * t, "arithmetic_ms": 1e3 * mm,
                     "overhead_ms": 1e3 * (t - mm), "v_arithmetic": (mm - step_mm) / step,
                     "v_overhead": ((t - mm) - (step - step_mm)) / step})
    return {"engine": engine, "step_ms": 1e3 * step, "step_arithmetic_ms": 1e3 * step_mm, "rows": rows}


@torch.no_grad()
def feature_step_time(draft, context: int = 96, n: int = 30) -> float:
    """Median seconds of one feature-fed draft step (one token, its head and argmax) after ``context`` cached ones."""
    H = draft.fc.in_features // 2
    g = torch.Generator().manual_seed(0)
    kv = draft.new_cache(context + 4)
    draft(torch.randn(1, context, H, generator=g).to(draft.device),
          torch.randint(3, draft.vocab_size, (1, context), generator=g).to(draft.device), kv)
    f, x = torch.randn(1, 1, H, generator=g).to(draft.device), torch.tensor([[5]], device=draft.device)
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        _, logits = draft(f, x, kv)
        int(draft.vocab_ids[logits[0, -1].argmax()])
        times.append(time.perf_counter() - t0)
        kv.crop(context)
    return statistics.median(times[2:])
