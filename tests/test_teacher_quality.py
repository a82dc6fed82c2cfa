"""Quality bars of the committed bundled teacher (issue: bits per byte and greedy repetition)."""

import json

import pytest

from qdlib import paths
from qdlib.corpus import (bits_per_byte, greedy_repetition, heldout_files, heldout_prompts, read_source,
                          repeated_ngram_share)

BPB_BAR = 1.40
REPETITION_BAR = 0.50


@pytest.fixture(scope="module")
def heldout():
    manifest = json.loads((paths.TEACHER_DIR / "manifest.json").read_text())
    good, problems = heldout_files(manifest)
    if problems:
        pytest.skip(f"this interpreter's standard library differs from the manifest's: {problems[:3]} ...")
    return [read_source(p) for p in good]


@pytest.fixture(scope="module")
def repetition(tiny, heldout):
    """Greedy repetition of the committed teacher on 50 held-out prompts (computed once)."""
    model, tok = tiny
    return greedy_repetition(model, heldout_prompts(tok, heldout))


def test_manifest_is_complete_and_split_by_file():
    manifest = json.loads((paths.TEACHER_DIR / "manifest.json").read_text())
    rows = manifest["files"]
    assert {r[0] for r in rows} == {"stdlib", "torch", "transformers"}
    val = [r for r in rows if r[2] == "val"]
    assert val and all(r[0] == "stdlib" for r in val)
    assert all(len(r[4]) == 64 and r[3] >= 0 for r in rows)  # sha256 and size (empty __init__.py files exist)
    assert not any("/test/" in "/" + r[1] or r[1].startswith("idlelib/") for r in rows if r[0] == "stdlib")
    names = [(r[0], r[1]) for r in rows]
    assert len(names) == len(set(names))


@pytest.mark.slow
def test_bits_per_byte_bar(tiny, heldout):
    model, tok = tiny
    res = bits_per_byte(model, tok, heldout)
    card = json.loads((paths.TEACHER_DIR / "metrics.json").read_text())
    assert res["bpb"] <= BPB_BAR, f"held-out bits per byte {res['bpb']:.3f} > {BPB_BAR}"
    assert res["bpb"] == pytest.approx(card["heldout_bits_per_byte"], abs=2e-3), "model card disagrees with the weights"


@pytest.mark.slow
def test_greedy_repetition_bar(repetition):
    assert repetition["mean"] <= REPETITION_BAR, f"repeated 4-gram share {repetition['mean']:.3f} > {REPETITION_BAR}"


def test_repeated_ngram_share_examples():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngram_share([7] * 10) == pytest.approx(6 / 7)
    assert repeated_ngram_share([1, 2, 3]) == 0.0


def test_bits_per_byte_counts_every_token_once(tiny):
    model, tok = tiny
    text = "import os\n" * 300
    n_tok = len(tok(text, add_special_tokens=False)["input_ids"])
    res = bits_per_byte(model, tok, [text], context=64, stride=32)
    assert res["tokens"] == n_tok  # each text token predicted exactly once (the leading <eos> is context)
    assert res["bytes"] == len(text.encode())


@pytest.mark.slow
def test_model_card_repetition_figure_is_reproduced(repetition):
    card = json.loads((paths.TEACHER_DIR / "metrics.json").read_text())
    assert len(repetition["per_prompt"]) >= 50
    assert repetition["mean"] == pytest.approx(sum(repetition["per_prompt"]) / len(repetition["per_prompt"]))
    assert repetition["mean"] == pytest.approx(card["greedy_repeated_4gram_share"], abs=0.02), \
        "model card disagrees with the weights"


def test_loss_by_position_windows_agree_within_the_short_length():
    """Before the short length both columns see the same tokens; beyond it only the whole window sees more."""
    import torch

    from qdlib.corpus import loss_by_position
    from helpers import tiny_qwen3

    class Tok:  # a tokenizer of one id per character
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [2 + ord(c) % 250 for c in text]}

    model = tiny_qwen3(layers=2, seed=4)
    rows = loss_by_position(model, Tok(), ["abcdefgh" * 40, "x"], context=128, short=32, bucket=16)
    assert [(r["start"], r["end"]) for r in rows][:3] == [(0, 16), (16, 32), (32, 48)] and rows[-1]["end"] == 127
    assert rows[0]["nats"] == pytest.approx(rows[0]["nats_short"], abs=1e-6)  # the first short - 1 predictions
    assert all(r["tokens"] == 16 for r in rows[:-1])  # one window: the short text is skipped
    with pytest.raises(ValueError, match="no text has 512 tokens"):
        loss_by_position(model, Tok(), ["short"], context=512)
    assert torch.is_grad_enabled()


@pytest.mark.slow
def test_teacher_card_context_section_is_reproduced(tiny, heldout):
    from qdlib.corpus import loss_by_position

    model, tok = tiny
    metrics = json.loads((paths.TEACHER_DIR / "metrics.json").read_text())
    rows = loss_by_position(model, tok, heldout, context=model.config.max_position_embeddings, short=256)
    for got, card in zip(rows, metrics["context_loss"], strict=True):
        assert got["nats"] == pytest.approx(card["nats"], abs=2e-3)
        assert got["nats_short"] == pytest.approx(card["nats_short"], abs=2e-3)
    assert "## Context length" in (paths.TEACHER_DIR / "README.md").read_text()
