"""Distillation losses and configuration (the trainer lands with the distillation issue)."""

import dataclasses

import pytest
import torch

from qdlib.distill import (DEFAULT_CONFIGS, KnowledgeConfig, ce_loss, distill_loss, kl_loss, load_config,
                           tvd_loss)
from qdlib.draft import KNOWLEDGE_DEFAULTS


def test_losses_on_tiny_tensors():
    t = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])
    d = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])
    labels = torch.tensor([[0, 1]])
    p, q = torch.softmax(t, -1), torch.softmax(d, -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert kl_loss(d, t).item() == pytest.approx(kl.mean().item(), rel=1e-6)
    mask = torch.tensor([[True, False]])
    assert kl_loss(d, t, mask).item() == pytest.approx(kl[0, 0].item(), rel=1e-6)
    assert tvd_loss(d, t).item() == pytest.approx((1 - torch.minimum(p, q).sum(-1)).mean().item(), rel=1e-6)
    assert tvd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    ce = -(torch.log_softmax(d, -1)[0, [0, 1], [0, 1]]).mean()
    assert ce_loss(d, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    both = distill_loss(d, t, labels, kl_weight=0.8, temperature=2.0)
    assert both.item() == pytest.approx(0.8 * kl_loss(d, t, temperature=2.0).item() + 0.2 * ce.item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown objective 'js'"):
        distill_loss(d, t, labels, objective="js")


def test_shipped_configs_load():
    tiny = load_config(DEFAULT_CONFIGS["tiny"], num_layers=28)
    assert tiny.draft_model.num_sampled_layers == 6 and tiny.knowledge_enhancement.enabled
    qwen = load_config(DEFAULT_CONFIGS["qwen3"], num_layers=28)
    assert qwen.knowledge_enhancement.cache_dim == 512 and qwen.knowledge_enhancement.num_heads == 8


def test_knowledge_section_uses_the_draft_config_names():
    assert {f.name for f in dataclasses.fields(KnowledgeConfig)} <= set(KNOWLEDGE_DEFAULTS)


@pytest.mark.parametrize(
    "text, match",
    [
        ("draft_model:\n  stratgy: uniform\n", r"unknown key\(s\) \['stratgy'\] in section 'draft_model'"),
        ("trainer:\n  batch_size: 4\n", r"unknown section\(s\) \['trainer'\]"),
        ("training:\n  learning_rate: -1\n", r"training.learning_rate=-1 is out of range; allowed: a number in \(0, 1\]"),
        ("training:\n  kl_divergence_weight: 1.5\n", r"training.kl_divergence_weight=1.5 is out of range"),
        ("training:\n  batch_size: 0\n", r"training.batch_size=0 is out of range; allowed: an integer >= 1"),
        ("training:\n  temperature: 0\n", r"training.temperature=0 is out of range"),
        ("training:\n  objective: js\n", r"training.objective='js' is out of range; allowed: kl, tvd"),
        ("draft_model:\n  num_sampled_layers: 40\n", r"num_sampled_layers=40 is out of range; allowed: an integer in 2..28"),
        ("draft_model:\n  strategy: random\n", r"draft_model.strategy='random' is out of range"),
        ("knowledge_enhancement:\n  enabled: true\n  fusion_gate: sigmoid\n", r"fusion_gate 'sigmoid' unknown"),
        ("training:\n  train_params: fusion\n", r"needs knowledge_enhancement.enabled: true"),
    ],
)
def test_bad_config_values_are_clear_errors(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(p, num_layers=28)
