"""The tiny examples in qdlib's docstrings run and give what they show."""

import doctest
import importlib
import pkgutil

import pytest

import qdlib

MODULES = sorted(m.name for m in pkgutil.iter_modules(qdlib.__path__, "qdlib."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"
