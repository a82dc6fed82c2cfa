
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


def test_device_and_dtype_choices(monkeypatch):
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    # "auto": cuda first, then mps, then cpu (availability faked, so each branch runs on any machine)
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda c=cuda: c)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda m=mps: m)
        assert resolve_device("auto") == torch.device(expected), (cuda, mps)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))


def test_bf16_on_request():
    model, _ = load_teacher("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_exact_qwen3_06b_config_on_the_meta_device(tmp_path):
    """The full 28-layer config, without allocating it: 596M parameters, a config.json that round-trips,
    and the course's 6-of-28 draft layers for it."""
    from transformers import AutoConfig, Qwen3Config, Qwen3ForCausalLM

    from helpers import QWEN3_06B
    from qdlib import sample_layers
    from qdlib.settings import DEFAULT_CONFIGS, load_config

    Qwen3Config(**QWEN3_06B).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert len(model.model.layers) == 28 and model.lm_head.weight is model.model.embed_tokens.weight
    n = sum(p.numel() for p in model.parameters())
    assert 595e6 < n < 597e6  # 596M with tied embeddings
    cfg = load_config(DEFAULT_CONFIGS["qwen3"], num_layers=28)
    assert sample_layers(28, cfg.draft_model.num_sampled_layers) == [0, 5, 11, 16, 22, 27]


@pytest.mark.slow
def test_random_init_qwen3_06b_widths_load(qwen3_06b):
    """The real-model path, without weights: every width of Qwen3-0.6B (8 of its layers) through load_teacher(path)."""
    from helpers import QWEN3_06B, QWEN3_06B_SHORT_LAYERS

    model, tok = qwen3_06b
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (QWEN3_06B_SHORT_LAYERS, 1024, 16, 8, 128, 3072, 151936)
    assert c.tie_word_embeddings and c.rope_parameters["rope_theta"] == 1e6
    assert model.dtype == torch.float32 and not model.training
    n = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    full = n + (QWEN3_06B["num_hidden_layers"] - QWEN3_06B_SHORT_LAYERS) * per_layer
    assert 595e6 < full < 597e6  # with all 28 layers: 596M, tied embeddings
    ids = tok("def f(x):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 151936)


@pytest.mark.slow
def test_qwen3_06b_draft_and_knowledge_path(qwen3_06b, tmp_path):
    """Layer sampling, the draft model and the knowledge cache on the random-init Qwen3-0.6B widths."""
    from qdlib import build_draft, build_knowledge_cache, sample_layers
    from qdlib.knowledge import builtin_items_path, load_items
    from qdlib.sampling import run_layers

    model, tok = qwen3_06b
    layers = sample_layers(model.config.num_hidden_layers, 6)
    draft = build_draft(model, layers, knowledge_enhancement={"enabled": True})
    kb = draft.config.knowledge_enhancement
    assert (kb["cache_dim"], kb["num_heads"]) == (512, 8)  # the course's sizes for Qwen3-0.6B
    ids = tok("def f(x):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(draft(input_ids=ids).logits, run_layers(model, ids, layers))
    assert builtin_items_path(model).name == "knowledge_qwen3.yaml"
    items = load_items(teacher=model)[:2]
    cache = build_knowledge_cache(model, tok, items, answer_tokens=3, progress=False)
    assert cache.states.shape[-1] == 1024
    draft.set_knowledge(cache)
    with torch.no_grad():
        torch.testing.assert_close(draft(input_ids=ids).logits, run_layers(model, ids, layers))  # gate closed
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assisted = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                  assistant_model=draft)
    assert torch.equal(plain, assisted)
    draft.save_pretrained(tmp_path / "d")
    from qdlib import DraftForCausalLM

    back = DraftForCausalLM.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, draft.set_knowledge(None)(input_ids=ids).logits,
                                   rtol=0, atol=0)
