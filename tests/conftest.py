"""Test set-up shared by the unit tests and the notebooks (`pytest --nbval`).

- quiet, offline, deterministic environment (set before any notebook kernel starts,
  so kernels inherit it);
- stderr of notebook cells is not compared (guarded to .ipynb files);
- runs write to a temporary folder, never to tracked files.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("QD_RUNS", tempfile.mkdtemp(prefix="qd-test-runs-"))
os.environ.pop("QD_MODEL", None)  # the tests choose their teacher explicitly

import pytest  # noqa: E402


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)


@pytest.fixture(scope="session")
def tiny():
    """The bundled teacher and its tokenizer (float32, CPU)."""
    from qdlib import load_teacher

    return load_teacher("tiny")


@pytest.fixture(scope="session")
def qwen3_06b_dir(tmp_path_factory):
    """A randomly initialised model of the exact Qwen3-0.6B config, saved with a tokenizer.

    There are no real weights offline; this exercises the real-model code path
    (hub-style folder, Auto classes, 151,936-entry vocabulary). The tokenizer is
    the bundled teacher's (its ids are all valid Qwen3 ids).
    """
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from helpers import QWEN3_06B
    from qdlib import paths

    folder = tmp_path_factory.mktemp("qwen3-0.6b-random")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_06B))
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(paths.TEACHER_DIR).save_pretrained(folder)
    del model
    return folder


@pytest.fixture(scope="session")
def qwen3_06b(qwen3_06b_dir):
    """The random-init Qwen3-0.6B loaded through load_teacher (float32, CPU)."""
    from qdlib import load_teacher

    return load_teacher(str(qwen3_06b_dir))
