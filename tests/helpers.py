"""Small models for fast tests (shared by the test modules)."""

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3(vocab=256, hidden=64, layers=28, heads=2, kv_heads=1, seed=0, **kw) -> Qwen3ForCausalLM:
    """A random Qwen3 causal LM with the teacher's 28-layer depth and a tiny width."""
    torch.manual_seed(seed)
    kw.setdefault("tie_word_embeddings", True)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=1, **kw)
    return Qwen3ForCausalLM(cfg).eval()


QWEN3_06B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=151643, eos_token_id=151645,
    attention_bias=False, hidden_act="silu",
)
QWEN3_06B_SHORT_LAYERS = 8  # the real-model tests keep every width of Qwen3-0.6B but 8 of its 28 layers


def two_token_counts(target, draft, ids, n: int, temperature: float, seed: int = 0, **kw) -> torch.Tensor:
    """``(V, V)`` counts of the two tokens ``speculative_generate`` samples after ``ids`` (batch 1), ``n`` times."""
    from qdlib.speculative import speculative_generate

    V = target.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V, dtype=torch.float64)
    for _ in range(n):
        out, _ = speculative_generate(target, draft, ids, max_new_tokens=2, temperature=temperature, generator=g,
                                      eos_token_id=-1, **kw)
        counts[out[0, -2], out[0, -1]] += 1
    return counts


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, callable]:
    """Pearson's statistic of ``counts`` against the distribution ``probs`` (cells expecting fewer than 5 pooled),
    a critical value near the 0.01% tail, and the same statistic for another distribution (a power check)."""
    n = counts.sum()
    exp, obs = (probs.double() * n).flatten(), counts.flatten()
    big = exp >= 5
    pool = lambda x: torch.cat([x[big], x[~big].sum()[None]])  # noqa: E731
    e, o = pool(exp), pool(obs)
    dof = e.numel() - 1
    critical = dof + 4 * (2 * dof) ** 0.5
    against = lambda other: ((o - pool((other.double() * n).flatten())) ** 2  # noqa: E731
                             / pool((other.double() * n).flatten()).clamp(min=1e-9)).sum().item()
    return ((o - e) ** 2 / e).sum().item(), critical, against
