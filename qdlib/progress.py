"""Progress bars that respect ``TQDM_DISABLE`` everywhere, in notebooks too.

``tqdm.auto`` picks a Jupyter widget inside a notebook, and that widget class passes its own
``disable=False`` to tqdm, so the ``TQDM_DISABLE`` environment variable (which tests, CI and
the notebook refresh set) is ignored there and a frozen "0%" bar lands in the saved outputs.
Every qdlib bar goes through ``progress_bar`` instead::

    from qdlib.progress import progress_bar
    for x in progress_bar(range(3), desc="demo", enabled=False):
        pass

First used by notebook 02 (the knowledge cache build).
"""

from __future__ import annotations

import os


def bars_disabled(env=None) -> bool:
    """Whether ``TQDM_DISABLE`` (in ``env``, default ``os.environ``) asks for no bars: any value but '', '0', 'false', 'no'.

    >>> bars_disabled({"TQDM_DISABLE": "1"}), bars_disabled({"TQDM_DISABLE": "0"}), bars_disabled({})
    (True, False, False)
    """
    env = os.environ if env is None else env
    return env.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A ``tqdm.auto`` bar (widget in Jupyter, text elsewhere), off when ``enabled`` is False or bars are disabled.

    >>> bar = progress_bar(total=3, enabled=False)
    >>> bar.disable
    True
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled or bars_disabled(), **kwargs)
