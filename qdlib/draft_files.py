"""A trained draft from its folder (:func:`load_draft`), and a draft written as a plain Qwen3 (:func:`export_qwen3`).

    >>> draft = load_draft()                      # the course's reference draft, its knowledge cache attached
    >>> draft.config.kept_layers
    [0, 5, 11, 16, 22, 27]

A folder that is missing, truncated or corrupted ends in a :class:`DraftLoadError` that names it and how to get a
good copy; a feature-fed folder (:mod:`qdlib.feature_draft`) loads as a :class:`~qdlib.feature_draft.FeatureDraft`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Qwen3Config

from . import paths
from .draft import DraftForCausalLM
from .errors import ConfigError, QdError
from .feature_draft import is_feature_draft_folder, load_feature_draft
from .io import atomic_dir, check_model_folder, write_json_atomic
from .knowledge import load_knowledge_cache
from .models import default_teacher_name, is_bundled, quiet_loading, resolve_device, resolve_dtype


class DraftLoadError(QdError, RuntimeError):
    """No draft could be loaded (missing folder, or no reference draft for this teacher)."""


def load_draft(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None, dtype=None, *,
               progress: bool = False):
    """The draft model alone, in eval mode (float32 on CPU), with its knowledge cache attached.

    No name gives the course's reference draft (``outputs/reference_draft``) when the
    default teacher is the bundled one; a folder written by ``qd distill --export`` (or
    any ``save_pretrained`` folder of a :class:`qdlib.DraftForCausalLM`) loads that draft.
    A ``knowledge_cache/`` subfolder is attached with ``set_knowledge``, so
    ``draft(input_ids=...)``, ``generate``, ``assistant_model=draft`` and
    ``speculative_generate(teacher, draft, ids)`` all work as they are. Loading is quiet
    unless ``progress=True``.

    ``"fast"`` gives the course's fast draft (``outputs/fast_draft``), a feature-fed draft
    (:mod:`qdlib.feature_draft`) that reads the teacher's hidden states: it works with
    ``speculative_generate(teacher, draft, ids)`` (with its own tuned gamma), not as an
    ``assistant_model``. Any folder written by :func:`qdlib.feature_draft.save_feature_draft` loads the same way.
    """
    if name_or_path == "fast":
        if not is_bundled(default_teacher_name()):
            raise DraftLoadError("the fast draft was trained for the bundled teacher; with QD_MODEL set, train one "
                                 "for your teacher (qdlib.feature_train) and pass its folder")
        name_or_path = paths.FAST_DRAFT_DIR
    if name_or_path is None:
        teacher = default_teacher_name()
        if not is_bundled(teacher):
            raise DraftLoadError(
                f"no reference draft exists for the teacher {teacher!r} (QD_MODEL): the course ships one only for the "
                f"bundled teacher. Distil one with `qd distill --config qwen3 --export <folder>` and pass that folder "
                f"to load_draft, or unset QD_MODEL")
        name_or_path = paths.DRAFT_DIR
    folder = Path(name_or_path)
    if not (folder / "config.json").is_file():
        raise DraftLoadError(f"{folder} is not a draft folder (no config.json); expected the output of "
                             f"`qd distill --export` or DraftForCausalLM.save_pretrained")
    check_model_folder(folder, what="draft", error=DraftLoadError, fix="export it again (`qd distill --export "
                       "FOLDER`, or qdlib.feature_train.export_fast_draft for a feature-fed draft)")
    dev = resolve_device(device)
    if is_feature_draft_folder(folder):
        return load_feature_draft(folder, device=dev, dtype=resolve_dtype(dtype, dev) or torch.float32)
    with quiet_loading(progress):  # no "Loading weights" bar unless asked
        draft = DraftForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, dev) or torch.float32).to(dev).eval()
    kb = draft.config.knowledge_enhancement
    if kb.get("enabled") and kb.get("memory") == "live":
        draft.set_knowledge("live")  # trained to read the teacher's states of the verified text
    elif (folder / "knowledge_cache").is_dir() and kb.get("enabled"):
        draft.set_knowledge(load_knowledge_cache(folder / "knowledge_cache"))
    return draft


PROVENANCE_KEYS = ("kept_layers", "teacher_num_layers", "teacher_name_or_path", "teacher_fingerprint")
QD_ONLY_KEYS = (*PROVENANCE_KEYS,
                "knowledge_enhancement", "architectures", "model_type", "auto_map", "transformers_version")


def export_qwen3(draft: DraftForCausalLM, out_dir: str | os.PathLike, tokenizer=None) -> dict:
    """Write ``draft`` as a plain ``Qwen3ForCausalLM`` folder that any Qwen3 runtime loads (transformers' Auto
    classes, and serving engines such as vLLM or SGLang as a draft model), with ``tokenizer`` beside it.

    A layer-sampled draft without a knowledge path *is* a plain Qwen3 of k layers: same weights, same logits. A
    draft with fusion blocks is exported without them, which equals the draft with its cache detached; the note
    returned (and kept in ``qd_provenance.json`` with the kept layers and the teacher's fingerprint) says so and how
    open its gates were. The folder is written atomically. Returns the provenance record.
    """
    from transformers import Qwen3ForCausalLM

    if not isinstance(draft, DraftForCausalLM):
        raise ConfigError(f"a {type(draft).__name__} does not export to Qwen3: only layer-sampled drafts do (a "
                          f"feature-fed draft reads the teacher's hidden states, which no plain Qwen3 does)")
    cfg = {k: v for k, v in draft.config.to_dict().items() if k not in QD_ONLY_KEYS}
    qwen = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(draft.dtype)
    state = {k: v for k, v in draft.state_dict().items() if not k.startswith("fusion.")}
    missing, unexpected = qwen.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not qwen.config.tie_word_embeddings]
    if missing or unexpected:  # pragma: no cover - the two layouts agree by construction; say so if they drift
        raise QdError(f"the draft's weights do not map onto Qwen3 (missing {missing}, unexpected {unexpected})")
    qwen.tie_weights()
    note = "a plain Qwen3: the same logits as the draft"
    if len(draft.fusion):
        gate = max(torch.tanh(f.gate).abs().max().item() for f in draft.fusion.values())
        note = (f"the knowledge path is dropped ({len(draft.fusion)} fusion blocks, largest |tanh(gate)| {gate:.4f}): "
                f"the export equals the draft with its cache detached")
    record = {k: draft.config.to_dict().get(k) for k in PROVENANCE_KEYS} | {"note": note}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        qwen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "qd_provenance.json", record)
    return record
