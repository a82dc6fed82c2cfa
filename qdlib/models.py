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

Without network (``HF_HUB_OFFLINE`` set, or the hub unreachable on one quick
check) a hub id is looked up only in the local Hugging Face cache, so it fails
within seconds instead of retrying for a minute. Loading prints no progress
bars unless ``progress=True``.

Device: ``"cpu"`` unless asked; ``"auto"`` picks cuda, then mps, then cpu.
dtype: ``None`` means float32 on CPU (transformers 5 would otherwise keep the
stored bf16) and the stored dtype on an accelerator.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from . import paths
from .errors import ConfigError, QdError
from .io import check_model_folder

TINY = "tiny"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class TeacherLoadError(QdError, RuntimeError):
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
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'") from exc


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """``None`` -> float32 on CPU, the stored dtype elsewhere (returned as None)."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)} or a torch.dtype")


def teacher_path(name: str | None = None) -> str:
    """The folder or hub id that ``load_teacher(name)`` would load."""
    name = default_teacher_name() if name is None else name
    if name == TINY:
        return str(paths.TEACHER_DIR)
    return name


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), read now rather than at import, asks for no network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request to the hub's endpoint (``HF_ENDPOINT``; proxies honoured), no retries."""
    import httpx  # huggingface_hub's own HTTP client

    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    try:
        httpx.head(endpoint, timeout=timeout)
        return True
    except httpx.HTTPError:
        return False


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache already holds ``repo_id``'s config."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


@contextlib.contextmanager
def quiet_loading(progress: bool = False):
    """No transformers progress bars ("Loading weights") or warnings while loading, unless ``progress``.

    The previous settings are restored afterwards, so loading changes no global setting.
    """
    from transformers.utils import logging as hf_logging

    if progress:
        yield
        return
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _hub_error(name: str, why: str) -> TeacherLoadError:
    return TeacherLoadError(
        f"could not load {name!r} from the Hugging Face hub ({why}). "
        f"Without network access, download the model elsewhere and point at the folder, e.g. "
        f"QD_MODEL=/path/to/Qwen3-0.6B or load_teacher('/path/to/Qwen3-0.6B'). "
        f"The bundled teacher works offline: load_teacher('tiny') or unset QD_MODEL.")


def load_teacher(name: str | None = None, device: str | torch.device | None = None, dtype=None, *,
                 progress: bool = False):
    """Return ``(model, tokenizer)`` for a teacher, the model in eval mode.

    See the module docstring for how ``name``, ``device`` and ``dtype`` are
    chosen. A hub id that cannot be downloaded raises :class:`TeacherLoadError`
    saying what failed, how to use a local folder, and that ``"tiny"`` works
    offline. Without network (``HF_HUB_OFFLINE`` set, or the hub unreachable on one
    quick check) only the local Hugging Face cache is tried, so this fails in
    seconds rather than after a minute of retries. ``progress=True`` shows
    transformers' loading bars.
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
    if looks_local:  # a damaged file named before from_pretrained reports it without its name
        fix = "retrain it: `qd train-teacher`, then `qd train-teacher --export`" if is_bundled(name) else \
            "save or download the model again"
        check_model_folder(local, what="teacher", fix=fix, error=TeacherLoadError)
    kwargs = {"dtype": dt} if dt is not None else {}
    local_only = {}
    if not looks_local and (hub_offline() or not hub_reachable()):
        if not in_hub_cache(where):  # no network and nothing cached: say so now, without retries
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub is not reachable from here"
            raise _hub_error(name, f"{why}, and the model is not in the local Hugging Face cache")
        local_only = {"local_files_only": True}  # cached: load it without asking the network
    try:
        with quiet_loading(progress):
            tokenizer = AutoTokenizer.from_pretrained(where, **local_only)
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs, **local_only)
    except (OSError, ValueError) as exc:
        if looks_local:
            raise TeacherLoadError(f"could not load the model folder {local}: {exc}") from exc
        raise _hub_error(name, f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
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
