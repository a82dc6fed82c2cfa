"""qd tour: the whole story end to end, with the reference draft and with a teacher that has none."""

import pytest
import torch

from qdlib import paths
from qdlib.cli import main

from helpers import tiny_qwen3


@pytest.fixture()
def other_teacher(tmp_path, monkeypatch):
    """A random 28-layer Qwen3 saved with the bundled tokenizer: a teacher with no reference draft."""
    from transformers import AutoTokenizer

    model = tiny_qwen3(vocab=8192, hidden=64, seed=21)
    model.config.max_position_embeddings = 512
    folder = tmp_path / "other-teacher"
    model.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(paths.TEACHER_DIR)
    tok.save_pretrained(folder)
    monkeypatch.setenv("QD_MODEL", str(folder))
    return folder


@pytest.mark.slow
def test_tour_without_a_reference_draft_says_so_and_still_decodes(other_teacher, capsys):
    assert main(["tour"]) == 0
    out = capsys.readouterr().out
    assert "no reference draft exists for the teacher" in out
    for step in ("1. The teacher", "2. Layer sampling", "3. The draft", "4. Speculative decoding", "6. A short benchmark"):
        assert step in out
    assert "[0, 5, 11, 16, 22, 27]" in out
    assert "identical to the teacher's own greedy output: True" in out
    assert "transformers assisted, matched settings" in out and "tour finished" in out
    assert "qd bench --code path/to/your/project" in out  # the learner is told how to measure their own code


@pytest.mark.slow
def test_tour_with_the_reference_draft(capsys):
    torch.manual_seed(0)
    assert main(["tour", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "the course's reference draft" in out and "knowledge cache:" in out and "nearest cached item" in out
    assert "identical to the teacher's own greedy output: True" in out
    step5 = out[out.index("5. A draft that reads the teacher"):out.index("6. A short benchmark")]
    assert step5.count("identical to the teacher's own greedy output: True") == 2  # both drafts, unfamiliar code
    bench = out[out.index("6. A short benchmark"):]
    assert "fast draft" in bench and "unfamiliar" in bench and "generate_plain" in bench


def test_tour_with_a_teacher_that_cannot_load_ends_in_one_line(tmp_path, capsys):
    """The quick tier's tour test: step 1 fails, the tour says why in one line and stops with exit code 2."""
    from qdlib.tour import tour

    assert tour(str(tmp_path / "nowhere")) == 2
    out = capsys.readouterr()
    assert out.err == f"error: {tmp_path / 'nowhere'} is not a model folder (no config.json there)\n"
    assert "1. The teacher" in out.out and "2. Layer sampling" not in out.out
