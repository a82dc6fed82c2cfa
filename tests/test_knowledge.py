import json

import pytest
import torch

from qdlib import KnowledgeCacheError, build_draft, build_knowledge_cache, load_knowledge_cache
from qdlib.knowledge import load_items, nearest_items, pad_states, teacher_answer, teacher_fingerprint
from qdlib.sampling import run_layers
from qdlib import paths

from helpers import tiny_qwen3

ITEMS = [
    {"id": "a", "question": "def add(a, b):\n"},
    {"id": "b", "question": "import os\n"},
    {"id": "c", "question": "class Point:\n    def __init__(self"},
]


@pytest.fixture(scope="module")
def cache(small):
    teacher, tok = small
    return build_knowledge_cache(teacher, tok, ITEMS, answer_tokens=8, progress=False)


def test_cache_holds_teacher_states_for_question_and_own_answer(small, cache):
    teacher, tok = small
    assert cache.states.shape[0] == 3 and cache.states.shape[-1] == 32
    for i, it in enumerate(cache.items):
        assert it["answer"] == teacher_answer(teacher, tok, it["question"], 8)
        n = int(cache.mask[i].sum())
        ids = cache.input_ids[i, :n][None]
        q = tok(it["question"], add_special_tokens=False)["input_ids"]
        assert cache.question_lengths[i] == len(q) and ids[0, : len(q)].tolist() == q
        _, hidden = run_layers(teacher, ids, range(4), return_hidden=True)
        torch.testing.assert_close(cache.states[i, :n], hidden[4][0], rtol=1e-5, atol=1e-5)
        assert not cache.mask[i, n:].any() and (cache.states[i, n:] == 0).all()
    assert cache.layer == 3
    assert cache.memory_bytes() == cache.states.numel() * 4 + cache.mask.numel() + cache.input_ids.numel() * 8


def test_pad_states_rebuilds_the_cache_from_its_rows(cache):
    lengths = cache.mask.sum(1).tolist()
    rows = [cache.states[i, :n] for i, n in enumerate(lengths)]
    states, mask = pad_states(rows)
    assert torch.equal(states, cache.states) and torch.equal(mask, cache.mask) and mask.dtype == torch.bool
    states, mask = pad_states(rows[::-1])  # the longest row anywhere; real tokens first, True where real
    assert mask.sum(1).tolist() == lengths[::-1] and mask[:, 0].all()
    assert torch.equal(states[0, : lengths[-1]], rows[-1]) and (states[~mask] == 0).all()
    assert pad_states([torch.ones(2, 3, dtype=torch.bfloat16)])[0].dtype == torch.bfloat16


def test_other_layer_and_bad_layer(small):
    teacher, tok = small
    c = build_knowledge_cache(teacher, tok, ITEMS[:1], layer=1, answer_tokens=4, progress=False)
    n = int(c.mask[0].sum())
    _, hidden = run_layers(teacher, c.input_ids[:1, :n], range(4), return_hidden=True)
    torch.testing.assert_close(c.states[0, :n], hidden[2][0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer=4 is not a decoder layer of this teacher; allowed: 0..3"):
        build_knowledge_cache(teacher, tok, ITEMS, layer=4, progress=False)


def test_save_load_round_trip(small, cache, tmp_path):
    teacher, _ = small
    cache.save(tmp_path / "c")
    back = load_knowledge_cache(tmp_path / "c", teacher=teacher)
    for name in ("states", "mask", "input_ids"):
        assert torch.equal(getattr(back, name), getattr(cache, name))
    assert back.items == cache.items and back.fingerprint == cache.fingerprint
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["format_version"] == 1


def test_mismatches_are_refused(small, cache, tmp_path):
    cache.save(tmp_path / "c")
    other = tiny_qwen3(vocab=small[0].config.vocab_size, hidden=32, layers=4, seed=21)  # `small` is seed 12
    with pytest.raises(KnowledgeCacheError, match="same shapes, different weights.*Rebuild it for this teacher"):
        load_knowledge_cache(tmp_path / "c", teacher=other)
    wider = tiny_qwen3(vocab=small[0].config.vocab_size, hidden=64, layers=4, seed=12)
    with pytest.raises(KnowledgeCacheError, match="hidden size 32 vs 64"):
        load_knowledge_cache(tmp_path / "c", teacher=wider)


def test_missing_and_corrupt_files(cache, tmp_path):
    with pytest.raises(KnowledgeCacheError, match="no knowledge cache at"):
        load_knowledge_cache(tmp_path / "nothing")
    cache.save(tmp_path / "c")
    (tmp_path / "c" / "cache.safetensors").write_bytes(b"garbage")
    with pytest.raises(KnowledgeCacheError, match="is corrupt"):
        load_knowledge_cache(tmp_path / "c")
    cache.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "cache.json").read_text())
    meta["hidden_size"] = 99
    (tmp_path / "d" / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(KnowledgeCacheError, match="disagrees with its metadata"):
        load_knowledge_cache(tmp_path / "d")


def test_fingerprint_ignores_dtype():
    m = tiny_qwen3(layers=2, seed=13)
    fp = teacher_fingerprint(m)
    assert teacher_fingerprint(m.to(torch.bfloat16)) == fp
    assert teacher_fingerprint(tiny_qwen3(layers=2, seed=14)) != fp


def test_builtin_items_are_complete_and_kept_apart():
    for name in ("knowledge_tiny.yaml", "knowledge_qwen3.yaml"):
        items = load_items(paths.DATA_DIR / name)
        assert 12 <= len(items) <= 20
        for it in items:
            assert 2 <= len(it["eval_paraphrases"]) <= 3 and it["reference_answer"]
            trained = {it["question"], *it["train_paraphrases"]}
            assert not trained & set(it["eval_paraphrases"]), it["id"]
    qwen = load_items(paths.DATA_DIR / "knowledge_qwen3.yaml")
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in p) for it in qwen for p in it["eval_paraphrases"])


def test_item_file_validation(tmp_path):
    p = tmp_path / "items.yaml"
    p.write_text("items:\n  - id: x\n    question: q\n    answer_hint: oops\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_items(p)
    p.write_text("items:\n  - id: x\n    question: q\n  - id: x\n    question: r\n")
    with pytest.raises(ValueError, match="duplicate item id 'x'"):
        load_items(p)
    with pytest.raises(FileNotFoundError):
        load_items(tmp_path / "none.yaml")


def test_nearest_items_finds_the_item_itself(small, cache):
    teacher, tok = small
    best = nearest_items(cache, teacher, tok, ITEMS[2]["question"] + cache.items[2]["answer"], k=3)
    assert best[0][0] == "c" and len(best) == 3


# ----------------------------------------------------------------------------- the draft's knowledge path


def test_fused_draft_equals_plain_draft_at_init_and_detached(small, cache):
    teacher, _ = small
    plain = build_draft(teacher, [0, 3])
    fused = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True})
    x = torch.randint(2, 500, (2, 10))
    ref = plain(input_ids=x).logits
    torch.testing.assert_close(fused(input_ids=x).logits, ref, rtol=0, atol=0)  # nothing attached
    fused.set_knowledge(cache)
    torch.testing.assert_close(fused(input_ids=x).logits, ref, rtol=0, atol=0)  # attached, gate closed
    fused.set_knowledge(None)
    assert fused.knowledge is None


def test_fusion_parameters_move_after_one_step(small, cache):
    teacher, _ = small
    draft = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True}).train()
    draft.set_knowledge(cache)
    before = {n: p.detach().clone() for n, p in draft.named_parameters() if n.startswith("fusion.")}
    opt = torch.optim.AdamW([p for n, p in draft.named_parameters() if n.startswith("fusion.")], lr=1e-2)
    x = cache.input_ids[:2, :8]
    loss = torch.nn.functional.cross_entropy(draft(input_ids=x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    moved = [n for n, p in draft.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(n.endswith(".gate") for n in moved)
    # with the gate open, the cache now changes the output
    draft.eval()
    with_cache = draft(input_ids=x).logits
    draft.set_knowledge(None)
    assert not torch.allclose(with_cache, draft(input_ids=x).logits)


def test_kv_cached_generation_equals_uncached_with_fusion(small, cache):
    teacher, _ = small
    draft = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "fusion_gate": "scalar"})
    with torch.no_grad():
        for f in draft.fusion.values():
            f.gate.fill_(1.0)
    draft.set_knowledge(cache)
    x = torch.randint(2, 500, (1, 6))
    out = draft.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=1)
    seq = x
    for _ in range(10):
        seq = torch.cat([seq, draft(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq[:, : out.shape[1]])


def test_set_knowledge_refuses_mismatches(small, cache):
    teacher, _ = small
    plain = build_draft(teacher, [0, 3])
    with pytest.raises(ValueError, match="knowledge_enhancement.enabled=False"):
        plain.set_knowledge(cache)
    other = tiny_qwen3(vocab=teacher.config.vocab_size, hidden=32, layers=4, seed=15)
    foreign = build_draft(other, [0, 3], knowledge_enhancement={"enabled": True})
    with pytest.raises(ValueError, match="rebuild it with `qd build-cache`"):
        foreign.set_knowledge(cache)
    wide = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "memory_size": 48})
    with pytest.raises(ValueError, match="width 32, this draft expects 48"):
        wide.set_knowledge(cache)


def test_memory_projected_once_per_cache(small, cache, monkeypatch):
    teacher, _ = small
    draft = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True})
    draft.set_knowledge(cache)
    calls = []
    for f in draft.fusion.values():
        orig = f.attn.project_memory
        monkeypatch.setattr(f.attn, "project_memory", lambda *a, _o=orig: calls.append(1) or _o(*a))
    x = torch.randint(2, 500, (1, 5))
    with torch.no_grad():
        draft.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert len(calls) == len(draft.fusion)  # once per fusion layer, not once per token


def test_a_slightly_open_gate_lets_the_cross_attention_learn_from_the_first_step(small, cache):
    """gate_init 0 (the default) keeps the identity at initialisation; 0.1 trades it for gradient everywhere."""
    from qdlib.settings.distill import knowledge_block

    teacher, _ = small
    x = torch.randint(2, teacher.config.vocab_size, (1, 12))
    plain = build_draft(teacher, [0, 3])
    closed = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True}).set_knowledge(cache)
    torch.testing.assert_close(closed(input_ids=x).logits, plain(input_ids=x).logits, rtol=0, atol=0)
    opened = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "gate_init": 0.1})
    opened.set_knowledge(cache)
    assert all(torch.allclose(torch.tanh(f.gate), torch.tensor(0.1)) for f in opened.fusion.values())
    out = opened(input_ids=x).logits
    assert not torch.allclose(out, plain(input_ids=x).logits)
    out.logsumexp(-1).sum().backward()
    attn_grads = [p.grad for n, p in opened.named_parameters() if n.startswith("fusion.") and ".attn." in n]
    assert attn_grads and all(g is not None and g.abs().sum() > 0 for g in attn_grads)
    with pytest.raises(ValueError, match="gate_init=1.0 is out of range"):
        knowledge_block({"enabled": True, "gate_init": 1.0}, 64, 6)


def test_a_cache_built_now_is_the_committed_reference_drafts(tiny):
    """The answers come in batches (left-padded): the bundled teacher's fifteen items give the very cache the
    reference draft was trained with, one question at a time."""
    from qdlib.knowledge import load_knowledge_cache

    teacher, tok = tiny
    committed = load_knowledge_cache(paths.DRAFT_DIR / "knowledge_cache", teacher)
    built = build_knowledge_cache(teacher, tok, progress=False)
    assert [it["answer"] for it in built.items] == [it["answer"] for it in committed.items]
    assert torch.equal(built.input_ids, committed.input_ids) and torch.equal(built.mask, committed.mask)
    assert torch.equal(built.states, committed.states)
