"""Micro-benchmarks of one decoding step: the costs behind the speed-up formula (bench, cards, notebook 06).

``c`` is one draft step over one teacher step, both with a KV cache after the same context;
``verify_cost[g]`` is one teacher pass over ``g + 1`` tokens over one teacher step. Both are medians of
many single calls, measured outside any decoding loop.
"""

from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def step_time(model, context: int = 96, tokens: int = 1, n: int = 30) -> float:
    """Median seconds of one cached forward over ``tokens`` new tokens after ``context`` cached ones."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, model.config.vocab_size, (1, context), generator=g).to(dev)
    new = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g).to(dev)
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=tokens)
        times.append(time.perf_counter() - t0)
        cache.crop(-tokens)
    return statistics.median(times[2:])


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
