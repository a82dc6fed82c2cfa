"""qdlib's lean target forward: the same logits as transformers' for chains and trees, and a cache that keeps
exactly the verified text."""

import pytest
import torch

from qdlib.errors import ConfigError
from qdlib.target_engine import TargetEngine, supports, verifier
from qdlib.trees import tree_depths, tree_mask

from helpers import tiny_qwen3


@pytest.mark.parametrize("heads, kv_heads", [(2, 1), (4, 4)])
def test_logits_and_features_equal_transformers(heads, kv_heads):
    m = tiny_qwen3(layers=4, heads=heads, kv_heads=kv_heads, seed=1)
    ids = torch.randint(2, 256, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, hidden = m(input_ids=ids).logits[0], m.model(input_ids=ids).last_hidden_state[0]
    eng = TargetEngine(m, 64)
    first, h1 = eng(ids[0, :15].tolist(), keep=15)  # a prefill, then more tokens after the cached ones
    rest, h2 = eng(ids[0, 15:].tolist(), keep=8)
    torch.testing.assert_close(torch.cat([first, rest]), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([h1, h2]), hidden, rtol=1e-5, atol=1e-5)  # the features a draft reads
    assert eng.length == 23


def _random_tree(g, n):
    parents, tokens = [], []
    for i in range(n):
        parents.append(int(torch.randint(-1, i, (1,), generator=g)) if i else -1)
        tokens.append(int(torch.randint(2, 256, (1,), generator=g)))
    return tokens, parents


def test_a_tree_pass_scores_each_node_as_its_own_path_would():
    """Row ``i + 1`` of one tree pass equals the last logits of a plain forward over the prefix + the path to node i."""
    m = tiny_qwen3(layers=3, seed=2)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(2, 256, (9,), generator=g).tolist()
    for n in (1, 4, 9):
        tokens, parents = _random_tree(g, n)
        eng = TargetEngine(m, 64)
        eng(prefix[:-1])
        base = eng.length
        pos = torch.tensor([base] + [base + d for d in tree_depths(parents)])
        logits, _ = eng([prefix[-1]] + tokens, keep=n + 1, positions=pos, mask=tree_mask(parents))
        for i in range(n):
            path, j = [], i
            while j >= 0:
                path.append(tokens[j])
                j = parents[j]
            with torch.no_grad():
                ref = m(input_ids=torch.tensor([prefix + path[::-1]])).logits[0, -1]
            torch.testing.assert_close(logits[i + 1], ref, rtol=1e-5, atol=1e-5)


def test_keep_moves_the_accepted_path_into_place():
    """After keeping a path of a tree, the cache equals a fresh prefill of the verified text."""
    m = tiny_qwen3(layers=3, seed=4)
    prefix = [5, 9, 17, 33]
    tokens, parents = [40, 41, 42, 43, 44], [-1, -1, 1, 0, 2]  # paths: 40 -> 43 and 41 -> 42 -> 44
    eng = TargetEngine(m, 32)
    eng(prefix[:-1])
    start = eng.length
    pos = torch.tensor([start] + [start + d for d in tree_depths(parents)])
    eng([prefix[-1]] + tokens, keep=6, positions=pos, mask=tree_mask(parents))
    eng.keep(start, [0, 2, 3, 5])  # the root, then nodes 1, 2, 4: the text 33 41 42 44
    fresh = TargetEngine(m, 32)
    fresh(prefix + [41, 42, 44])
    assert eng.length == fresh.length == 7
    torch.testing.assert_close(eng.k[:, :, :, :7], fresh.k[:, :, :, :7], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eng.v[:, :, :, :7], fresh.v[:, :, :, :7], rtol=1e-5, atol=1e-6)
    nxt, _ = eng([7])
    ref, _ = fresh([7])
    torch.testing.assert_close(nxt, ref, rtol=1e-5, atol=1e-5)


def test_engines_share_the_fused_weights_and_follow_a_weight_change():
    model = tiny_qwen3(layers=3, seed=8)
    a, b = TargetEngine(model, 16), TargetEngine(model, 16)
    assert a.stack is b.stack and a.head is b.head  # fused once per model, not per generation
    with torch.no_grad():  # an in-place change, as an optimizer step or a load makes
        model.model.layers[1].mlp.down_proj.weight.mul_(-2.0)
        model.lm_head.weight.add_(0.5)
    c = TargetEngine(model, 16)
    assert c.stack is not a.stack
    ids = torch.tensor([[5, 9, 2, 7]])
    logits, _ = c(ids[0].tolist(), keep=4)
    torch.testing.assert_close(logits, model(input_ids=ids).logits[0], rtol=1e-4, atol=1e-4)


def test_refuses_what_it_does_not_cover():
    assert supports(tiny_qwen3(layers=2)) is None
    biased = tiny_qwen3(layers=2, attention_bias=True)
    assert "bias" in supports(biased)
    with pytest.raises(ConfigError, match="attention biases"):
        TargetEngine(biased, 8)
    with pytest.raises(ConfigError, match="engine='qdlib' cannot run this model: attention biases"):
        verifier(biased, False, 8, "qdlib")
    assert type(verifier(biased, False, 8, "auto")).__name__ == "HFVerifier"  # auto falls back to transformers
    with pytest.raises(ConfigError, match="engine='fast' is not one of auto, qdlib, transformers"):
        verifier(tiny_qwen3(layers=2), False, 8, "fast")
    eng = TargetEngine(tiny_qwen3(layers=2), 4)
    with pytest.raises(ConfigError, match="0 cached \\+ 5 new tokens exceed the engine's max_len=4"):
        eng([1, 2, 3, 4, 5])


@pytest.mark.slow
def test_logits_equal_transformers_on_qwen3_0_6b_widths(qwen3_06b):
    model, _ = qwen3_06b
    ids = torch.tensor([[151643, 5, 77, 1024, 9, 33, 4000, 12]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    eng = TargetEngine(model, 16)
    a, _ = eng(ids[0, :5].tolist(), keep=5)
    b, _ = eng(ids[0, 5:].tolist(), keep=3)
    torch.testing.assert_close(torch.cat([a, b]), ref, rtol=1e-4, atol=1e-4)


def _same_proposals(draft, seq, rounds=6, seed=0):
    """A lean drafter (given max_len) and a transformers one propose the same tokens and roll back alike."""
    from qdlib.decoding import Settings
    from qdlib.drafters import as_drafter

    g = torch.Generator().manual_seed(seed)
    lean, hf = as_drafter(draft, Settings(), max_len=200), as_drafter(draft, Settings())
    lean.begin(seq, None), hf.begin(seq, None)
    assert lean.engine is not None and hf.engine is None
    for r in range(rounds):
        a, b = lean.propose(seq, 4), hf.propose(seq, 4)
        assert a.tokens == b.tokens, f"round {r}"
        seq = seq + a.tokens[: r % 3] + [int(torch.randint(3, 8000, (), generator=g))]  # some accepted, a correction
        lean.commit(seq, None), hf.commit(seq, None)
        assert lean.length == hf.length == len(seq) - 1


def test_a_layer_sampled_draft_drafts_on_the_lean_forward_and_proposes_what_transformers_would(tiny):
    """Given the loop's max_len, a ModelDrafter runs the draft's layers on TargetEngine (its fusion blocks, reading
    an attached static cache, as hooks after their layers); proposals and rollbacks match transformers' forward."""
    import math

    from qdlib import build_draft, load_draft, sample_layers
    from qdlib.knowledge import build_knowledge_cache

    teacher, tok = tiny
    seq = torch.randint(3, 8000, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    _same_proposals(load_draft().set_knowledge(None), seq)
    static = build_draft(teacher, sample_layers(28, 6), knowledge_enhancement={"enabled": True}).float().eval()
    with torch.no_grad():
        for f in static.fusion.values():
            f.gate.fill_(math.atanh(0.5))  # open, so that the cache changes what is proposed
    static.set_knowledge(build_knowledge_cache(teacher, tok, answer_tokens=4))
    assert supports(static) is None and static.fusion_hooks() is not None
    _same_proposals(static, seq)
    ids = torch.tensor([seq])
    assert not torch.equal(static(input_ids=ids).logits, static.set_knowledge(None)(input_ids=ids).logits)
