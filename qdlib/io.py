"""Atomic file writes, and reads that name a damaged file.

Every checkpoint, cache and report in qdlib goes through these helpers, so an
interruption (Ctrl-C, a killed process, a full disk) never leaves a
half-written file behind. Every load of weights, a cache or a checkpoint goes
through :func:`torch_load_safe`, :func:`load_safetensors`, :func:`read_json`
or :func:`check_model_folder`, so a missing, truncated or corrupt file raises a
:class:`~qdlib.errors.QdError` that names it and says how to get a good copy:

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"
    >>> write_json_atomic(p, {"a": 1})
    >>> p.read_text().strip()
    '{\\n  "a": 1\\n}'
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import paths
from .errors import DamagedFileError, MissingFileError, QdError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The temporary file lives in the same folder (so the rename is atomic on
    POSIX). If the body raises, the temporary file is removed and ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; swap it into place on success.

    Used for ``save_pretrained``-style folders. An existing folder at ``path`` is
    replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (load it back with :func:`torch_load_safe`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------- reading: a damaged file names itself


def how_to_restore(path: str | os.PathLike, otherwise: str) -> str:
    """How to get a good copy of ``path``: ``git checkout`` for a committed artifact (under the repository's
    ``outputs/``, outside ``outputs/runs/``), else ``otherwise`` (the command that writes it).

    >>> how_to_restore(paths.REPO_DIR / "outputs" / "teacher" / "model.safetensors", "retrain it")
    'restore the committed copy with `git checkout -- outputs/teacher/model.safetensors` (or retrain it)'
    >>> how_to_restore("/elsewhere/last.pt", "delete it to start over")
    'delete it to start over'
    """
    path = Path(os.path.abspath(path))
    committed = Path(os.path.abspath(paths.REPO_DIR / "outputs"))
    if path.is_relative_to(committed) and not path.is_relative_to(os.path.abspath(paths.runs_dir())):
        return f"restore the committed copy with `git checkout -- {path.relative_to(paths.REPO_DIR).as_posix()}` " \
               f"(or {otherwise})"
    return otherwise


def _read(path, what: str, fix: str, error: type[QdError] | None, read):
    """``read(path)``, a missing file raising ``error`` (default :class:`MissingFileError`) and an unreadable one
    ``error`` (default :class:`DamagedFileError`), each naming ``path`` and how to get a good copy."""
    path = Path(path)
    if not path.is_file():
        raise (error or MissingFileError)(f"{what} {path} does not exist; {how_to_restore(path, fix)}")
    try:
        return read(path)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise (error or DamagedFileError)(f"{what} {path} could not be read: it is corrupt or truncated ({why}); "
                                          f"{how_to_restore(path, 'delete it and ' + fix)}") from exc


def torch_load_safe(path: str | os.PathLike, *, what: str = "checkpoint", fix: str = "rerun the command that wrote it",
                    error: type[QdError] | None = None) -> Any:
    """Load a checkpoint written by :func:`torch_save_atomic` without unpickling code.

    Uses ``weights_only=True``: only tensors and plain Python containers load. A missing file raises
    :class:`MissingFileError`, a corrupt or truncated one :class:`DamagedFileError` (or ``error`` for both), naming
    the file and ``fix``, how to get a good copy.
    """
    return _read(path, what, fix, error, _torch_load)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's own text would suggest weights_only=False: never for a bad file
        raise ValueError("not a checkpoint of tensors and plain containers (torch.load with weights_only=True "
                         "refused it)") from exc


def load_safetensors(path: str | os.PathLike, *, what: str = "weights file", fix: str,
                     error: type[QdError] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (on the CPU); a missing or damaged file raises as
    :func:`torch_load_safe` does."""
    return _read(path, what, fix, error, lambda p: load_file(str(p)))


def read_json(path: str | os.PathLike, *, what: str, fix: str, error: type[QdError] | None = None) -> Any:
    """A JSON file's content; a missing or damaged file raises as :func:`torch_load_safe`."""
    return _read(path, what, fix, error, lambda p: json.loads(p.read_text(encoding="utf-8")))


def check_model_folder(folder: str | os.PathLike, *, what: str, fix: str, error: type[QdError] | None = None) -> None:
    """Check that a ``save_pretrained``-style folder's ``config.json``, its other JSON files (tokenizer, generation
    config) and its ``*.safetensors`` headers can be read, before a loader that would report a damaged file without
    naming it (``from_pretrained``). Reads no tensor data, so it costs little even for a real model."""
    folder = Path(folder)
    read_json(folder / "config.json", what=f"{what} config", fix=fix, error=error)
    for f in sorted(folder.glob("*.json")):
        read_json(f, what=f"{what} file", fix=fix, error=error)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        weights = [folder / "model.safetensors"]  # absent: reported as missing
    for f in weights:
        _read(f, f"{what} weights", fix, error, _safetensors_keys)


def _safetensors_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:  # reads and checks the header only
        return list(f.keys())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (the training logs use this)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
