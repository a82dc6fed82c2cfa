"""The three-arm memory protocol: unseen items, swapped and shuffled memories, and what a closed gate reads."""

import pytest
import torch

from qdlib import build_draft, build_knowledge_cache, paths
from qdlib.corpus import corpus_files
from qdlib.memory import code_items, derangement, memory_arms, shuffled_memory


def test_code_items_come_from_held_out_files_and_say_the_same_thing_twice():
    items = code_items(12)
    assert items == code_items(12) and items != code_items(12, seed=1)  # deterministic, seeded
    val = {f.relpath for f in corpus_files("stdlib") if f.split == "val"}
    assert all(it["id"].split("::")[0] in val for it in items)  # never a file anything trained on
    assert len({it["id"].split("::")[1] for it in items}) == 12 and len({it["id"].split("::")[0] for it in items}) > 6
    for it in items:
        doc = it["question"].split('"""')[1]
        assert all(doc in p and p != it["question"] for p in it["eval_paraphrases"]) and not it["train_paraphrases"]
    with pytest.raises(ValueError, match="hold only"):
        code_items(100_000)


def test_shuffled_memory_pairs_each_question_with_another_items_answer(small):
    teacher, tok = small
    cache = build_knowledge_cache(teacher, tok, code_items(4), answer_tokens=6, progress=False)
    perm = derangement(4, seed=3)
    shuf = shuffled_memory(teacher, tok, cache, perm)
    for i, j in enumerate(perm):
        qi, qj, nj = cache.question_lengths[i], cache.question_lengths[j], int(cache.mask[j].sum())
        n = qi + nj - qj
        assert shuf.question_lengths[i] == qi and int(shuf.mask[i].sum()) == n
        assert torch.equal(shuf.input_ids[i, :qi], cache.input_ids[i, :qi])  # item i's question ...
        assert torch.equal(shuf.input_ids[i, qi:n], cache.input_ids[j, qj:nj])  # ... then item j's answer tokens
        torch.testing.assert_close(shuf.states[i, :qi], cache.states[i, :qi])  # causal: the question reads the same
        # the answer was read again after the wrong question, so its states are not item j's stored ones
        assert not torch.allclose(shuf.states[i, qi:n], cache.states[j, qj:nj], atol=1e-3)
        assert shuf.items[i]["shuffled_answer_of"] == cache.items[j]["id"]
    with pytest.raises(ValueError, match="permutation"):
        shuffled_memory(teacher, tok, cache, [0, 0, 1, 2])
    with pytest.raises(ValueError, match="3 given for 4 items"):
        build_knowledge_cache(teacher, tok, code_items(4), answers=["a", "b", "c"], progress=False)


def test_a_closed_gate_reads_nothing_and_an_open_one_does(small):
    teacher, tok = small
    items = code_items(6)
    closed = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "cache_dim": 32, "num_heads": 1})
    r = memory_arms(teacher, tok, closed, items[:3], items[3:], new_tokens=8, answer_tokens=6)
    assert set(r) == {"own", "detached", "swapped", "shuffled", "gain", "kl", "items", "positions"} and r["positions"] > 0
    assert r["gain"] == {"own": 0.0, "swapped": 0.0, "shuffled": 0.0}  # tanh(0) = 0: the memory cannot matter
    assert len(set(r["kl"].values())) == 1
    torch.manual_seed(0)
    opened = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "cache_dim": 32, "num_heads": 1,
                                                                 "gate_init": 0.9})
    with torch.no_grad():
        for f in opened.fusion.values():
            f.attn.o_proj.weight.mul_(50)  # make what it reads loud enough to move the argmax
    r = memory_arms(teacher, tok, opened, items[:3], items[3:], new_tokens=8, answer_tokens=6)
    # every memory reads differently, and none like no memory at all (a random model may give every item the same
    # greedy answer, so the shuffled memory may read like the own one)
    kl = r["kl"]
    assert len({kl["own"], kl["detached"], kl["swapped"]}) == 3 and kl["shuffled"] != kl["detached"]
    with pytest.raises(ValueError, match="as many items"):
        memory_arms(teacher, tok, opened, items[:3], items[3:5])


def test_committed_protocol_result_is_the_reference_arms_the_retrieval_record_reproduces():
    """reference_draft.json (measure_reference on the reference draft) holds the same arms on the same items as the
    reference half of retrieval_keep.json, which test_memory_train re-measures from the weights; so one
    reproduction covers both records (the protocol is not run twice)."""
    import json

    folder = paths.OUTPUTS_DIR / "memory_protocol"
    committed = json.loads((folder / "reference_draft.json").read_text())
    retrieval = json.loads((folder / "retrieval_keep.json").read_text())
    ref = retrieval["paraphrase"]["reference"]
    assert committed["config"] == retrieval["config"] and committed["item_ids"] == retrieval["item_ids"]
    assert committed["positions"] == ref["positions"]
    for arm in ("own", "detached", "swapped", "shuffled"):
        assert committed[arm] == pytest.approx(ref[arm], abs=1e-9) and committed["kl"][arm] == pytest.approx(ref["kl"][arm], rel=1e-6)
    assert committed["largest_gate"] == pytest.approx(retrieval["largest_gate"]["reference"], rel=1e-3)


def test_measure_reference_writes_the_protocol_record(tiny, tmp_path):
    import json

    from qdlib.memory import measure_reference

    teacher, tok = tiny
    draft = build_draft(teacher, [0, 27], knowledge_enhancement={"enabled": True, "cache_dim": 32, "num_heads": 2,
                                                                 "gate_init": 0.5})
    got = measure_reference(tmp_path / "r.json", draft, teacher, tok, n_items=2, new_tokens=4)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(got))
    assert got["config"] == {"n_items": 2, "new_tokens": 4, "seed": 0, "split": "stdlib val"}
    assert got["item_ids"] == [it["id"] for it in code_items(4)] and got["positions"] > 0
    assert got["largest_gate"] == pytest.approx(0.5, rel=1e-4)  # an opened gate, read back from the draft
    assert all(0 <= got[arm] <= 1 for arm in ("own", "detached", "swapped", "shuffled"))


def test_arms_scored_together_equal_arms_scored_alone_from_one_teacher_pass(small):
    """score_arms: arms that share a draft (each with its own memory) and arms of another draft give exactly what
    each gives scored alone, the teacher runs once per chunk of rows for all of them, and every draft gets its own
    memory and training mode back."""
    from qdlib.distill_data import paraphrase_eval_set
    from qdlib.train.evaluate import evaluate_draft, score_arms

    teacher, tok = small
    items = code_items(6)
    own = build_knowledge_cache(teacher, tok, items[:3], answer_tokens=6, progress=False)
    other = build_knowledge_cache(teacher, tok, items[3:], answer_tokens=6, progress=False)
    es = paraphrase_eval_set(teacher, tok, items[:3], 8)
    torch.manual_seed(0)
    kb = {"enabled": True, "cache_dim": 32, "num_heads": 1, "gate_init": 0.9}
    a = build_draft(teacher, [0, 3], knowledge_enhancement=kb)
    b = build_draft(teacher, [0, 1, 3], knowledge_enhancement=kb)
    a.set_knowledge(other).train()
    arms = {"a_own": (a, own), "a_none": (a, None), "b_other": (b, other)}
    alone = {name: evaluate_draft(teacher, d, {"p": es}, m, detached=False)["p"] for name, (d, m) in arms.items()}
    calls, forward = [], type(teacher).forward

    def counted(self, *args, **kw):
        calls.append(1)
        return forward(self, *args, **kw)

    type(teacher).forward = counted
    try:
        together = score_arms(teacher, arms, {"p": es})
    finally:
        type(teacher).forward = forward
    assert {name: s["p"] for name, s in together.items()} == alone
    assert len({s["p"]["kl"] for s in together.values()}) == 3  # the memories do differ
    assert len(calls) == -(-len(es.ids) // 8)  # one teacher pass per chunk of 8 rows, for the three arms
    assert a.knowledge is other and a.training and b.knowledge is None and not b.training
