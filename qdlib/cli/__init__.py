"""The ``qd`` command: thin argument parsing over qdlib's modules.

    qd generate --prompt "def fibonacci(n):"     # the bundled teacher writes code
    qd train-teacher                              # train the bundled teacher (resumable)
    qd train-teacher --export                     # write outputs/teacher
    qd compare-layers --k 6                       # untrained drafts, side by side
    qd build-cache                                # the knowledge cache for the configured teacher
    qd distill --config tiny                      # distil the reference draft (resumable)
    qd distill --config tiny --learning-rate 1.0e-3   # a training key as an option (any key: --set)
    qd train-fast --steps 300 --lr 3e-3           # options made from the config's schema (`--list-keys`)
    qd distill --config tiny --export outputs/reference_draft   # measure the best draft and write it
    qd student                                    # student copies of the notebooks (solutions stubbed)
    qd bench                                      # every decoding method side by side, report + plots
    qd tour                                       # the whole story in a few minutes

``QD_MODEL`` (or ``--model``) selects another teacher, e.g. ``Qwen/Qwen3-0.6B`` or a local folder.

How it fails: every option is checked before any model loads; any of qdlib's own
errors (:class:`qdlib.errors.QdError`) ends the command with one line
``error: ...`` (exit status 2; 3 when training stopped itself); Ctrl-C ends it
with one line saying what was kept and how to resume (exit status 130). This
package imports neither torch nor transformers at import time, so ``qd --help``
answers at once: each command imports what it needs.

Each command whose work a config describes takes its options from that config's
schema (:mod:`qdlib.settings`): one option per setting, named as the setting,
``--set SECTION.KEY=VALUE`` and ``--list-keys`` (:mod:`.options`).
"""

from __future__ import annotations

import sys

from ..errors import QdError
from .interrupt import KEPT_ON_INTERRUPT, kept_nothing
from .parser import build_parser

INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> int:
    """Run ``qd``; qdlib's errors and Ctrl-C end in one line on stderr (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QdError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        note = _one_line(exc.args[0]) if exc.args else ""  # the library may say what it kept
        note = note or KEPT_ON_INTERRUPT.get(args.command, kept_nothing)(args)
        print("\n" + (note if note.startswith("interrupted") else f"interrupted: {note}"), file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
