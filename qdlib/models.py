"""Loading a teacher: the bundled one, a hub id or a local folder (notebook 00).

    >>> from qdlib import load_teacher
    >>> model, tokenizer = load_teacher()
    >>> model.config.num_hidden_layers
    28

Which teacher:

- ``name=None``: the environment variable ``QD_MODEL`` if set (read at call
  time), else the bundled teacher;
- ``"tiny"``: always the bundled teacher (``outputs/teacher``);
- anything else: a local folder or a hub id such as ``"Qwen/Qwen3-0.6B"``,
  loaded with transformers' Auto classes.

Device: ``"cpu"`` unless asked; ``"auto"`` picks cuda, then mps, then cpu.
dtype: ``None`` means float32 on CPU (transformers 5 would otherwise keep the
stored bf16) and the stored dtype on an accelerator.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import paths

TINY = "tiny"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class TeacherLoadError(RuntimeError):
    """A teacher could not be loaded; the message says why and what to do."""


def default_teacher_name() -> str:
    """``QD_MODEL`` if set and not empty, else ``"tiny"`` (the bundled teacher)."""
    return os.environ.get("QD_MODEL", "").strip() or TINY


def is_bundled(name: str | None) -> bool:
    """True when ``name`` (after applying the default) means the bundled teacher."""
    name = default_teacher_name() if name is None else name
    return name == TINY or Path(name).expanduser().resolve() == paths.TEACHER_DIR.resolve()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> cpu; ``"auto"`` -> cuda, then mps, then cpu; anything else as given.

    >>> resolve_device(None)
    device(type='cpu')
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'") from exc


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """``None`` -> float32 on CPU, the stored dtype elsewhere (returned as None)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)} or a torch.dtype")


def teacher_path(name: str | None = None) -> str:
    """The folder or hub id that ``load_teacher(name)`` would load."""
    name = default_teacher_name() if name is None else name
    if name == TINY:
        return str(paths.TEACHER_DIR)
    return name


def load_teacher(name: str | None = None, device: str | torch.device | None = None, dtype=None):
    """Return ``(model, tokenizer)`` for a teacher, the model in eval mode.

    See the module docstring for how ``name``, ``device`` and ``dtype`` are
    chosen. A hub id that cannot be downloaded raises :class:`TeacherLoadError`
    saying what failed, how to use a local folder, and that ``"tiny"`` works
    offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = default_teacher_name() if name is None else name
    if not isinstance(name, str) or not name:
        raise ValueError(f"teacher name must be a non-empty string, got {name!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    where = teacher_path(name)
    local = Path(where).expanduser()
    if name == TINY and not (local / "config.json").is_file():
        raise TeacherLoadError(
            f"the bundled teacher is missing: {local} has no config.json. It is committed to the repository "
            f"under outputs/teacher; restore it with `git checkout -- outputs/teacher`, or retrain it with "
            f"`qd train-teacher` followed by `qd train-teacher --export`."
        )
    looks_local = local.exists() or where.startswith((".", "/", "~")) or os.sep + os.sep in where
    if looks_local and not (local / "config.json").is_file():
        raise TeacherLoadError(f"{local} is not a model folder (no config.json there)")
    kwargs = {"dtype": dt} if dt is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        if looks_local:
            raise TeacherLoadError(f"could not load the model folder {local}: {exc}") from exc
        raise TeacherLoadError(
            f"could not load {name!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            f"Without network access, download the model elsewhere and point at the folder, e.g. "
            f"QD_MODEL=/path/to/Qwen3-0.6B or load_teacher('/path/to/Qwen3-0.6B'). "
            f"The bundled teacher works offline: load_teacher('tiny') or unset QD_MODEL."
        ) from exc
    model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_name(model) -> str:
    """A short human name for a loaded model: ``"tiny"`` for the bundled teacher."""
    src = getattr(model.config, "_name_or_path", "") or ""
    try:
        if src and Path(src).resolve() == paths.TEACHER_DIR.resolve():
            return TINY
    except OSError:
        pass
    return src or type(model).__name__


class DraftLoadError(RuntimeError):
    """No draft could be loaded (missing folder, or no reference draft for this teacher)."""


def load_draft(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None, dtype=None):
    """The draft model alone, in eval mode (float32 on CPU), with its knowledge cache attached.

    No name gives the course's reference draft (``outputs/reference_draft``) when the
    default teacher is the bundled one; a folder written by ``qd distill --export`` (or
    any ``save_pretrained`` folder of a :class:`qdlib.DraftForCausalLM`) loads that draft.
    A ``knowledge_cache/`` subfolder is attached with ``set_knowledge``, so
    ``draft(input_ids=...)``, ``generate``, ``assistant_model=draft`` and
    ``speculative_generate(teacher, draft, ids)`` all work as they are.
    """
    from . import paths
    from .draft import DraftForCausalLM
    from .knowledge import load_knowledge_cache

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
    dev = resolve_device(device)
    draft = DraftForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, dev) or torch.float32).to(dev).eval()
    if (folder / "knowledge_cache").is_dir() and draft.config.knowledge_enhancement.get("enabled"):
        draft.set_knowledge(load_knowledge_cache(folder / "knowledge_cache"))
    return draft
