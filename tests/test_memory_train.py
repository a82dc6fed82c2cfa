"""Retrieval training of the fusion blocks: its memories, what it freezes, resuming, and the lookup ceiling."""

import json

import pytest
import torch

from qdlib import build_draft, paths
from qdlib.errors import ConfigError
from qdlib.memory import code_items
from qdlib.memory_train import (RetrievalConfig, copy_bound, freeze_all_but_fusion, load_fusion, retrieval_data,
                                step_memory, sub_cache, train_retrieval)


KNOWLEDGE = {"enabled": True, "cache_dim": 32, "num_heads": 1}


@pytest.fixture(scope="module")
def small_data(small, tmp_path_factory):
    teacher, tok = small
    cfg = RetrievalConfig(items=12, val_items=4, memory_items=5, batch_items=2, steps=4, eval_every=2,
                          answer_tokens=6, new_tokens=6)
    run = tmp_path_factory.mktemp("retrieval")
    held_out = {it["id"].split("::")[1] for it in code_items(6)}
    return cfg, retrieval_data(teacher, tok, cfg, run, exclude=held_out), run, held_out


@pytest.mark.parametrize("bad, match", [({"val_items": 0}, "val_items=0"), ({"memory_items": 2}, "memory_items=2"),
                                        ({"memory_items": 37}, "memory_items=37"),
                                        ({"swapped_share": 1.0}, "swapped_share=1.0"), ({"gate_init": 1.0}, "gate_init=1.0")])
def test_settings_that_cannot_work_are_refused_by_name(bad, match):
    RetrievalConfig(items=40, val_items=4, memory_items=6, batch_items=2)
    with pytest.raises(ConfigError, match=match):
        RetrievalConfig(**{"items": 40, "val_items": 4, "memory_items": 6, "batch_items": 2, **bad})


def test_each_step_holds_its_batch_in_memory_unless_the_memory_is_swapped():
    cfg = RetrievalConfig(items=60, val_items=10, memory_items=12, batch_items=4, swapped_share=0.3)
    train = list(range(50))
    swaps = 0
    for step in range(300):
        batch, memory, swapped = step_memory(step, train, cfg)
        assert (batch, memory, swapped) == step_memory(step, train, cfg)  # deterministic: a resumed run sees the same
        assert len(set(batch)) == 4 and len(set(memory)) == 12 and set(batch + memory) <= set(train)
        assert set(batch) & set(memory) == (set() if swapped else set(batch))
        swaps += swapped
    assert 0.2 < swaps / 300 < 0.4


@pytest.mark.slow  # builds the items' data (14 s)
def test_training_rows_are_about_training_items_and_never_the_held_out_ones(small_data):
    cfg, data, _, held_out = small_data
    cache = data["cache"]
    names = [it["id"].split("::")[1] for it in cache.items]
    assert cache.num_items == cfg.items and not set(names) & held_out
    assert all(it["id"].split("::")[0] not in {h["id"].split("::")[0] for h in code_items(6)} for it in cache.items)
    assert sorted(data["row_item"].tolist()) == sorted(list(range(cfg.items)) * 3)  # two paraphrases and the question
    assert (data["kind"] == 1).sum() == cfg.items and data["mask"].any(1).all()
    part = sub_cache(cache, [3, 1])
    assert torch.equal(part.states, cache.states[[3, 1]]) and part.items == [cache.items[3], cache.items[1]]


def test_only_the_fusion_learns_and_the_detached_draft_is_the_distilled_one(small):
    teacher, tok = small
    draft = build_draft(teacher, [0, 3], knowledge_enhancement=KNOWLEDGE)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        before = draft(input_ids=ids, use_cache=False).logits
    params = freeze_all_but_fusion(draft, 0.2)
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fusion.") for n in trainable) and len(params) == len(trainable)
    assert all(torch.allclose(torch.tanh(b.gate), torch.tensor(0.2)) for b in draft.fusion.values())
    with torch.no_grad():
        assert torch.equal(draft(input_ids=ids, use_cache=False).logits, before)  # no cache attached
    with pytest.raises(ConfigError, match="knowledge path"):
        freeze_all_but_fusion(build_draft(teacher, [0, 3]), 0.1)


def test_the_best_record_and_its_fusion_weights(small, small_data, tmp_path):
    """Resume, the NaN guard and the best checkpoint are tested for every recipe in test_train_loop.py."""
    teacher, _ = small
    cfg, data, _, _ = small_data
    torch.manual_seed(0)
    draft = build_draft(teacher, [0, 3], knowledge_enhancement=KNOWLEDGE)
    best = train_retrieval(teacher, draft, data, cfg, tmp_path / "a", log=lambda s: None)
    assert draft.knowledge is None  # detached after training
    assert {"step", "val_own", "val_detached", "val_swapped", "val_question_own", "largest_gate"} <= set(best)
    assert json.loads((tmp_path / "a" / "best" / "record.json").read_text()) == best
    fresh = build_draft(teacher, [0, 3], knowledge_enhancement=KNOWLEDGE)
    assert load_fusion(fresh, tmp_path / "a" / "best" / "fusion.pt") == best
    with pytest.raises(ConfigError, match="other settings"):
        train_retrieval(teacher, draft, data, RetrievalConfig(**{**vars(cfg), "learning_rate": 1.0}),
                        tmp_path / "a", log=lambda s: None)


def test_the_copy_ceiling_counts_only_what_the_draft_misses():
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0]]).bool()  # predictions of tokens 4..6: 5, 6, 9
    memory = [[[6, 5, 6, 9]]]  # "8": no match; "5" -> 6 (right); "5 6" -> 9 (right)
    nothing_right = torch.zeros(1, 7, dtype=torch.bool)
    assert copy_bound(ids, mask, memory, nothing_right) == {"copy": 0.6667, "copy_only": 0.6667, "positions": 3}
    right_at_5 = nothing_right.clone()
    right_at_5[0, 5] = True  # the draft already predicts the 9
    assert copy_bound(ids, mask, memory, right_at_5)["copy_only"] == 0.3333
    assert copy_bound(ids, mask, [[[1, 2]]], nothing_right)["copy"] == 0.0


def test_a_similarity_lookup_starts_with_queries_and_keys_alike(small):
    from qdlib.memory_train import similarity_init

    teacher, _ = small
    draft = build_draft(teacher, [0, 3], knowledge_enhancement=KNOWLEDGE)
    similarity_init(draft, scale=2.0)
    for block in draft.fusion.values():
        a = block.attn
        assert torch.equal(a.q_proj.weight, a.k_proj.weight) and torch.equal(a.v_proj.weight, a.q_proj.weight)
        W = a.o_proj.weight  # (D, C): orthonormal columns, so v then o projects onto a C-dimensional subspace
        torch.testing.assert_close(W.T @ W, torch.eye(W.shape[1]), atol=1e-5, rtol=0)
        assert torch.equal(a.q_norm.weight, torch.full_like(a.q_norm.weight, 2.0))
    with pytest.raises(ConfigError, match="fusion_init='nearest'"):
        RetrievalConfig(fusion_init="nearest")


@pytest.mark.slow
def test_committed_retrieval_result_is_reproduced_from_its_weights(tiny, tmp_path):
    from qdlib import load_draft
    from qdlib.memory_train import measure_trained

    teacher, tok = tiny
    folder = paths.OUTPUTS_DIR / "memory_protocol"
    committed = json.loads((folder / "retrieval_keep.json").read_text())
    trained = load_draft()
    load_fusion(trained, folder / "retrieval_keep_fusion.safetensors")
    got = measure_trained(tmp_path / "r.json", trained, load_draft(), teacher, tok, **{
        k: committed["config"][k] for k in ("n_items", "new_tokens", "seed")})
    assert got["item_ids"] == committed["item_ids"]
    for kind in ("paraphrase", "question"):
        assert got[kind]["copy_bound"] == committed[kind]["copy_bound"]
        for name in ("reference", "retrieval"):
            for arm in ("own", "detached", "swapped", "shuffled"):
                assert got[kind][name][arm] == pytest.approx(committed[kind][name][arm], abs=0.003), (kind, name, arm)
    assert got["largest_gate"]["retrieval"] == pytest.approx(committed["largest_gate"]["retrieval"], rel=1e-3)
    # what the course says of it: the memory is read, but not for what it holds
    para = committed["paraphrase"]["retrieval"]["gain"]
    assert committed["paraphrase"]["copy_bound"]["own"]["copy_only"] < 0.05  # the ceiling is below the bar
    assert abs(para["own"] - para["swapped"]) < 0.02


def test_committed_memory_bench_is_lossless_and_its_tables_come_from_its_json():
    from qdlib.report import load_report, report_markdown

    folder = paths.OUTPUTS_DIR / "memory_protocol" / "bench_keep"
    report = load_report(folder)
    committed = json.loads((paths.OUTPUTS_DIR / "memory_protocol" / "retrieval_keep.json").read_text())
    rows = {r["method"]: r for r in report["rows"] if r["mode"] == "greedy" and r["kind"] == "paraphrase"}
    assert set(rows) == {"teacher_generate", "teacher_plain", "spec", "spec_no_cache"}
    assert all(r["identical"] == r["prompts"] == 2 * committed["config"]["n_items"] for r in rows.values())
    assert (folder / "report.md").read_text() == report_markdown(report)
    assert report["draft"]["memory_items"] == committed["item_ids"][: committed["config"]["n_items"]]
    assert report["draft"]["fusion"].endswith("retrieval_keep_fusion.safetensors")
