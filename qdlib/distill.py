"""Distillation: losses and configuration (notebook 04).

The draft learns the teacher's next-token distributions:

    loss = kl_weight * T^2 * KL(teacher_T || draft_T) + (1 - kl_weight) * CE(draft, data)

with temperature T and padding masked out. The optional acceptance objective
is the total-variation distance ``1 - sum_x min(p, q)``: exactly one minus the
speculative-sampling acceptance probability (DistillSpec, Zhou et al. 2023).

Configurations are YAML files with three sections (``draft_model``,
``knowledge_enhancement``, ``training``) loaded into dataclasses whose fields
declare their checks once (:mod:`qdlib.schema`); ``overrides`` are the
``qd distill --set section.key=value`` strings, checked the same way, and every
unknown key or bad value is reported at once in one clear error:

    >>> cfg = load_config(paths.CONFIGS_DIR / "distill_tiny.yaml", overrides=["training.learning_rate=1e-3"])
    >>> cfg.draft_model.num_sampled_layers, cfg.training.learning_rate
    (6, 0.001)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import divergence, paths
from .corpus import SOURCES
from .draft import KnowledgeConfig, knowledge_block
from .errors import ConfigError, MissingFileError
from .sampling import EARLY_EXIT, STRATEGIES
from .schema import (Boolean, Choice, Integer, IntList, Number, OrNull, Text, describe, field_ok, field_problems,
                     raise_problems, setting, unknown_key_problems)

# ----------------------------------------------------------------------------- losses


def kl_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over unmasked positions of T^2 * KL(teacher_T || draft_T); logits ``(B, T, V)``, mask ``(B, T)``."""
    lt = torch.log_softmax(teacher_logits.float() / temperature, -1)  # (B, T, V)
    ld = torch.log_softmax(draft_logits.float() / temperature, -1)  # (B, T, V)
    kl = divergence.kl(lt, ld)  # (B, T)
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
TEXT_SOURCES = SOURCES  # the teacher's corpus sources (qdlib.corpus)

# ----------------------------------------------------------------------------- configuration


STRATEGY_NAMES = STRATEGIES + (EARLY_EXIT,)


@dataclass
class DraftModelConfig:
    strategy: str = setting("uniform", Choice(*STRATEGY_NAMES), "how the draft's layers are chosen")
    num_sampled_layers: int = setting(6, Integer(2), "layers the draft keeps (at most the teacher's)")
    sampled_indices: list[int] | None = setting(None, OrNull(IntList(2, "layer indices")),
                                                "an explicit list of teacher layers; overrides the two keys above")


@dataclass
class TrainingConfig:
    batch_size: int = setting(8, Integer(1), "rows per micro-batch and process")
    learning_rate: float = setting(1e-3, Number(0, 1, low_open=True), "AdamW's peak learning rate")
    num_epochs: int = setting(1, Integer(1), "epochs (an evaluation and a checkpoint after each)")
    max_seq_length: int = setting(256, Integer(2), "tokens per training row")
    gradient_accumulation_steps: int = setting(1, Integer(1), "micro-batches per optimizer step")
    use_knowledge_distillation: bool = setting(True, Boolean(), "false: cross-entropy on the data only")
    kl_divergence_weight: float = setting(0.8, Number(0, 1), "weight of the divergence; the rest is cross-entropy")
    temperature: float = setting(1.0, Number(0, low_open=True), "distillation temperature T")
    objective: str = setting("kl", Choice(*OBJECTIVES), "kl (T^2 KL) or tvd (one minus the acceptance probability)")
    weight_decay: float = setting(0.01, Number(0), "AdamW weight decay (matrices only)")
    warmup_ratio: float = setting(0.05, Number(0, 1, high_open=True), "share of the steps spent warming up")
    max_grad_norm: float = setting(1.0, Number(0, low_open=True), "gradient clipping norm")
    train_params: str = setting("all", Choice(*TRAIN_PARAMS),
                                "all, fusion (fusion only) or body (all but embeddings and head)")
    init_from: str | None = setting(None, OrNull(Text()),
                                    "a draft folder whose weights start the run (same layers); fusion blocks it lacks "
                                    "start fresh, e.g. a fusion phase on a distilled draft frozen with train_params: fusion")
    fusion_lr_scale: float = setting(1.0, Number(0, low_open=True),
                                     "learning rate of the fusion blocks (gates, cross-attention) over learning_rate")
    live_max_lag: int = setting(4, Integer(1),
                                "live memory: each training position reads the teacher's states 1..this many tokens "
                                "behind, drawn per position (drafting at depth j reads them j behind; use the gamma "
                                "you decode with)")
    max_bad_steps: int = setting(10, Integer(1), "stop after this many NaN/Inf losses")
    seed: int = setting(0, Integer(0), "seed of the draft's initialisation and of the data")
    steps_per_epoch: int | None = setting(None, OrNull(Integer(1)), "null: one pass over the training text per epoch")
    # data mix (qdlib.distill_data): the rest of each batch is the teacher's training text
    generated_sequences: int = setting(512, Integer(0),
                                       "training prompts continued greedily by the teacher (sequence-level KD)")
    generated_share: float = setting(0.5, Number(0, 1), "share of rows drawn from those continuations")
    item_share: float = setting(0.1, Number(0, 1),
                                "share of item-conditioned rows (questions + training paraphrases, teacher-continued)")
    on_policy_share: float = setting(0.0, Number(0, 1), "share of rows sampled from the current draft, scored by the teacher")
    max_text_tokens: int | None = setting(None, OrNull(Integer(1)),
                                          "cap on the training text of each source (null: all training files)")
    text_sources: str = setting("stdlib", Text(), "the teacher's corpus sources the text and the continued prompts come "
                                "from, comma-separated: stdlib, torch, transformers")
    # bookkeeping
    checkpoint_every: int = setting(50, Integer(1), "optimizer steps between resume checkpoints (and one per epoch)")
    eval_prompts: int = setting(32, Integer(1), "held-out validation prompts scored every epoch (picks the best)")
    eval_new_tokens: int = setting(64, Integer(1), "length of the teacher continuations the draft is scored on")
    eval_text_windows: int = setting(16, Integer(1), "held-out text windows (128 tokens) for cross-entropy / perplexity")
    item_new_tokens: int = setting(96, Integer(1), "teacher tokens after each knowledge question / training paraphrase")
    knowledge_answer_tokens: int = setting(48, Integer(1), "length of the teacher answers stored in the knowledge cache")
    mixed_precision: str = setting("auto", Choice(*MIXED_PRECISION, aliases={False: "no"}),  # YAML 1.1: `no` is false
                                   "auto (bf16 where the CPU/GPU supports it), bf16 or no")


@dataclass
class DistillConfig:
    draft_model: DraftModelConfig = field(default_factory=DraftModelConfig)
    knowledge_enhancement: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def knowledge_block(self) -> dict:
        """The block as :func:`qdlib.build_draft` takes it (``None`` values left to the defaults)."""
        return {k: v for k, v in dataclasses.asdict(self.knowledge_enhancement).items() if v is not None}


SECTIONS = {"draft_model": DraftModelConfig, "knowledge_enhancement": KnowledgeConfig, "training": TrainingConfig}


def config_problems(cfg: DistillConfig, num_layers: int | None = None) -> list[str]:
    """Every problem of ``cfg`` (numbers written as text are turned into numbers on the way)."""
    problems = [p for name in SECTIONS for p in field_problems(getattr(cfg, name), name)]
    d, k, t = cfg.draft_model, cfg.knowledge_enhancement, cfg.training
    # checks across fields, each where the fields it reads are of the right kind
    if num_layers is not None and field_ok(d, "num_sampled_layers") and d.num_sampled_layers > num_layers:
        problems.append(f"draft_model.num_sampled_layers={d.num_sampled_layers} is out of range; "
                        f"allowed: an integer in 2..{num_layers}")
    if all(field_ok(k, f.name) for f in dataclasses.fields(k)) and field_ok(d, "num_sampled_layers"):
        try:
            knowledge_block(cfg.knowledge_block(), 64, d.num_sampled_layers)  # after_layers against the draft's depth
        except ConfigError as exc:
            problems.append(str(exc))
    if all(field_ok(t, key) for key in ("generated_share", "item_share", "on_policy_share")):
        shares = t.generated_share + t.item_share + t.on_policy_share
        if shares > 1:
            problems.append(f"training.generated_share + item_share + on_policy_share={shares!r} is out of range; "
                            f"allowed: a sum <= 1 (the rest is training text)")
    if field_ok(t, "text_sources"):
        bad = [x for x in t.text_sources.split(",") if x.strip() not in TEXT_SOURCES]
        if bad or not t.text_sources.strip():
            problems.append(f"training.text_sources={t.text_sources!r} is not allowed; allowed: a comma-separated "
                            f"list of {', '.join(TEXT_SOURCES)}")
    if t.train_params == "fusion" and k.enabled is False:
        problems.append("training.train_params='fusion' needs knowledge_enhancement.enabled: true (there are no "
                        "fusion parameters otherwise)")
    return problems


def text_sources(t: TrainingConfig) -> tuple[str, ...]:
    """``training.text_sources`` as a tuple: ``"stdlib, torch"`` -> ``("stdlib", "torch")``."""
    return tuple(x.strip() for x in t.text_sources.split(",") if x.strip())


def validate(cfg: DistillConfig, num_layers: int | None = None) -> DistillConfig:
    """Check every value; raise :class:`~qdlib.errors.ConfigError` (a ``ValueError``) naming every bad key at once."""
    raise_problems(config_problems(cfg, num_layers))
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """``"training.learning_rate=1.0e-3"`` -> ``("training", "learning_rate", 0.001)``; the value is read as YAML.

    >>> parse_override("knowledge_enhancement.after_layers=[2, 5]")
    ('knowledge_enhancement', 'after_layers', [2, 5])
    """
    import yaml

    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"--set {text!r} is not of the form section.key=value, e.g. training.learning_rate=1.0e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, name.strip(), value


def config_from_dict(data, num_layers: int | None = None, overrides=(), where: str = "") -> DistillConfig:
    """Build and validate a config from a mapping of sections, then ``section.key=value`` overrides.

    Every problem (unknown sections and keys in all sections, bad values) is reported in one
    :class:`~qdlib.errors.ConfigError`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where + ': ' if where else ''}the config must be a mapping with sections {sorted(SECTIONS)}")
    data = {name: (dict(sec) if isinstance(sec, dict) else sec) for name, sec in data.items()}
    for text in overrides:
        section, name, value = parse_override(text)
        if isinstance(data.get(section, {}), dict):
            data.setdefault(section, {})[name] = value
    problems = []
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        problems.append(f"unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        sec = data.get(name)
        if sec is None:
            sec = {}
        if not isinstance(sec, dict):
            problems.append(f"config section {name!r} must be a mapping, got {type(sec).__name__}")
            sec = {}
        problems += unknown_key_problems(cls, name, sec)
        known = {f.name for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: v for k, v in sec.items() if k in known})
    cfg = DistillConfig(**sections)
    raise_problems(problems + config_problems(cfg, num_layers), where)
    return cfg


def load_config(path: str | os.PathLike, num_layers: int | None = None, overrides=()) -> DistillConfig:
    """Read and validate a distillation YAML file; ``overrides`` are ``"section.key=value"`` strings (``--set``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} does not exist; use 'tiny', 'qwen3' or a YAML file like "
                          f"{DEFAULT_CONFIGS['tiny']}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    return config_from_dict(data, num_layers, overrides, where=str(path))


def config_keys(cfg: DistillConfig | None = None) -> list[str]:
    """Every key ``--set`` accepts, with its value in ``cfg`` (default: the defaults), what is allowed and what it does."""
    return [line for name, cls in SECTIONS.items() for line in describe(getattr(cfg, name) if cfg else cls, name)]


DEFAULT_CONFIGS = {"tiny": paths.CONFIGS_DIR / "distill_tiny.yaml", "qwen3": paths.CONFIGS_DIR / "distill_qwen3.yaml"}
