"""The settings of a distillation run (``qd distill``): YAML files with three sections (``draft_model``,
``knowledge_enhancement``, ``training``) loaded into dataclasses whose fields declare their checks once
(:mod:`qdlib.schema`). ``overrides`` are the ``qd distill --set section.key=value`` strings, checked the same way,
and every unknown key or bad value is reported at once in one clear error:

    >>> cfg = load_config(paths.CONFIGS_DIR / "distill_tiny.yaml", overrides=["training.learning_rate=1e-3"])
    >>> cfg.draft_model.num_sampled_layers, cfg.training.learning_rate
    (6, 0.001)

Torch-free, so that ``qd distill --help`` and ``--list-keys`` answer at once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..errors import ConfigError, MissingFileError
from ..schema import (Boolean, Choice, Integer, IntList, Number, OrNull, Text, describe, field_ok, field_problems,
                      parse_override, raise_problems, setting, unknown_key_problems)
from .names import GATES, MEMORY_KINDS, MIXED_PRECISION, OBJECTIVES, SOURCES, STRATEGY_NAMES, TRAIN_PARAMS


@dataclass
class KnowledgeConfig:
    """The ``knowledge_enhancement`` block: one schema for ``build_draft``, the YAML configs and ``--set``."""

    enabled: bool = setting(False, Boolean(), "add the knowledge path at all")
    cache_dim: int | None = setting(None, OrNull(Integer(1)),
                                    "width of the cross-attention; null: half the hidden size (512 for Qwen3-0.6B)")
    num_heads: int | None = setting(None, OrNull(Integer(1)),
                                    "cross-attention heads; null: cache_dim // 64 (8 for Qwen3-0.6B), at least 1")
    fusion_gate: str = setting("channel", Choice(*GATES), "channel (one tanh gate per hidden channel) or scalar")
    after_layers: list[int] | None = setting(None, OrNull(IntList(1, "draft layer positions")),
                                             "draft layer positions (0..k-1) followed by fusion; null: the middle and the last")
    memory_size: int | None = setting(None, OrNull(Integer(1)), "width of the cached states; null: the teacher's hidden size")
    gate_init: float = setting(0.0, Number(0.0, 1.0, high_open=True),
                               "tanh(gate) at the start: 0 (default) makes the draft exactly the plain draft; a small "
                               "value such as 0.1 lets the cross-attention receive gradient from the first step")
    memory: str = setting("static", Choice(*MEMORY_KINDS),
                          "what the fusion blocks read: static (a knowledge cache of items) or live (the teacher's "
                          "states of the verified text, qdlib.memories)")
    memory_layers: list[int] | None = setting(None, OrNull(IntList(1, "teacher layer indices")),
                                              "teacher layers a live memory reads (concatenated); null: the last "
                                              "(the final-norm output the head reads)")
    recency: bool | None = setting(None, OrNull(Boolean()),
                                   "a learned recency bias per cross-attention head (a live memory's slots are "
                                   "positions of the text); null: on for a live memory, off for a static one")


KNOWLEDGE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KnowledgeConfig)}  # the block's defaults, by name


def knowledge_block(block: dict | None, hidden_size: int, num_layers: int) -> dict:
    """Fill a ``knowledge_enhancement`` block with defaults and validate it (:class:`KnowledgeConfig`).

    >>> knowledge_block({"enabled": True}, 1024, 6)["cache_dim"]
    512
    >>> knowledge_block({"enabled": True}, 1024, 6)["after_layers"]
    [2, 5]
    """
    block = dict(block or {})
    raise_problems(unknown_key_problems(KnowledgeConfig, "knowledge_enhancement", block))
    cfg = KnowledgeConfig(**block)
    raise_problems(field_problems(cfg, "knowledge_enhancement"))
    out = dataclasses.asdict(cfg)
    if out["cache_dim"] is None:
        out["cache_dim"] = max(64, hidden_size // 2)
    if out["num_heads"] is None:
        out["num_heads"] = max(1, out["cache_dim"] // 64)
    layers = out["memory_layers"]
    if layers is not None and len(set(layers)) != len(layers):
        raise ConfigError(f"knowledge_enhancement.memory_layers={layers!r} must be distinct teacher layer indices")
    if out["memory_size"] is None:
        out["memory_size"] = hidden_size * (len(layers) if out["memory"] == "live" and layers else 1)
    if out["recency"] is None:
        out["recency"] = out["memory"] == "live"
    elif out["recency"] and out["memory"] != "live":
        raise ConfigError("knowledge_enhancement.recency=True needs memory: live (a static cache's slots are items' "
                          "tokens, not positions of the text); allowed with memory: static are false or null")
    if out["cache_dim"] % out["num_heads"]:
        raise ConfigError(f"knowledge_enhancement.cache_dim={out['cache_dim']} is not divisible by "
                          f"num_heads={out['num_heads']}")
    if out["after_layers"] is None:
        out["after_layers"] = sorted({(num_layers - 1) // 2, num_layers - 1})
    after = list(out["after_layers"])
    if not after or any(not isinstance(i, int) or not 0 <= i < num_layers for i in after) or len(set(after)) != len(after):
        raise ConfigError(f"knowledge_enhancement.after_layers={after!r} must be distinct draft layer positions in "
                          f"0..{num_layers - 1}")
    out["after_layers"] = sorted(after)
    return out


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
        bad = [x for x in t.text_sources.split(",") if x.strip() not in SOURCES]
        if bad or not t.text_sources.strip():
            problems.append(f"training.text_sources={t.text_sources!r} is not allowed; allowed: a comma-separated "
                            f"list of {', '.join(SOURCES)}")
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
