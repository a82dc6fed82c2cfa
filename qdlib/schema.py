"""Config blocks as dataclasses whose fields declare their own check, once.

A field is declared with :func:`setting`: its default, what values are allowed
(a small check object that also writes the "allowed" text) and one line of help.
The same declaration serves the YAML loader, ``qd distill --set section.key=value``,
``qd distill --list-keys`` and the checks on a config edited in Python:

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo:
    ...     rate: float = setting(1e-3, Number(0, 1, low_open=True), "the step size")
    >>> d = Demo(rate="1e-3")          # what PyYAML makes of `rate: 1e-3`
    >>> field_problems(d, "demo"), d.rate
    ([], 0.001)
    >>> field_problems(Demo(rate=5), "demo")
    ['demo.rate=5 is out of range; allowed: a number in (0, 1]']

Checks return a problem (a phrase) or None; nothing here raises, so a loader can
collect every problem of a file and report them together. Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math

from .errors import ConfigError


class Check:
    """What a field allows: ``coerce`` (a value read as text becomes a number), ``problem`` and ``allowed``."""

    allowed = "any value"

    def coerce(self, v):
        return v

    def problem(self, v) -> str | None:
        return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numeric_text(v):
    """``"1e-3"`` -> 0.001: PyYAML reads exponent floats without a dot as text (YAML 1.1)."""
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return v
    return v


class Integer(Check):
    """An integer in ``[low, high]`` (either bound may be None)."""

    def __init__(self, low: int | None = None, high: int | None = None):
        self.low, self.high = low, high
        if low is not None and high is not None:
            self.allowed = f"an integer in {low}..{high}"
        elif low is not None:
            self.allowed = f"an integer >= {low}"
        else:
            self.allowed = "an integer"

    def coerce(self, v):
        f = _numeric_text(v)  # "1e3" -> 1000, "2.5" stays text (and is refused)
        return int(f) if isinstance(f, float) and math.isfinite(f) and f.is_integer() else v

    def problem(self, v):
        if not _is_int(v):
            return "is not an integer"
        if (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            return "is out of range"
        return None


class Number(Check):
    """A finite number between ``low`` and ``high``; ``*_open`` excludes the bound itself."""

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        if low is not None and high is not None:
            self.allowed = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            self.allowed = f"a number {'>' if low_open else '>='} {low}"
        else:
            self.allowed = "a number"

    def coerce(self, v):
        f = _numeric_text(v)
        return f if isinstance(f, float) else v

    def problem(self, v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return "is not a number"
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return "is out of range"
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return "is out of range"
        return None


class Choice(Check):
    """One of a fixed set of strings."""

    def __init__(self, *options: str, aliases: dict | None = None):
        self.options, self.aliases = options, aliases or {}
        self.allowed = ", ".join(options)

    def coerce(self, v):
        return self.aliases.get(v, v) if isinstance(v, (str, bool)) else v

    def problem(self, v):
        return None if v in self.options else "is unknown"


class Boolean(Check):
    allowed = "true or false"

    def problem(self, v):
        return None if isinstance(v, bool) else "is not true or false"


class IntList(Check):
    """A list of at least ``min_len`` integers, each at least ``low`` when given."""

    def __init__(self, min_len: int = 1, what: str = "integers", low: int | None = None):
        self.min_len, self.low = min_len, low
        self.allowed = f"a list of at least {min_len} {what}" + (f" (each >= {low})" if low is not None else "")

    def coerce(self, v):
        return list(v) if isinstance(v, tuple) else v

    def problem(self, v):
        if not isinstance(v, list) or len(v) < self.min_len or not all(_is_int(i) for i in v):
            return "is not allowed"
        if self.low is not None and any(i < self.low for i in v):
            return "is out of range"
        return None


class Choices(Check):
    """A list of at least ``min_len`` names, each one of ``options``.

    >>> Choices("ab", "cd").problem(["ab", "xy"]), Choices("ab").allowed
    ("names 'xy', which are not allowed", 'a list of: ab')
    """

    def __init__(self, *options: str, min_len: int = 1):
        self.options, self.min_len = options, min_len
        self.allowed = f"a list of: {', '.join(options)}"

    def coerce(self, v):
        return list(v) if isinstance(v, tuple) else v

    def problem(self, v):
        if not isinstance(v, list) or len(v) < self.min_len:
            return f"is not a list of at least {self.min_len}"
        bad = [x for x in v if x not in self.options]
        return f"names {', '.join(map(repr, bad))}, which are not allowed" if bad else None


class Weights(Check):
    """A mapping of names among ``keys`` to non-negative numbers with a positive sum (a data mixture).

    >>> Weights("a", "b").problem({"a": 1.0, "c": 2}), Weights("a").problem({"a": 0})
    ("names 'c', which are not allowed", 'has no positive weight')
    """

    def __init__(self, *keys: str):
        self.keys = keys
        self.allowed = f"weights >= 0 of {', '.join(keys)}, with a positive sum"

    def problem(self, v):
        if not isinstance(v, dict) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in v.values()):
            return "is not a mapping of names to numbers"
        bad = [k for k in v if k not in self.keys]
        if bad:
            return f"names {', '.join(map(repr, bad))}, which are not allowed"
        if any(w < 0 for w in v.values()):
            return "has a negative weight"
        return None if sum(v.values()) > 0 else "has no positive weight"


class Text(Check):
    """A non-empty string (a path, a name)."""

    allowed = "a non-empty string"

    def problem(self, v):
        return None if isinstance(v, str) and v.strip() else "is not a non-empty string"


class OrNull(Check):
    """``None`` (YAML ``null``) or what ``inner`` allows."""

    def __init__(self, inner: Check):
        self.inner = inner
        self.allowed = f"{inner.allowed} or null"

    def coerce(self, v):
        return v if v is None else self.inner.coerce(v)

    def problem(self, v):
        return None if v is None else self.inner.problem(v)


def setting(default, check: Check, doc: str):
    """A dataclass field with its check and one line of help (mutable defaults are copied per instance)."""
    meta = {"check": check, "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_problems(obj, section: str) -> list[str]:
    """Coerce ``obj``'s fields in place (numbers read as text) and return one line per bad value."""
    problems = []
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is None:
            continue
        value = check.coerce(getattr(obj, f.name))
        setattr(obj, f.name, value)
        why = check.problem(value)
        if why:
            problems.append(f"{section}.{f.name}={value!r} {why}; allowed: {check.allowed}")
    return problems


def field_ok(obj, name: str) -> bool:
    """Whether field ``name`` of ``obj`` passes its declared check (after :func:`field_problems` coerced it)."""
    check = next(f for f in dataclasses.fields(obj) if f.name == name).metadata.get("check", Check())
    return check.problem(getattr(obj, name)) is None


def unknown_key_problems(cls, section: str, data: dict) -> list[str]:
    """One problem naming every key of ``data`` that ``cls`` lacks, with the closest known names."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if not unknown:
        return []
    hints = {k: difflib.get_close_matches(str(k), names, n=1) for k in unknown}
    hints = {k: m[0] for k, m in hints.items() if m}
    if len(unknown) == 1 and hints:
        hint = f" (did you mean {next(iter(hints.values()))!r}?)"
    else:
        hint = f" (did you mean: {', '.join(f'{k!r} -> {m!r}' for k, m in hints.items())}?)" if hints else ""
    listing = "" if len(hints) == len(unknown) else f"; allowed: {names}"  # a hint for each says enough
    return [f"unknown {section} key(s) {unknown}{hint}{listing}"]


def parse_override(text: str) -> tuple[str, str, object]:
    """``"training.learning_rate=1.0e-3"`` -> ``("training", "learning_rate", 0.001)``; the value is read as YAML.

    >>> parse_override("knowledge_enhancement.after_layers=[2, 5]")
    ('knowledge_enhancement', 'after_layers', [2, 5])
    """
    import yaml

    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"--set {text!r} is not of the form section.key=value, e.g. training.learning_rate=1.0e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, name.strip(), value


def raise_problems(problems: list[str], where: str = "") -> None:
    """Raise one :class:`ConfigError` listing every problem (one line), if there are any."""
    if not problems:
        return
    prefix = f"{where}: " if where else ""
    if len(problems) == 1:
        raise ConfigError(prefix + problems[0])
    raise ConfigError(prefix + f"{len(problems)} problems: " + "; ".join(problems))


class Checked:
    """The base of a settings dataclass: when a config is made (and on :meth:`validate`) every declared field is
    coerced and checked, then :meth:`related_problems` checks what relates two fields; one :class:`ConfigError`
    names each bad value and what is allowed. A subclass names its ``section`` (the prefix of each key).

        >>> @dataclasses.dataclass
        ... class Window(Checked):
        ...     section = "window"
        ...     low: int = setting(0, Integer(0), "first index")
        ...     high: int = setting(8, Integer(1), "one past the last")
        ...     def related_problems(self):
        ...         ok = field_ok(self, "low") and field_ok(self, "high")
        ...         return [] if not ok or self.low < self.high else [f"window.low={self.low} must be below high"]
        >>> Window(low="2").low
        2
        >>> Window(low=9)
        Traceback (most recent call last):
        ...
        qdlib.errors.ConfigError: window.low=9 must be below high
    """

    section = ""

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Coerce and check every field, then their relations; raise one ConfigError listing every problem."""
        problems = field_problems(self, self.section)
        raise_problems(problems + self.related_problems())
        return self

    def related_problems(self) -> list[str]:
        """The problems of fields that are fine alone but not together (none here); a relation whose field is
        already reported (:func:`field_ok`) is skipped."""
        return []


def describe(cls_or_obj, section: str) -> list[str]:
    """``section.key = value  # allowed; help`` for every field: the defaults of a class, the values of an instance."""
    lines = []
    for f in dataclasses.fields(cls_or_obj):
        if isinstance(cls_or_obj, type):
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        else:
            value = getattr(cls_or_obj, f.name)
        check = f.metadata.get("check", Check())
        lines.append(f"{section}.{f.name} = {json.dumps(value)}  # {check.allowed}; {f.metadata.get('doc', '')}")
    return lines


# Settings renamed so that every trainer calls one concept by one name (the distillation config's names); a config
# written before (a run's config.json, a checkpoint, a card's metrics.json) is read through :func:`renamed`.
RENAMED = {"lr": "learning_rate", "ul_lr": "ul_learning_rate", "batch_rows": "batch_size", "seq_len": "max_seq_length",
           "grad_clip": "max_grad_norm", "ckpt_every": "checkpoint_every", "bf16": "mixed_precision"}
_BF16_CHOICE = {None: "auto", True: "bf16", False: "no"}


def renamed(settings: dict) -> dict:
    """``settings`` with the names :data:`RENAMED` retired replaced by today's (``bf16`` true/false/null becomes
    ``mixed_precision`` bf16/no/auto); nested sections too.

    >>> renamed({"lr": 0.1, "bf16": None, "training": {"steps": 3}})
    {'learning_rate': 0.1, 'mixed_precision': 'auto', 'training': {'steps': 3}}
    """
    out = {}
    for k, v in settings.items():
        if k == "bf16" and "mixed_precision" not in settings:
            out["mixed_precision"] = _BF16_CHOICE.get(v, v)
        elif k in RENAMED and RENAMED[k] not in settings:
            out[RENAMED[k]] = v
        else:
            out[k] = renamed(v) if isinstance(v, dict) else v
    return out
