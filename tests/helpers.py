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
