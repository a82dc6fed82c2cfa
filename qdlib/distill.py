"""Distillation: losses and configuration (notebook 04).

The draft learns the teacher's next-token distributions:

    loss = kl_weight * T^2 * KL(teacher_T || draft_T) + (1 - kl_weight) * CE(draft, data)

with temperature T and padding masked out. The optional acceptance objective
is the total-variation distance ``1 - sum_x min(p, q)``: exactly one minus the
speculative-sampling acceptance probability (DistillSpec, Zhou et al. 2023).

Configurations are YAML files with three sections (``draft_model``,
``knowledge_enhancement``, ``training``) loaded into dataclasses; an unknown key
or an out-of-range value is a clear error:

    >>> cfg = load_config(paths.CONFIGS_DIR / "distill_tiny.yaml")
    >>> cfg.draft_model.num_sampled_layers
    6
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import paths
from .draft import knowledge_block
from .sampling import STRATEGIES

# ----------------------------------------------------------------------------- losses


def kl_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over unmasked positions of T^2 * KL(teacher_T || draft_T); logits ``(B, T, V)``, mask ``(B, T)``."""
    lt = torch.log_softmax(teacher_logits.float() / temperature, -1)  # (B, T, V)
    ld = torch.log_softmax(draft_logits.float() / temperature, -1)  # (B, T, V)
    kl = (lt.exp() * (lt - ld)).sum(-1)  # (B, T)
    return temperature**2 * _masked_mean(kl, mask)


def tvd_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean of the total-variation distance 1 - sum_x min(p, q): the rejection probability."""
    p = torch.softmax(teacher_logits.float() / temperature, -1)
    q = torch.softmax(draft_logits.float() / temperature, -1)
    return _masked_mean(1 - torch.minimum(p, q).sum(-1), mask)


def ce_loss(draft_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the draft on the data's next tokens (labels already shifted to the logits' positions)."""
    ce = F.cross_entropy(draft_logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return _masked_mean(ce, mask)


def distill_loss(draft_logits, teacher_logits, labels, mask=None, *, kl_weight: float = 0.8,
                 temperature: float = 1.0, objective: str = "kl") -> torch.Tensor:
    """``kl_weight * divergence + (1 - kl_weight) * CE``; the divergence is T^2 KL or TVD."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    div = kl_loss if objective == "kl" else tvd_loss
    return kl_weight * div(draft_logits, teacher_logits, mask, temperature) + (1 - kl_weight) * ce_loss(
        draft_logits, labels, mask)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


OBJECTIVES = ("kl", "tvd")
MIXED_PRECISION = ("auto", "bf16", "no")
TRAIN_PARAMS = ("all", "fusion", "body")

# ----------------------------------------------------------------------------- configuration


@dataclass
class DraftModelConfig:
    strategy: str = "uniform"
    num_sampled_layers: int = 6
    sampled_indices: list[int] | None = None  # an explicit list overrides strategy / num_sampled_layers


@dataclass
class KnowledgeConfig:
    enabled: bool = False
    cache_dim: int | None = None
    num_heads: int | None = None
    fusion_gate: str = "channel"
    after_layers: list[int] | None = None


@dataclass
class TrainingConfig:
    batch_size: int = 8
    learning_rate: float = 1e-3
    num_epochs: int = 1
    max_seq_length: int = 256
    gradient_accumulation_steps: int = 1
    use_knowledge_distillation: bool = True  # False: cross-entropy on the data only
    kl_divergence_weight: float = 0.8
    temperature: float = 1.0
    objective: str = "kl"  # "kl" or "tvd"
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    train_params: str = "all"  # "all", "fusion" (fusion only) or "body" (all but embeddings and head)
    max_bad_steps: int = 10  # stop after this many NaN/Inf losses
    seed: int = 0
    steps_per_epoch: int | None = None  # None: one pass over the training text per epoch
    # data mix (qdlib.distill_data): the rest of each batch is the teacher's training text
    generated_sequences: int = 512  # training prompts continued greedily by the teacher (sequence-level KD)
    generated_share: float = 0.5  # share of rows drawn from those continuations
    item_share: float = 0.1  # share of item-conditioned rows (questions + training paraphrases, teacher-continued)
    on_policy_share: float = 0.0  # share of rows sampled from the current draft, scored by the teacher
    max_text_tokens: int | None = None  # cap on the training text (None: all training files)
    # bookkeeping
    checkpoint_every: int = 50  # optimizer steps between resume checkpoints (and one at every epoch end)
    eval_prompts: int = 32  # held-out validation prompts scored every epoch (picks the best checkpoint)
    eval_new_tokens: int = 64  # length of the teacher continuations the draft is scored on
    eval_text_windows: int = 16  # held-out text windows (128 tokens) for cross-entropy / perplexity
    item_new_tokens: int = 96  # teacher tokens after each knowledge question / training paraphrase
    knowledge_answer_tokens: int = 48  # length of the teacher answers stored in the knowledge cache
    mixed_precision: str = "auto"  # auto (bf16 where the CPU/GPU supports it) | bf16 | no


@dataclass
class DistillConfig:
    draft_model: DraftModelConfig = field(default_factory=DraftModelConfig)
    knowledge_enhancement: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def knowledge_block(self) -> dict:
        """The block as :func:`qdlib.build_draft` takes it (``None`` values left to the defaults)."""
        return {k: v for k, v in dataclasses.asdict(self.knowledge_enhancement).items() if v is not None}


def _fill(cls, section: str, data) -> object:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"config section {section!r} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in section {section!r}; allowed: {sorted(names)}")
    return cls(**data)


def _range(section: str, key: str, value, ok: bool, allowed: str):
    if not ok:
        raise ValueError(f"{section}.{key}={value!r} is out of range; allowed: {allowed}")


def validate(cfg: DistillConfig, num_layers: int | None = None) -> DistillConfig:
    """Check every value; raise ``ValueError`` naming the bad key, its value and what is allowed."""
    d, k, t = cfg.draft_model, cfg.knowledge_enhancement, cfg.training
    _range("draft_model", "strategy", d.strategy, d.strategy in STRATEGIES + ("first-k",),
           ", ".join(STRATEGIES + ("first-k",)))
    _range("draft_model", "num_sampled_layers", d.num_sampled_layers,
           isinstance(d.num_sampled_layers, int) and d.num_sampled_layers >= 2
           and (num_layers is None or d.num_sampled_layers <= num_layers),
           f"an integer in 2..{num_layers or 'num_layers'}")
    if d.sampled_indices is not None:
        _range("draft_model", "sampled_indices", d.sampled_indices,
               isinstance(d.sampled_indices, list) and len(d.sampled_indices) >= 2
               and all(isinstance(i, int) for i in d.sampled_indices), "a list of at least 2 layer indices")
    knowledge_block(cfg.knowledge_block(), 64, d.num_sampled_layers)  # validates the knowledge names and values
    pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    for key in ("batch_size", "num_epochs", "max_seq_length", "gradient_accumulation_steps", "max_bad_steps"):
        _range("training", key, getattr(t, key), pos_int(getattr(t, key)), "an integer >= 1")
    _range("training", "learning_rate", t.learning_rate, isinstance(t.learning_rate, (int, float)) and 0 < t.learning_rate <= 1,
           "a number in (0, 1]")
    _range("training", "kl_divergence_weight", t.kl_divergence_weight,
           isinstance(t.kl_divergence_weight, (int, float)) and 0 <= t.kl_divergence_weight <= 1, "a number in [0, 1]")
    _range("training", "temperature", t.temperature, isinstance(t.temperature, (int, float)) and t.temperature > 0,
           "a number > 0")
    _range("training", "objective", t.objective, t.objective in OBJECTIVES, ", ".join(OBJECTIVES))
    _range("training", "train_params", t.train_params, t.train_params in TRAIN_PARAMS, ", ".join(TRAIN_PARAMS))
    _range("training", "warmup_ratio", t.warmup_ratio, isinstance(t.warmup_ratio, (int, float)) and 0 <= t.warmup_ratio < 1,
           "a number in [0, 1)")
    _range("training", "weight_decay", t.weight_decay, isinstance(t.weight_decay, (int, float)) and t.weight_decay >= 0,
           "a number >= 0")
    _range("training", "max_grad_norm", t.max_grad_norm, isinstance(t.max_grad_norm, (int, float)) and t.max_grad_norm > 0,
           "a number > 0")
    for key in ("generated_share", "item_share", "on_policy_share"):
        v = getattr(t, key)
        _range("training", key, v, isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
               "a number in [0, 1]")
    _range("training", "generated_share + item_share + on_policy_share", t.generated_share + t.item_share + t.on_policy_share,
           t.generated_share + t.item_share + t.on_policy_share <= 1, "a sum <= 1 (the rest is training text)")
    _range("training", "generated_sequences", t.generated_sequences,
           isinstance(t.generated_sequences, int) and not isinstance(t.generated_sequences, bool) and t.generated_sequences >= 0,
           "an integer >= 0")
    for key in ("checkpoint_every", "eval_prompts", "eval_new_tokens", "knowledge_answer_tokens", "eval_text_windows",
                "item_new_tokens"):
        _range("training", key, getattr(t, key), pos_int(getattr(t, key)), "an integer >= 1")
    _range("training", "mixed_precision", t.mixed_precision, t.mixed_precision in MIXED_PRECISION, ", ".join(MIXED_PRECISION))
    if t.max_text_tokens is not None:
        _range("training", "max_text_tokens", t.max_text_tokens, pos_int(t.max_text_tokens), "an integer >= 1 or null")
    if t.steps_per_epoch is not None:
        _range("training", "steps_per_epoch", t.steps_per_epoch, pos_int(t.steps_per_epoch), "an integer >= 1 or null")
    if t.train_params == "fusion" and not k.enabled:
        raise ValueError("training.train_params='fusion' needs knowledge_enhancement.enabled: true (there are no "
                         "fusion parameters otherwise)")
    return cfg


SECTIONS = {"draft_model": DraftModelConfig, "knowledge_enhancement": KnowledgeConfig, "training": TrainingConfig}


def load_config(path: str | os.PathLike, num_layers: int | None = None) -> DistillConfig:
    """Read and validate a distillation YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping with sections {sorted(SECTIONS)}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    try:
        cfg = DistillConfig(**{name: _fill(cls, name, data.get(name)) for name, cls in SECTIONS.items()})
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    try:
        return validate(cfg, num_layers)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


DEFAULT_CONFIGS = {"tiny": paths.CONFIGS_DIR / "distill_tiny.yaml", "qwen3": paths.CONFIGS_DIR / "distill_qwen3.yaml"}
