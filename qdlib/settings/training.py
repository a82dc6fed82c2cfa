"""The settings of the trainers beside distillation: ``qd train-fast`` (:class:`FeatureTrainConfig`),
``qd train-teacher`` (:class:`TeacherTrainConfig`) and ``qd train-memory`` (:class:`RetrievalConfig`).

Each field is declared once with its check and help (:mod:`qdlib.schema`); the ``qd`` command makes its options,
``--set`` and ``--list-keys`` from these declarations. One concept has one name in every trainer (``learning_rate``,
``batch_size``, ``max_seq_length``, ``max_grad_norm``, ``checkpoint_every``, ``mixed_precision``, as in the
distillation config); a config written under an older name is read through :func:`qdlib.schema.renamed`.

    >>> FeatureTrainConfig(learning_rate=2)
    Traceback (most recent call last):
    ...
    qdlib.errors.ConfigError: fast.learning_rate=2 is out of range; allowed: a number in (0, 1]

Torch-free, so that ``qd --help`` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import Boolean, Checked, Choice, Choices, Integer, Number, OrNull, Text, Weights, field_ok, setting
from .names import FUSION_INITS, MIXED_PRECISION, SOURCES


@dataclass
class FeatureTrainConfig(Checked):
    """``qd train-fast``'s settings, each declared once with its check and help (:mod:`qdlib.schema`); a bad value
    is refused when the config is made, naming it and what is allowed."""

    section = "fast"

    num_layers: int = setting(1, Integer(1), "decoder layers of the feature-fed draft")
    steps: int = setting(3000, Integer(1), "optimizer steps")
    batch_size: int = setting(16, Integer(1), "rows per step")
    max_seq_length: int = setting(256, Integer(1), "tokens per row")
    learning_rate: float = setting(1e-3, Number(0, 1, low_open=True), "peak learning rate (warm-up, then cosine)")
    min_lr_ratio: float = setting(0.1, Number(0, 1), "the cosine's floor, as a share of learning_rate")
    warmup_steps: int = setting(100, Integer(0), "linear warm-up steps")
    weight_decay: float = setting(0.0, Number(0), "AdamW weight decay (matrices only)")
    max_grad_norm: float = setting(1.0, Number(0, low_open=True), "gradient norm clip")
    feature_weight: float = setting(0.1, Number(0), "weight of the feature-regression loss beside the KL")
    unroll: int = setting(2, Integer(1), "drafting depths trained: 1 = teacher features only; 2 = also one depth on "
                                         "the draft's own features")
    unroll_weight: float = setting(0.5, Number(0), "weight of each deeper depth's loss")
    source_weights: dict = setting({"stdlib": 0.5, "torch": 0.25, "transformers": 0.25}, Weights(*SOURCES),
                                   "the training mixture over the teacher's own sources")
    max_tokens_per_source: int | None = setting(6_000_000, OrNull(Integer(1)), "tokens read from each source")
    generated: int = setting(768, Integer(0), "teacher greedy continuations of training prompts ...")
    generated_share: float = setting(0.25, Number(0, 1, high_open=True), "... and the share of rows taken from them")
    prompt_tokens: int = setting(32, Integer(1), "length of those prompts")
    eval_every: int = setting(250, Integer(1), "steps between evaluations")
    eval_prompts: int = setting(24, Integer(1), "held-out prompts of each evaluation")
    checkpoint_every: int = setting(50, Integer(1), "steps between checkpoints (last.pt)")
    seed: int = setting(0, Integer(0), "data order and initialisation")
    mixed_precision: str = setting("auto", Choice(*MIXED_PRECISION, aliases={False: "no"}),
                                   "bf16 autocast; auto: where the device supports it")
    max_files: int | None = setting(None, OrNull(Integer(1)), "only the first files of each source (tests)")
    init_from: str | None = setting(None, OrNull(Text()), "a feature-draft folder to continue from (grow_from)")


@dataclass
class TeacherTrainConfig(Checked):
    """``qd train-teacher``'s settings, each declared once with its check and help (:mod:`qdlib.schema`)."""

    section = "teacher"

    steps: int = setting(2400, Integer(1), "optimizer steps of the main phase")
    batch_size: int = setting(16, Integer(1), "sequences per step")
    max_seq_length: int = setting(256, Integer(8), "tokens per sequence")
    learning_rate: float = setting(3e-3, Number(0, 1, low_open=True), "peak learning rate (warm-up, then cosine)")
    min_lr_ratio: float = setting(0.1, Number(0, 1), "the cosine's floor, as a share of learning_rate")
    warmup_steps: int = setting(100, Integer(0), "linear warm-up steps")
    weight_decay: float = setting(0.1, Number(0), "AdamW weight decay (matrices only)")
    max_grad_norm: float = setting(1.0, Number(0, low_open=True), "gradient norm clip")
    stdlib_weight: float = setting(0.7, Number(0, 1), "share of sequences drawn from the standard library ...")
    final_stdlib_only: float = setting(0.2, Number(0, 1), "... and the share of final steps on the standard library only")
    hidden: int = setting(192, Integer(8), "hidden size (28 layers, as Qwen3-0.6B)")
    vocab_size: int = setting(8192, Integer(256), "tokenizer vocabulary (a BPE trained on the corpus)")
    eval_every: int = setting(250, Integer(1), "steps between held-out evaluations")
    checkpoint_every: int = setting(50, Integer(1), "steps between checkpoints (last.pt)")
    seed: int = setting(0, Integer(0), "data order and initialisation")
    mixed_precision: str = setting("auto", Choice(*MIXED_PRECISION, aliases={False: "no"}),
                                   "bf16 autocast; auto: where the device supports it")
    sources: list = setting(list(SOURCES), Choices(*SOURCES), "corpus sources; the first must be stdlib")
    max_files: int | None = setting(None, OrNull(Integer(1)), "only the first N files of each source (tests)")
    compile: bool = setting(True, Boolean(), "torch.compile the training forward (~25% faster here, ~2 min to compile)")
    # Phase 2, after ``steps``: sequence-level unlikelihood polish (Welleck et al. 2019, "Neural text
    # generation with unlikelihood training"). Each step adds, to the ordinary stdlib loss, a penalty
    # -log(1 - p(token)) on the tokens of the model's own greedy continuations that repeat a 4-gram.
    ul_steps: int = setting(100, Integer(0), "steps of the unlikelihood polish after the main phase")
    ul_learning_rate: float = setting(3e-4, Number(0, 1, low_open=True), "constant learning rate of the polish")
    ul_weight: float = setting(1.0, Number(0), "weight of the unlikelihood penalty")
    ul_batch: int = setting(8, Integer(1), "greedy continuations per polish step ...")
    ul_prompt_tokens: int = setting(64, Integer(1), "... of prompts cut from the training stdlib stream ...")
    ul_new_tokens: int = setting(128, Integer(1), "... continued this far")

    def related_problems(self) -> list[str]:
        if field_ok(self, "sources") and self.sources[0] != "stdlib":
            return [f"teacher.sources={self.sources!r} must start with 'stdlib' (the held-out split is its)"]
        return []


@dataclass
class RetrievalConfig(Checked):
    """The settings of one retrieval-training run (all of them shape the weights except ``eval_every``), each
    declared once with its check and help (:mod:`qdlib.schema`); a bad value is refused when the config is made."""

    section = "memory"

    items: int = setting(400, Integer(2), "documented functions of the stdlib training files ...")
    val_items: int = setting(40, Integer(1), "... of which the last ones only select checkpoints")
    memory_items: int = setting(24, Integer(2), "items in each step's memory (the protocol's size)")
    batch_items: int = setting(8, Integer(1), "items whose paraphrases (2 each) form one batch")
    swapped_share: float = setting(0.25, Number(0, 1, high_open=True), "steps whose memory holds none of the batch's "
                                                                      "items")
    question_rows: bool = setting(True, Boolean(), "batches also hold each item's question itself (its continuation "
                                                   "is the cached answer)")
    steps: int = setting(1200, Integer(1), "optimizer steps")
    learning_rate: float = setting(3e-3, Number(0, 1, low_open=True), "peak learning rate")
    warmup_steps: int = setting(50, Integer(0), "linear warm-up steps")
    gate_init: float = setting(0.1, Number(0, 1, high_open=True), "tanh(gate) at the start (the distilled draft's "
                                                                 "gates are reset to it)")
    fusion_init: str = setting("keep", Choice(*FUSION_INITS), "keep: the distilled fusion weights; similarity: see "
                                                             "similarity_init")
    similarity_scale: float = setting(3.0, Number(0, low_open=True), "the q/k-norm weights of similarity (higher: "
                                                                     "sharper attention)")
    answer_tokens: int = setting(48, Integer(1), "tokens of each cached answer")
    new_tokens: int = setting(32, Integer(1), "teacher tokens continued after each paraphrase")
    seed: int = setting(0, Integer(0), "item choice and data order")
    eval_every: int = setting(100, Integer(1), "steps between evaluations")

    def related_problems(self) -> list[str]:
        """How the item counts relate (checked once each count is fine alone)."""
        if not all(field_ok(self, k) for k in ("items", "val_items", "memory_items", "batch_items")):
            return []
        if not 0 < self.val_items < self.items:
            return [f"memory.val_items={self.val_items} must be between 1 and items - 1 ({self.items - 1})"]
        if not self.batch_items < self.memory_items <= self.items - self.val_items - self.batch_items:
            return [f"memory.memory_items={self.memory_items} must exceed batch_items={self.batch_items} and "
                    f"leave room for other items among the {self.items - self.val_items} training items"]
        return []
