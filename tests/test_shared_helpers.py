"""The helpers that replaced duplicates: one RMSNorm, one resume check, one optimiser set-up, one early-exit name."""

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from qdlib import build_draft, sample_layers
from qdlib.corpus import pad_id
from qdlib.settings.distill import DistillConfig, validate
from qdlib.fusion import RMSNorm
from qdlib.metrics import compare_strategies, strategy_layers
from qdlib.sampling import first_k_layers
from qdlib.settings.names import EARLY_EXIT
from qdlib.trainer import draft_layers
from qdlib.train.optim import adamw, config_changes

from helpers import tiny_qwen3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qdlib_rmsnorm_computes_exactly_what_qwen3s_does(dtype):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(16, eps=1e-5), Qwen3RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(16))
        ours.weight.copy_(theirs.weight)
    ours.to(dtype), theirs.to(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype) * 4
    if dtype == torch.float32:  # the fused operator: equal up to float rounding
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    else:  # the same six operators in the same order: bitwise
        assert torch.equal(ours(x), theirs(x))
    assert repr(ours) == "RMSNorm((16,), eps=1e-05)"


def test_the_draft_uses_the_one_rmsnorm_and_keeps_the_teachers_weights():
    teacher = tiny_qwen3()
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, Qwen3RMSNorm):
                m.weight.normal_()  # not all ones, so a fresh norm would show
    layers = sample_layers(28, 4)
    draft = build_draft(teacher, layers).float()
    kinds = {type(m) for m in draft.modules() if "RMSNorm" in type(m).__name__}
    assert kinds == {RMSNorm}
    assert torch.equal(draft.model.layers[1].input_layernorm.weight, teacher.model.layers[layers[1]].input_layernorm.weight)
    assert torch.equal(draft.model.layers[2].self_attn.q_norm.weight, teacher.model.layers[layers[2]].self_attn.q_norm.weight)
    assert draft.model.norm.eps == teacher.model.norm.variance_epsilon
    assert {n for n, _ in draft.named_parameters()} >= {"model.norm.weight", "model.layers.0.input_layernorm.weight"}


def test_config_changes_fills_new_keys_with_defaults_and_ignores_what_may_change():
    defaults = {"training": {"learning_rate": 1e-3, "epochs": 1, "new": 0}, "draft": {"k": 6}}
    saved = {"training": {"lr": 1e-3, "epochs": 2}, "draft": {"k": 6}}  # written before "new" existed, and "lr" renamed
    same = {"training": {"learning_rate": 1e-3, "epochs": 5, "new": 0}, "draft": {"k": 6}}
    assert config_changes(saved, same, defaults, may_change=["training.epochs"]) == {}
    assert config_changes(saved, same, defaults) == {"training.epochs": (2, 5)}
    other = {"training": {"learning_rate": 3e-3, "epochs": 2, "new": 1}, "draft": {"k": 4}}
    assert config_changes(saved, other, defaults) == {"draft.k": (6, 4), "training.learning_rate": (1e-3, 3e-3),
                                                       "training.new": (0, 1)}
    assert config_changes({**saved, "gone": 1}, same, defaults, ["training.epochs"]) == {"gone": (1, None)}


def test_adamw_decays_matrices_only_and_keeps_the_parameter_order():
    model = tiny_qwen3(layers=2)
    params = list(model.parameters())
    opt = adamw(params, lr=0.01, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(p) for p in params if p.dim() >= 2]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in params if p.dim() < 2]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 0.01


def test_pad_id_falls_back_only_when_there_is_none():
    class Tok:
        pad_token_id = 0  # a real pad id of 0 is kept, not mistaken for "missing"

    assert pad_id(Tok(), default=5) == 0
    Tok.pad_token_id = None
    assert pad_id(Tok(), default=5) == 5 and pad_id(Tok()) == 0


def test_the_early_exit_baseline_has_one_name_everywhere():
    assert strategy_layers(28, 4, EARLY_EXIT) == first_k_layers(28, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="k=29"):
        strategy_layers(28, 29, EARLY_EXIT)
    cfg = DistillConfig()
    cfg.draft_model.strategy = EARLY_EXIT
    validate(cfg, 28)  # accepted by the config check
    cfg.draft_model.strategy = "first_k"
    with pytest.raises(ValueError, match="first-k"):  # and named in its message
        validate(cfg, 28)
    rows = compare_strategies(tiny_qwen3(layers=6), torch.randint(2, 200, (1, 8)), ks=[2])
    assert [r["strategy"] for r in rows] == ["uniform", "geometric", "logarithmic", EARLY_EXIT]


@pytest.mark.slow  # builds a draft per strategy (11 s)
def test_the_distillation_config_gets_the_layers_of_every_strategy_name(tiny):
    teacher, tok = tiny
    cfg = DistillConfig()
    cfg.draft_model.num_sampled_layers = 6
    cfg.draft_model.strategy = EARLY_EXIT
    assert draft_layers(cfg, teacher, tok) == ([0, 1, 2, 3, 4, 5], False)  # an early exit keeps no last layer
    cfg.draft_model.strategy = "uniform"
    assert draft_layers(cfg, teacher, tok) == (sample_layers(28, 6), True)
    cfg.draft_model.strategy = "importance"  # scored on held-out files (it once passed the wrong arguments)
    layers, keep_ends = draft_layers(cfg, teacher, tok)
    assert keep_ends and len(layers) == 6 and layers[0] == 0 and layers[-1] == 27
