"""Fixtures shared by the unit tests (the environment and the notebook set-up are in the root ``conftest.py``)."""

import pytest


@pytest.fixture(scope="session")
def tiny():
    """The bundled teacher and its tokenizer (float32, CPU)."""
    from qdlib import load_teacher

    return load_teacher("tiny")


@pytest.fixture(scope="session")
def qwen3_06b_dir(tmp_path_factory):
    """A randomly initialised model of the Qwen3-0.6B config cut to 8 layers, saved with a tokenizer.

    There are no real weights offline; this exercises the real-model code path
    (hub-style folder, Auto classes, every width of Qwen3-0.6B, its 151,936-entry
    vocabulary) at 282M parameters instead of 596M (the exact 28-layer config is
    checked on the meta device in test_models.py). The tokenizer is the bundled
    teacher's (its ids are all valid Qwen3 ids).
    """
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from helpers import QWEN3_06B, QWEN3_06B_SHORT_LAYERS
    from qdlib import paths

    folder = tmp_path_factory.mktemp("qwen3-0.6b-random")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3ForCausalLM(Qwen3Config(**{**QWEN3_06B, "num_hidden_layers": QWEN3_06B_SHORT_LAYERS}))
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(paths.TEACHER_DIR).save_pretrained(folder)
    del model
    return folder


@pytest.fixture(scope="session")
def qwen3_06b(qwen3_06b_dir):
    """The random-init 8-layer Qwen3-0.6B loaded through load_teacher (float32, CPU)."""
    from qdlib import load_teacher

    return load_teacher(str(qwen3_06b_dir))


@pytest.fixture(scope="module")
def small():
    """A random 4-layer, 32-wide Qwen3 with the bundled teacher's vocabulary, and that tokenizer (each test module
    gets its own copy, so no module sees another's changes)."""
    from transformers import AutoTokenizer

    from helpers import tiny_qwen3
    from qdlib import paths

    tok = AutoTokenizer.from_pretrained(paths.TEACHER_DIR)
    return tiny_qwen3(vocab=len(tok), hidden=32, layers=4, seed=12), tok
