"""The course notebooks' set-up, in one call (the first code cell of every notebook).

    from qdlib.notebook import setup
    DEVICE = setup()        # "cpu"; in a notebook kernel, figures are now drawn inline

    >>> use_inline_backend()    # outside a notebook kernel it changes nothing
    False

It keeps progress bars and transformers' info logging quiet, seeds torch, and makes
matplotlib draw inline, so every ``plt.show()`` stores its figure in the notebook (a
notebook executed with ``MPLBACKEND=Agg`` would store none). It silences no Python
warning: a warning that a cell prints is worth reading.
"""

from __future__ import annotations

import json
import os
import sys

DEVICE = "cpu"  # the course runs on a laptop CPU; load_teacher(device="auto") would pick a GPU


def setup(seed: int = 0) -> str:
    """Seed torch, quiet progress bars and logging, draw figures inline; return the course's device."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before a tokenizer forks (no fork warning)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' info/warning log lines, not Python warnings
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    use_inline_backend()
    return DEVICE


def use_inline_backend() -> bool:
    """Switch matplotlib to the inline backend when running in an IPython kernel; False elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):  # plain Python or a terminal IPython: leave it alone
        return False
    shell.run_line_magic("matplotlib", "inline")
    return True


def as_javascript_writes(value):
    """``value`` (parsed notebook JSON) with every whole-number float written as an integer, as JupyterLab saves it.

    JupyterLab parses a notebook into JavaScript numbers, which do not keep ``0.0`` apart from ``0``; a notebook
    executed by nbconvert stores widget state such as a FloatSlider's ``"min": 0.0``, so a student's first Ctrl-S
    would rewrite those lines and leave ``git status`` dirty. Committed notebooks are stored this way instead.

    >>> as_javascript_writes({"min": 0.0, "step": 0.01, "n": [1.0, 2], "ok": True})
    {'min': 0, 'step': 0.01, 'n': [1, 2], 'ok': True}
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    if isinstance(value, dict):
        return {k: as_javascript_writes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_javascript_writes(v) for v in value]
    return value


def jupyterlab_text(text: str) -> str:
    """The notebook file ``text`` as saving it from JupyterLab writes it: the frontend holds the notebook as
    JavaScript values (:func:`as_javascript_writes`), the server writes them through nbformat (sorted keys,
    indent 1) with a final newline."""
    import nbformat

    return nbformat.writes(nbformat.from_dict(as_javascript_writes(json.loads(text)))) + "\n"


def store_as_jupyterlab_would(path) -> bool:
    """Rewrite the notebook at ``path`` as JupyterLab writes it (see :func:`jupyterlab_text`); True if changed."""
    text = open(path, encoding="utf-8").read()
    new = jupyterlab_text(text)
    if new == text:
        return False
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)
    return True


if __name__ == "__main__":  # python -m qdlib.notebook notebooks/NN_topic.ipynb ... (after nbconvert --execute)
    for p in sys.argv[1:]:
        print(p, "rewritten" if store_as_jupyterlab_would(p) else "unchanged")
