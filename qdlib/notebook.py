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

import os

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
