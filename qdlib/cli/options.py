"""The ``qd`` command's option types, and the options each config's schema makes (:func:`add_settings`).

A command whose work a config describes (``train-fast``: :class:`~qdlib.settings.FeatureTrainConfig`, ...) gets
one option per field of it, named as the field (``--learning-rate``), with the field's help, what it allows and
its default; ``--set SECTION.KEY=VALUE`` for the same keys, and ``--list-keys``. The options only carry text:
the config's own checks judge it (:func:`settings_from`), so the command line, a YAML file and Python code are
refused by the same words.

    >>> import argparse
    >>> from qdlib.settings import FeatureTrainConfig
    >>> p = argparse.ArgumentParser()
    >>> add_settings(p, FeatureTrainConfig, "fast", aliases={"learning_rate": ["--lr"]})
    >>> args = p.parse_args(["--steps", "20", "--lr", "3e-3", "--set", "fast.warmup_steps=5"])
    >>> cfg = settings_from(args)
    >>> cfg.steps, cfg.learning_rate, cfg.warmup_steps
    (20, 0.003, 5)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

from ..schema import (Boolean, Choices, IntList, OrNull, Weights, describe, parse_override, raise_problems,
                      unknown_key_problems)

# ----------------------------------------------------------------------------- option types (checked by argparse)


def _at_least(low, cast, kind: str):
    """An argparse type: text read by ``cast`` (int or float) and refused below ``low`` (or infinite)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}; allowed: {kind} >= {low}") from None
        if not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; allowed: {kind} >= {low}")
        return value

    parse.__name__ = f"{kind.split()[-1]} >= {low}"
    return parse


def int_at_least(low: int):
    return _at_least(low, int, "an integer")


def number_at_least(low: float):
    return _at_least(low, float, "a number")


DEVICES = "cpu, cuda, cuda:N, mps or auto"


def device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; allowed: {DEVICES}")
    return text


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: ...``, exit status 2), like qdlib's own."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def opt(parser, *names, **kwargs):
    """``add_argument`` that insists on help text (a test checks every option has some)."""
    if not kwargs.get("help"):
        raise TypeError(f"option {names[0]} needs help text")
    return parser.add_argument(*names, **kwargs)


def common(parser, *, device_help: str = "cpu (default), cuda, cuda:N, mps or auto (cuda, then mps, then cpu)"):
    """``--model`` and ``--device``: the teacher a command loads, and where."""
    opt(parser, "--model", default=None, help="teacher: 'tiny' (bundled), a hub id or a folder; default: $QD_MODEL or tiny")
    opt(parser, "--device", type=device, default=None, help=device_help)


# ----------------------------------------------------------------------------- options made from a config's schema


def _check_of(f) -> object:
    check = f.metadata.get("check")
    return check.inner if isinstance(check, OrNull) else check


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def add_settings(parser, cls, section: str, *, aliases: dict | None = None, with_set: bool = True) -> None:
    """One option per field of ``cls`` (``--field-name``, plus ``aliases[field]``), then ``--set`` and ``--list-keys``.

    Every option defaults to None (= the config's default), so :func:`settings_from` sees which were given.
    ``with_set=False``: the command declares ``--set`` and ``--list-keys`` itself (``qd distill``: many sections).
    """
    aliases = aliases or {}
    group = parser.add_argument_group(f"settings ({section}.KEY; `--list-keys` shows each value)")
    for f in dataclasses.fields(cls):
        check = _check_of(f)
        names = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, ())]
        kw = {"dest": f"setting__{f.name}", "default": None,
              "help": f"{f.metadata.get('doc', '')} ({f.metadata['check'].allowed}; default {json.dumps(_default(f))})"}
        if isinstance(check, Boolean):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(check, (IntList, Choices)):
            kw.update(nargs="+", metavar="VALUE")
        else:
            kw["metavar"] = "MAPPING" if isinstance(check, Weights) else "VALUE"
        opt(group, *names, **kw)
    if with_set:
        opt(parser, "--set", action="append", default=None, metavar=f"{section}.KEY=VALUE",
            help="set one key, checked like the options (repeatable; an option above wins over it)")
        opt(parser, "--list-keys", action="store_true",
            help="list every key with its value (after the options and --set) and what is allowed, then stop")
    parser.set_defaults(settings=(cls, section))


def _as_yaml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return value


def option_overrides(args, section: str) -> list[str]:
    """The schema options given, as ``section.key=value`` strings (after ``--set``'s own, so that they win)."""
    given = [(k[len("setting__"):], v) for k, v in vars(args).items() if k.startswith("setting__") and v is not None]
    return list(getattr(args, "set", None) or []) + [f"{section}.{k}={_as_yaml(v)}" for k, v in given]


def settings_from(args, preset: dict | None = None):
    """The command's config: its defaults (with ``preset``'s values over them), then ``--set``, then the options
    (which win).

    Every unknown key and bad value is named at once (one :class:`~qdlib.errors.ConfigError`).
    """
    cls, section = args.settings
    values, problems = dict(preset or {}), []
    for text in option_overrides(args, section):
        where, key, value = parse_override(text)
        if where != section:
            problems.append(f"--set {text!r}: this command's keys are {section}.KEY (`--list-keys` shows them)")
        else:
            values[key] = value
    problems += unknown_key_problems(cls, section, values)
    raise_problems(problems)
    return cls(**values)  # each config checks all its fields when made (its __post_init__)


def listed(args, cfg) -> bool:
    """With ``--list-keys``, print every key of ``cfg`` with its value, what is allowed and what it does (and the
    command stops: True)."""
    if args.list_keys:
        print("\n".join(describe(cfg, args.settings[1])))
    return args.list_keys
