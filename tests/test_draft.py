import pytest
import torch

from qdlib import DraftForCausalLM, build_draft, first_k_layers, sample_layers
from qdlib.settings.distill import knowledge_block
from qdlib.sampling import run_layers

from helpers import tiny_qwen3


@pytest.fixture(scope="module")
def teacher():
    return tiny_qwen3()


def test_untrained_draft_is_the_teacher_with_fewer_layers(teacher):
    layers = sample_layers(28, 6)
    draft = build_draft(teacher, layers)
    x = torch.randint(2, 256, (2, 16))
    torch.testing.assert_close(draft(input_ids=x).logits, run_layers(teacher, x, layers), rtol=0, atol=0)
    assert draft.config.kept_layers == layers
    assert draft.config.num_hidden_layers == 6 and len(draft.config.layer_types) == 6
    assert draft.config.teacher_num_layers == 28


def test_weights_are_copied_not_aliased(teacher):
    draft = build_draft(teacher, [0, 3, 27])
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in teacher_ptrs for p in draft.parameters())
    before = teacher.model.layers[3].mlp.up_proj.weight.clone()
    with torch.no_grad():
        draft.model.layers[1].mlp.up_proj.weight.add_(1.0)
        draft.lm_head.weight.add_(1.0)
    torch.testing.assert_close(teacher.model.layers[3].mlp.up_proj.weight, before)


def test_freeze_shared(teacher):
    draft = build_draft(teacher, [0, 27], freeze_shared=True)
    assert not draft.lm_head.weight.requires_grad and not draft.model.norm.weight.requires_grad
    assert draft.model.layers[0].mlp.up_proj.weight.requires_grad


@pytest.mark.parametrize(
    "layers, kwargs, match",
    [
        ([0, 5, 28], {}, r"out of range; the teacher has layers 0..27"),
        ([-1, 5, 27], {}, r"out of range"),
        ([0, 5, 5, 27], {}, r"duplicate layer indices \[5\]"),
        ([0, 11, 5, 27], {}, r"not sorted"),
        ([1, 5, 27], {}, r"must include the first \(0\) and the last \(27\) layer"),
        ([0, 5, 26], {}, r"must include the first \(0\) and the last \(27\) layer"),
        ([], {}, r"layers is empty"),
        ([0, 2.5, 27], {}, r"must be integers"),
    ],
)
def test_bad_layer_lists(teacher, layers, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_draft(teacher, layers, **kwargs)


def test_tuple_instead_of_model_is_refused(teacher):
    with pytest.raises(TypeError, match="not the \\(model, tokenizer\\) tuple"):
        build_draft((teacher, None), [0, 27])


def test_early_exit_needs_keep_ends_false(teacher):
    with pytest.raises(ValueError):
        build_draft(teacher, first_k_layers(28, 6))
    draft = build_draft(teacher, first_k_layers(28, 6), keep_ends=False)
    assert draft.config.kept_layers == [0, 1, 2, 3, 4, 5]


def test_save_load_round_trip_identical_logits(teacher, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    draft = build_draft(teacher, sample_layers(28, 6))
    draft.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "qd_draft"
    for loaded in (DraftForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, DraftForCausalLM)
        loaded.eval()
        x = torch.randint(2, 256, (1, 20))
        torch.testing.assert_close(loaded(input_ids=x).logits, draft(input_ids=x).logits, rtol=0, atol=0)
        assert loaded.config.kept_layers == draft.config.kept_layers


def test_generate_with_kv_cache_matches_full_forward(teacher):
    draft = build_draft(teacher, sample_layers(28, 6))
    x = torch.randint(2, 256, (1, 8))
    out = draft.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=1)
    # recompute greedily without a cache
    seq = x
    for _ in range(12):
        nxt = draft(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@pytest.mark.slow  # transformers' assisted loop is slow in Python; the draft.py docstring example is the quick check
def test_assisted_generation_equals_teacher_greedy(teacher):
    draft = build_draft(teacher, sample_layers(28, 6))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randint(2, 256, (1, 10), generator=g)
        plain = teacher.generate(x, max_new_tokens=24, do_sample=False, pad_token_id=1)
        assisted = teacher.generate(x, max_new_tokens=24, do_sample=False, pad_token_id=1, assistant_model=draft)
        assert torch.equal(plain, assisted)


def test_knowledge_block_defaults_and_errors():
    kb = knowledge_block({"enabled": True}, 1024, 6)
    assert kb["cache_dim"] == 512 and kb["num_heads"] == 8 and kb["after_layers"] == [2, 5]
    with pytest.raises(ValueError, match="unknown knowledge_enhancement key"):
        knowledge_block({"enable": True}, 1024, 6)
    with pytest.raises(ValueError, match="after_layers"):
        knowledge_block({"enabled": True, "after_layers": [6]}, 1024, 6)
    with pytest.raises(ValueError, match="fusion_gate"):
        knowledge_block({"enabled": True, "fusion_gate": "sigmoid"}, 1024, 6)


@pytest.mark.slow
def test_assisted_generation_equals_teacher_greedy_on_20_heldout_prompts(tiny):
    """The bundled teacher with its uniform 6-of-28 draft as assistant_model, on held-out code."""
    from qdlib.corpus import heldout_prompts, heldout_texts

    teacher, tok = tiny
    draft = build_draft(teacher, sample_layers(28, 6))
    prompts = heldout_prompts(tok, heldout_texts(), n_prompts=20, prompt_tokens=32)
    assert len(prompts) == 20
    for p in prompts:
        ids = torch.tensor([p])
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            assert torch.equal(teacher.generate(ids, **kw), teacher.generate(ids, assistant_model=draft, **kw))


def test_export_qwen3_is_a_plain_qwen3_with_the_same_outputs(tiny, tmp_path, capsys):
    """Drafts export to Qwen3ForCausalLM: the same logits, usable as an assistant; a knowledge path is dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qdlib import load_draft, paths
    from qdlib.cli import main
    from qdlib.corpus import heldout_prompts, heldout_texts

    teacher, tok = tiny
    ids = torch.tensor(heldout_prompts(tok, heldout_texts(), n_prompts=4, prompt_tokens=48, seed=2))
    for name, folder in (("ablation", paths.DRAFT_NOKNOW_DIR), ("reference", paths.DRAFT_DIR)):
        assert main(["export-draft", "--format", "qwen3", str(tmp_path / name), "--draft", str(folder)]) == 0
        note = capsys.readouterr().out
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert type(plain).__name__ == "Qwen3ForCausalLM" and plain.config.num_hidden_layers == 6
        assert AutoTokenizer.from_pretrained(tmp_path / name).vocab_size == tok.vocab_size
        draft = load_draft(folder)
        with torch.no_grad():
            got = plain(input_ids=ids).logits
            if name == "reference":  # dropped knowledge: the draft with its cache detached, and said so
                assert "knowledge path is dropped" in note and "largest |tanh(gate)|" in note
                attached = draft(input_ids=ids).logits
                draft.set_knowledge(None)
            torch.testing.assert_close(got, draft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        if name == "reference":
            print(f"reference draft: exported vs cache attached, largest logit difference {(got - attached).abs().max():.4f}")
    x = torch.tensor([tok("def add(a, b):\n    return", add_special_tokens=False)["input_ids"]])
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(teacher.generate(x, assistant_model=plain, **kw), teacher.generate(x, **kw))
    # the feature-fed draft is no plain Qwen3: refused in one line, nothing written
    capsys.readouterr()
    assert main(["export-draft", str(tmp_path / "no"), "--draft", str(paths.FAST_DRAFT_DIR)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "feature-fed" in err, err
    assert not (tmp_path / "no").exists()
