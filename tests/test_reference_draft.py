"""The committed reference draft: the agreement bar, `load_draft`, and that it works wherever a draft is expected."""

import json

import pytest
import torch

from qdlib import paths
from qdlib.draft import DraftLoadError, load_draft
from qdlib.trainer import EVAL_SEED_TEST, eval_sets, evaluate_draft

AGREEMENT_BAR = 0.80


@pytest.fixture(scope="module")
def draft():
    return load_draft()


@pytest.fixture(scope="module")
def card():
    return json.loads((paths.DRAFT_DIR / "metrics.json").read_text())


def test_load_draft_gives_an_eval_float32_draft_with_its_cache(draft):
    assert not draft.training and draft.dtype == torch.float32 and draft.device.type == "cpu"
    assert draft.knowledge is not None and draft.config.kept_layers == [0, 5, 11, 16, 22, 27]
    assert draft.knowledge.fingerprint == draft.config.teacher_fingerprint


@pytest.fixture(scope="module")
def recomputed_agreement(tiny, draft):
    """Top-1 agreement with the teacher's greedy continuations of the 50 test prompts, recomputed from the weights."""
    teacher, tok = tiny
    sets = eval_sets(teacher, tok, n_prompts=50, seed=EVAL_SEED_TEST)
    assert sets["heldout"].ids.shape[0] == 50
    return evaluate_draft(teacher, draft, {"heldout": sets["heldout"]}, draft.knowledge)["heldout"]["agreement"]


@pytest.mark.slow
def test_card_agrees_with_the_weights(recomputed_agreement, card):
    assert recomputed_agreement == pytest.approx(card["agreement"], abs=1e-3), "the card disagrees with the weights"


@pytest.mark.slow
def test_agreement_bar_on_50_test_prompts(recomputed_agreement):
    assert recomputed_agreement >= AGREEMENT_BAR, f"reference draft agreement {recomputed_agreement:.3f} < {AGREEMENT_BAR}"


@pytest.mark.slow
def test_card_states_the_agreement_on_unfamiliar_code_the_weights_give(tiny, draft, card):
    """The card's unfamiliar-code figure (third-party sources no training used), recomputed from the weights."""
    from qdlib.distill_data import unfamiliar_eval_set

    if "unfamiliar" not in card["test"]:
        pytest.skip("the committed card was exported before `export_draft` measured unfamiliar code; the next "
                    "export of the reference draft adds it")
    teacher, tok = tiny
    got = evaluate_draft(teacher, draft, {"unfamiliar": unfamiliar_eval_set(teacher, tok)}, draft.knowledge)
    assert got["unfamiliar"]["agreement"] == pytest.approx(card["test"]["unfamiliar"]["agreement"], abs=1e-3)


@pytest.mark.slow
def test_the_draft_works_as_a_causal_lm_and_as_an_assistant(tiny, draft):
    from qdlib import speculative_generate

    teacher, tok = tiny
    ids = tok('def read_lines(path):\n    """Return the lines of a file."""\n', return_tensors="pt").input_ids
    assert draft(input_ids=ids).logits.shape == (1, ids.shape[1], teacher.config.vocab_size)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id, attention_mask=torch.ones_like(ids))
    plain = teacher.generate(ids, **kw)
    assert draft.generate(ids, **kw).shape == plain.shape
    assisted = teacher.generate(ids, assistant_model=draft, **kw)
    out, stats = speculative_generate(teacher, draft, ids, max_new_tokens=24)
    assert torch.equal(assisted, plain) and torch.equal(out, plain)
    assert stats.accepted > 0


def test_ablation_has_the_same_budget(card):
    abl = json.loads((paths.DRAFT_NOKNOW_DIR / "metrics.json").read_text())
    assert not abl["knowledge"] and card["knowledge"]
    assert abl["steps"] == card["steps"] and abl["tokens_seen"] == pytest.approx(card["tokens_seen"], rel=0.1)
    assert {"heldout", "paraphrase", "text"} <= set(abl["test"])


def test_no_reference_draft_for_another_teacher(monkeypatch, tmp_path):
    monkeypatch.setenv("QD_MODEL", "Qwen/Qwen3-0.6B")
    with pytest.raises(DraftLoadError, match="no reference draft exists for the teacher 'Qwen/Qwen3-0.6B'"):
        load_draft()
    with pytest.raises(DraftLoadError, match="not a draft folder"):
        load_draft(tmp_path)
