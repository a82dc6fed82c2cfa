"""qdlib: turn a model into its own fast draft model for speculative decoding.

The library behind the course notebooks (``notebooks/NN_*.ipynb``), one module per stage:

    from qdlib import load_teacher, sample_layers, build_draft
    teacher, tokenizer = load_teacher()              # the bundled 28-layer teacher (or $QD_MODEL)
    layers = sample_layers(28, 6)                    # [0, 5, 11, 16, 22, 27]
    draft = build_draft(teacher, layers)             # a real transformers PreTrainedModel
    out, stats = speculative_generate(teacher, draft, input_ids, gamma=4)   # the teacher's own output, faster
    draft = load_draft()                             # the distilled reference draft, knowledge cache attached

Importing qdlib loads no model, changes no global setting and does not even
import torch: the names below are imported on first use (PEP 562), so
``qd --help`` answers at once. The draft's config class is registered with
transformers' Auto classes when :mod:`qdlib.draft` is first imported (any of
the draft names below, ``load_draft``, or ``import qdlib.draft``).
"""

from __future__ import annotations

import importlib

from .errors import ConfigError, QdError

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "DraftConfig": "draft",
    "DraftForCausalLM": "draft",
    "build_draft": "draft",
    "export_qwen3": "draft_files",
    "KnowledgeCache": "knowledge",
    "KnowledgeCacheError": "knowledge",
    "build_knowledge_cache": "knowledge",
    "load_knowledge_cache": "knowledge",
    "LiveMemory": "memories",
    "DraftLoadError": "draft_files",
    "load_draft": "draft_files",
    "FeatureDraft": "feature_draft",
    "load_feature_draft": "feature_draft",
    "NgramDrafter": "lookup",
    "TeacherLoadError": "models",
    "load_teacher": "models",
    "first_k_layers": "sampling",
    "layer_importance": "sampling",
    "sample_layers": "sampling",
    "SpecStats": "speculative",
    "generate_plain": "speculative",
    "speculative_generate": "speculative",
}

__all__ = [
    "DraftConfig",
    "DraftForCausalLM",
    "KnowledgeCache",
    "KnowledgeCacheError",
    "TeacherLoadError",
    "DraftLoadError",
    "QdError",
    "ConfigError",
    "load_draft",
    "FeatureDraft",
    "load_feature_draft",
    "NgramDrafter",
    "build_knowledge_cache",
    "load_knowledge_cache",
    "LiveMemory",
    "build_draft",
    "export_qwen3",
    "first_k_layers",
    "layer_importance",
    "load_teacher",
    "sample_layers",
    "SpecStats",
    "generate_plain",
    "speculative_generate",
]


def __getattr__(name: str):
    """Import on first use: a public name (``qdlib.load_teacher``) or a module (``qdlib.paths``)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # a missing dependency, not a missing module: say so
                raise
    raise AttributeError(f"module 'qdlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

