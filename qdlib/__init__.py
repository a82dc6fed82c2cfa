"""qdlib: turn a model into its own fast draft model for speculative decoding.

The library behind the course notebooks (``notebooks/NN_*.ipynb``), one module per stage:

    from qdlib import load_teacher, sample_layers, build_draft
    teacher, tokenizer = load_teacher()              # the bundled 28-layer teacher (or $QD_MODEL)
    layers = sample_layers(28, 6)                    # [0, 5, 11, 16, 22, 27]
    draft = build_draft(teacher, layers)             # a real transformers PreTrainedModel
    out, stats = speculative_generate(teacher, draft, input_ids, gamma=4)   # the teacher's own output, faster
    draft = load_draft()                             # the distilled reference draft, knowledge cache attached

Importing qdlib loads no model and changes no global setting, except that the
draft's config class is registered with transformers' Auto classes.
"""

from .draft import DraftConfig, DraftForCausalLM, DraftLoadError, build_draft, load_draft
from .knowledge import KnowledgeCache, KnowledgeCacheError, build_knowledge_cache, load_knowledge_cache
from .models import TeacherLoadError, load_teacher
from .sampling import first_k_layers, layer_importance, sample_layers
from .speculative import SpecStats, generate_plain, speculative_generate

__version__ = "0.1.0"

__all__ = [
    "DraftConfig",
    "DraftForCausalLM",
    "KnowledgeCache",
    "KnowledgeCacheError",
    "TeacherLoadError",
    "DraftLoadError",
    "load_draft",
    "build_knowledge_cache",
    "load_knowledge_cache",
    "build_draft",
    "first_k_layers",
    "layer_importance",
    "load_teacher",
    "sample_layers",
    "SpecStats",
    "generate_plain",
    "speculative_generate",
]
