"""The errors qdlib raises on purpose, under one base class.

Every error that qdlib raises because of something the user can fix (a missing
model, a bad config value, a stale knowledge cache) derives from
:class:`QdError`, so one ``except QdError`` catches them all; the ``qd`` command
does exactly that once and prints the message as one line. Each class also keeps
the builtin it subclassed before (``ValueError``, ``RuntimeError``), so code
written against those still works:

    >>> issubclass(ConfigError, QdError) and issubclass(ConfigError, ValueError)
    True

This module imports nothing, so anything in qdlib can import it.
"""

from __future__ import annotations


class QdError(Exception):
    """Base of qdlib's own errors; the message says what failed and what to do.

    ``exit_code`` is the status the ``qd`` command exits with (2: the request
    could not be carried out as given).
    """

    exit_code = 2


class ConfigError(QdError, ValueError):
    """A configuration value, key or argument is not allowed; the message names it and what is."""


class MissingFileError(QdError, FileNotFoundError):
    """A file the user named (a config, an item list) does not exist; the message says what to use instead."""


class DamagedFileError(QdError, RuntimeError):
    """A file qdlib reads (weights, a knowledge cache, a checkpoint) is truncated or corrupt; the message names it
    and says how to get a good copy (``git checkout`` for a committed one, or the command that writes it)."""
