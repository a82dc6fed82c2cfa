import os

import pytest
import torch

from qdlib import TeacherLoadError, load_teacher, paths
from qdlib.models import default_teacher_name, resolve_device, resolve_dtype


def test_bundled_teacher_defaults(tiny):
    model, tok = tiny
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.num_hidden_layers == 28
    assert model.config.tie_word_embeddings
    assert len(tok) == model.config.vocab_size
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"


def test_qd_model_read_at_call_time(monkeypatch):
    monkeypatch.delenv("QD_MODEL", raising=False)
    assert default_teacher_name() == "tiny"
    monkeypatch.setenv("QD_MODEL", "some/model")
    assert default_teacher_name() == "some/model"
    monkeypatch.setenv("QD_MODEL", str(paths.TEACHER_DIR))
    model, _ = load_teacher()  # a folder given through the environment
    assert model.config.num_hidden_layers == 28
    model2, _ = load_teacher("tiny")  # "tiny" ignores QD_MODEL
    assert model2.config.num_hidden_layers == 28


def test_hub_id_without_network_gives_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherLoadError) as err:
        load_teacher("Qwen/Qwen3-0.6B")
    msg = str(err.value)
    assert "Qwen/Qwen3-0.6B" in msg
    assert "QD_MODEL=/path/to/Qwen3-0.6B" in msg  # how to point at a local folder
    assert "load_teacher('tiny')" in msg  # the bundled teacher works offline


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherLoadError, match="is not a model folder"):
        load_teacher(str(tmp_path / "nowhere"))


def test_device_and_dtype_choices():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))


def test_bf16_on_request():
    model, _ = load_teacher("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_random_init_qwen3_06b_config_loads(qwen3_06b_dir):
    """The real-model path, without weights: the exact Qwen3-0.6B config through load_teacher(path)."""
    model, tok = load_teacher(str(qwen3_06b_dir))
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (28, 1024, 16, 8, 128, 3072, 151936)
    assert c.tie_word_embeddings and c.rope_parameters["rope_theta"] == 1e6
    assert model.dtype == torch.float32 and not model.training
    n = sum(p.numel() for p in model.parameters())
    assert 590e6 < n < 600e6  # 596M with tied embeddings
    ids = tok("def f(x):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 151936)
