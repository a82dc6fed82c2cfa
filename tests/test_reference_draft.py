"""The committed reference draft: the agreement bar, `load_draft`, and that it works wherever a draft is expected."""

import json

import pytest
import torch

from qdlib import paths
from qdlib.draft_files import DraftLoadError, load_draft
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
def test_the_stated_agreement_on_unfamiliar_code_is_what_the_weights_give(tiny, draft, card):
    """The README's unfamiliar-code agreement of the reference draft (0.730, third-party sources no training used),
    recomputed from the weights on the prompts of the committed `qd bench` run it comes from (the card predates it)."""
    from qdlib.bench import teacher_forced_alpha
    from qdlib.distill_data import continue_greedy
    from qdlib.heldout_code import heldout_code_prompts

    report = json.loads((paths.BENCH_FAST_DIR / "report.json").read_text())
    cfg, stated = report["config"], report["alpha"]["unfamiliar"]
    teacher, tok = tiny
    prompts = heldout_code_prompts(tok, cfg["n_prompts"], cfg["prompt_tokens"], seed=cfg["seed"])
    seqs = continue_greedy(teacher, torch.tensor(prompts), cfg["max_new_tokens"])  # the teacher's greedy references
    got = teacher_forced_alpha(teacher, draft, seqs.tolist(), [len(p) for p in prompts])
    assert got["positions"] == stated["positions"] == 768
    assert got["agreement"] == pytest.approx(stated["agreement"], abs=1.5 / 768)  # within one position of 768
    assert got["agreement"] < AGREEMENT_BAR <= card["agreement"]  # below the bar the standard library meets
    assert f"{stated['agreement']:.3f}" in (paths.REPO_DIR / "README.md").read_text(encoding="utf-8")


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
