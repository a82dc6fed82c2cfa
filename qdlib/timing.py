"""Micro-benchmarks of one decoding step: the costs behind the speed-up formula (bench, cards, notebook 06).

``c`` is one draft step over one teacher step, both with a KV cache after the same context;
``verify_cost[g]`` is one teacher pass over ``g + 1`` tokens over one teacher step. Both are medians of
many single calls, measured outside any decoding loop, with the forward the decoding loops use.
:func:`verify_split` splits ``v(g) - 1`` into arithmetic (the teacher's matmuls at this machine's rate) and
overhead.
"""

from __future__ import annotations

import statistics
import time

import torch

from .target_engine import ENGINES, TargetEngine, supports


@torch.no_grad()
def step_time(model, context: int = 96, tokens: int = 1, n: int = 30, engine: str = "auto") -> float:
    """Median seconds of one cached forward over ``tokens`` new tokens after ``context`` cached ones.

    ``engine``: the forward the decoding loops use, "auto" (qdlib's :class:`~qdlib.target_engine.TargetEngine`
    where it supports the model, as :func:`qdlib.speculative_generate` does), "qdlib" or "transformers".
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
        eng(prefix[0])
        call, undo = (lambda: eng(new[0], tokens)), (lambda: eng.crop(context))
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


@torch.no_grad()
def matmul_time(model, rows: int, n: int = 30) -> float:
    """Median seconds of the teacher's own weight matrices (every layer's projections and the head) applied to
    ``rows`` tokens, each shape timed alone: the arithmetic of one forward over ``rows`` tokens at this
    machine's matmul rate, without anything around it."""
    shapes: dict[tuple, int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[tuple(mod.weight.shape)] = shapes.get(tuple(mod.weight.shape), 0) + 1
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    total = 0.0
    for (out_f, in_f), count in shapes.items():
        w, x = torch.randn(out_f, in_f, device=dev, dtype=dtype), torch.randn(rows, in_f, device=dev, dtype=dtype)
        times = []
        for _ in range(n + 2):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
        total += count * statistics.median(times[2:])
    return total


def verify_split(model, gammas=(1, 2, 4, 6, 8), context: int = 96, n: int = 30, engine: str = "auto") -> dict:
    """Where a verification pass's extra cost goes: ``v(g)`` = one pass over ``g + 1`` tokens / one step, split
    into the arithmetic (:func:`matmul_time`) and everything else (overhead: masks, cache, attention, Python).

    Returns ``{"step_ms", "step_arithmetic_ms", "rows": [{"gamma", "v", "pass_ms", "arithmetic_ms",
    "overhead_ms", "v_arithmetic", "v_overhead"}, ...]}``, where ``v = 1 + v_arithmetic + v_overhead``
    (the extra over one step, in teacher steps).

        >>> split = verify_split(teacher, gammas=(2,), n=5)
        >>> row = split["rows"][0]; abs(1 + row["v_arithmetic"] + row["v_overhead"] - row["v"]) < 1e-9
        True
    """
    step, step_mm = step_time(model, context, 1, n, engine), matmul_time(model, 1, n)
    rows = []
    for g in gammas:
        t, mm = step_time(model, context, g + 1, n, engine), matmul_time(model, g + 1, n)
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
