"""Where a decoder's parameters and per-token multiply-adds live (notebook 00).

Counted from the config alone, so it works for the real Qwen3-0.6B without
its weights:

    >>> from transformers import Qwen3Config
    >>> cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    ...                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    >>> round(layer_macs(cfg) / 1e6, 1), round(head_macs(cfg) / 1e6, 1)
    (15.7, 155.6)
    >>> round(draft_cost_ratio(cfg, 6), 2)
    0.42

Multiply-adds (MACs) per generated token ignore the attention-score work
(about ``2 * heads * head_dim * context`` per layer and token, small at short
contexts) and the norms and activations, which are cheap.
"""

from __future__ import annotations


def _dims(cfg):
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    return cfg.hidden_size, cfg.num_attention_heads, kv, hd, cfg.intermediate_size


def attn_proj_macs(cfg) -> int:
    """q, k, v and o projections of one layer, per token."""
    d, h, kv, hd, _ = _dims(cfg)
    return d * h * hd + 2 * d * kv * hd + h * hd * d


def mlp_macs(cfg) -> int:
    """Gate, up and down projections of one layer's SwiGLU MLP, per token."""
    d, _, _, _, f = _dims(cfg)
    return 3 * d * f


def layer_macs(cfg) -> int:
    """One decoder layer, per token (projections + MLP)."""
    return attn_proj_macs(cfg) + mlp_macs(cfg)


def head_macs(cfg) -> int:
    """The output head (hidden -> vocabulary logits), per token."""
    return cfg.hidden_size * cfg.vocab_size


def draft_cost_ratio(cfg, k: int, vocab: int | None = None) -> float:
    """Cost ratio c of a k-layer draft to the full model, by multiply-adds per token.

    ``vocab`` lets the draft's head be trimmed to fewer tokens (as FR-Spec does).
    """
    full = cfg.num_hidden_layers * layer_macs(cfg) + head_macs(cfg)
    head = cfg.hidden_size * (vocab if vocab is not None else cfg.vocab_size)
    return (k * layer_macs(cfg) + head) / full


def cost_table(cfg) -> list[dict]:
    """Parameters and MACs per token for embeddings, attention, MLP, norms and head."""
    d, h, kv, hd, f = _dims(cfg)
    L = cfg.num_hidden_layers
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    norms = L * (2 * d + 2 * hd) + d  # two RMSNorms per layer, q/k norms, final norm
    rows = [
        {"part": "embeddings", "params": cfg.vocab_size * d, "macs": 0},
        {"part": f"attention x{L}", "params": L * attn_proj_macs(cfg), "macs": L * attn_proj_macs(cfg)},
        {"part": f"MLP x{L}", "params": L * mlp_macs(cfg), "macs": L * mlp_macs(cfg)},
        {"part": "norms", "params": norms, "macs": 0},
        {"part": "output head" + (" (tied)" if tied else ""), "params": 0 if tied else head_macs(cfg),
         "macs": head_macs(cfg)},
    ]
    tp = sum(r["params"] for r in rows)
    tm = sum(r["macs"] for r in rows)
    for r in rows:
        r["params_share"] = r["params"] / tp
        r["macs_share"] = r["macs"] / tm
    return rows


def count_params(model) -> int:
    """Distinct parameters of a model (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def fusion_macs(hidden_size: int, cache_dim: int, memory_slots: int) -> int:
    """One gated cross-attention block per token: q and o projections plus attention over the memory.

    The cache's key/value projections are paid once per attached cache, not per token.
    """
    return 2 * hidden_size * cache_dim + 2 * cache_dim * memory_slots


def feature_draft_cost_ratio(cfg, k: int = 1, vocab: int | None = None) -> float:
    """Cost ratio c of a feature-fed draft (notebook 07) by multiply-adds per token: its ``fc`` (2H -> H),
    ``k`` decoder layers and the head over ``vocab`` tokens (all of them by default), over the full model.

    >>> from transformers import Qwen3Config
    >>> q = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    ...                 num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    >>> round(feature_draft_cost_ratio(q, 1), 3), round(feature_draft_cost_ratio(q, 1, vocab=32_000), 3)
    (0.291, 0.085)
    """
    full = cfg.num_hidden_layers * layer_macs(cfg) + head_macs(cfg)
    fc = 2 * cfg.hidden_size * cfg.hidden_size
    return (fc + k * layer_macs(cfg) + cfg.hidden_size * (vocab if vocab is not None else cfg.vocab_size)) / full
