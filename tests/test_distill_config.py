"""Distillation losses and configuration: one schema per block, every problem reported at once, ``--set``."""

import dataclasses

import pytest
import torch

from qdlib.distill import ce_loss, distill_loss, kl_loss, tvd_loss
from qdlib.schema import parse_override
from qdlib.settings.distill import (DEFAULT_CONFIGS, KNOWLEDGE_DEFAULTS, SECTIONS, DistillConfig, config_from_dict,
                                    config_keys, knowledge_block, load_config, validate)
from qdlib.errors import ConfigError, QdError


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


def test_knowledge_block_has_one_schema_for_yaml_and_build_draft(tmp_path):
    # the YAML loader and build_draft's knowledge_block check a value with the same declared check
    p = tmp_path / "c.yaml"
    p.write_text("knowledge_enhancement:\n  enabled: true\n  num_heads: 0\n")
    with pytest.raises(ConfigError) as from_yaml:
        load_config(p, num_layers=28)
    with pytest.raises(ConfigError) as from_dict:
        knowledge_block({"enabled": True, "num_heads": 0}, 192, 6)
    assert str(from_dict.value) in str(from_yaml.value)
    assert "knowledge_enhancement.num_heads=0 is out of range; allowed: an integer >= 1 or null" in str(from_dict.value)
    # every key of the block can be written in the YAML file, and nothing else
    assert set(KNOWLEDGE_DEFAULTS) == {f.name for f in dataclasses.fields(DistillConfig().knowledge_enhancement)}


@pytest.mark.parametrize(
    "text, match",
    [
        ("draft_model:\n  stratgy: uniform\n", r"unknown draft_model key\(s\) \['stratgy'\] \(did you mean 'strategy'\?\)"),
        ("trainer:\n  batch_size: 4\n", r"unknown section\(s\) \['trainer'\]"),
        ("training:\n  learning_rate: -1\n", r"training.learning_rate=-1 is out of range; allowed: a number in \(0, 1\]"),
        ("training:\n  learning_rate: fast\n", r"training.learning_rate='fast' is not a number; allowed: a number in"),
        ("training:\n  kl_divergence_weight: 1.5\n", r"training.kl_divergence_weight=1.5 is out of range"),
        ("training:\n  batch_size: 0\n", r"training.batch_size=0 is out of range; allowed: an integer >= 1"),
        ("training:\n  batch_size: 2.5\n", r"training.batch_size=2.5 is not an integer; allowed: an integer >= 1"),
        ("training:\n  temperature: 0\n", r"training.temperature=0 is out of range"),
        ("training:\n  objective: js\n", r"training.objective='js' is unknown; allowed: kl, tvd"),
        ("training:\n  use_knowledge_distillation: 1\n", r"use_knowledge_distillation=1 is not true or false"),
        ("draft_model:\n  num_sampled_layers: 40\n", r"num_sampled_layers=40 is out of range; allowed: an integer in 2..28"),
        ("draft_model:\n  strategy: random\n", r"draft_model.strategy='random' is unknown"),
        ("knowledge_enhancement:\n  enabled: true\n  fusion_gate: sigmoid\n",
         r"knowledge_enhancement.fusion_gate='sigmoid' is unknown; allowed: channel, scalar"),
        ("training:\n  train_params: fusion\n", r"needs knowledge_enhancement.enabled: true"),
        ("training:\n  generated_share: 0.6\n  item_share: 0.5\n", r"generated_share \+ item_share \+ on_policy_share=1.1"),
        ("training:\n  text_sources: stdlib,numpy\n",
         r"training.text_sources='stdlib,numpy' is not allowed; allowed: a comma-separated list of stdlib, torch, transformers"),
        ("training: 5\n", r"config section 'training' must be a mapping, got int"),
        ("training: [\n", r"is not valid YAML"),
    ],
)
def test_bad_config_values_are_clear_errors(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(p, num_layers=28)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)  # old callers catch ValueError; one line


def test_every_problem_is_reported_at_once(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("draft_model:\n  stratgy: uniform\nknowledge_enhancement:\n  enabeld: true\n"
                 "training:\n  lerning_rate: 0.1\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: 4 problems: ")
    for part in ("['stratgy']", "['enabeld']", "['lerning_rate']", "training.batch_size=0 is out of range"):
        assert part in msg


def test_numbers_yaml_reads_as_text_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3' and `no` as False
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  learning_rate: 1e-3\n  weight_decay: 1e-2\n  max_text_tokens: 2e5\n  mixed_precision: no\n")
    t = load_config(p).training
    assert (t.learning_rate, t.weight_decay, t.max_text_tokens, t.mixed_precision) == (0.001, 0.01, 200000, "no")
    assert type(t.max_text_tokens) is int


def test_overrides_use_the_same_checks_and_win_over_the_file():
    cfg = load_config(DEFAULT_CONFIGS["tiny"], overrides=["training.learning_rate=1e-3", "training.batch_size=4",
                                                          "knowledge_enhancement.after_layers=[1, 5]",
                                                          "training.max_text_tokens=null"])
    t = cfg.training
    assert (t.learning_rate, t.batch_size, t.max_text_tokens) == (0.001, 4, None)
    assert cfg.knowledge_enhancement.after_layers == [1, 5]
    with pytest.raises(ConfigError, match=r"2 problems: unknown training key\(s\) \['lr'\].*training.batch_size=-1 is out"):
        load_config(DEFAULT_CONFIGS["tiny"], overrides=["training.lr=0.1", "training.batch_size=-1"])
    with pytest.raises(ConfigError, match=r"--set 'training.batch_size' is not of the form section.key=value"):
        load_config(DEFAULT_CONFIGS["tiny"], overrides=["training.batch_size"])
    assert parse_override("draft_model.strategy=first-k") == ("draft_model", "strategy", "first-k")


def test_every_listed_key_can_be_set_to_its_listed_default():
    lines = config_keys()
    assert len(lines) == sum(len(dataclasses.fields(section)) for section in SECTIONS.values())
    overrides = [line.split("  # ")[0].replace(" = ", "=", 1) for line in lines]
    cfg = config_from_dict({}, overrides=overrides)
    assert cfg == DistillConfig()


def test_a_config_edited_in_python_is_checked_too():
    cfg = load_config(DEFAULT_CONFIGS["tiny"])
    cfg.training.batch_size = 0
    cfg.training.objective = "js"
    with pytest.raises(ConfigError, match=r"2 problems: training.batch_size=0 .*training.objective='js' is unknown"):
        validate(cfg)
    assert issubclass(ConfigError, QdError)
