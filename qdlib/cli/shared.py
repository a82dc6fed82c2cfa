"""Steps several ``qd`` commands share: the teacher they load, the device they check, quiet transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError


def quiet_hf():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in command output


def check_device(device: str | None) -> None:
    """Refuse a device this machine lacks now, before any model loads."""
    if device is None or device == "auto" or device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s); use cpu or auto")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS is not available on this machine; use cpu or auto")


def teacher_config(model: str | None) -> dict | None:
    """The teacher's ``config.json`` if it is on disk (bundled, a folder or the HF cache), read without loading."""
    from ..models import in_hub_cache, teacher_path

    where = teacher_path(model)
    local = Path(where).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    if in_hub_cache(where):
        from huggingface_hub import try_to_load_from_cache

        return json.loads(Path(try_to_load_from_cache(where, "config.json")).read_text(encoding="utf-8"))
    return None


def teacher_layers(model: str | None) -> int | None:
    cfg = teacher_config(model) or {}
    return cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers")


def load_teacher_for(args):
    """``(model, tokenizer)`` for ``--model``/``--device`` (a failure is a TeacherLoadError, a QdError)."""
    from ..models import load_teacher

    quiet_hf()
    return load_teacher(args.model, device=args.device)


def teacher_label(args) -> str:
    return args.model or os.environ.get("QD_MODEL") or "tiny"
