"""The examples in qdlib's docstrings run and give what they show.

They run offline on the bundled teacher, from a temporary working directory (examples that save,
such as ``draft.save_pretrained("my_draft")``, write there). Examples may also use the names of
``namespace`` below without defining them (``teacher``, ``tok``, ``draft``, ``input_ids``); only
an example that cannot run offline keeps ``# doctest: +SKIP``, with the reason next to it.
"""

import doctest
import importlib
import pkgutil

import pytest

import qdlib

MODULES = sorted(m.name for m in pkgutil.walk_packages(qdlib.__path__, "qdlib."))  # qdlib.train's modules too
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Modules without docstring examples, each with its reason; every other module must have at least one (a module
# without examples would pass the test below having checked nothing).
NO_EXAMPLES = {
    "qdlib.cli": "the `qd` command line: tests/test_cli.py runs its commands",
    "qdlib.cli.__main__": "`python -m qdlib.cli`: tests/test_handouts.py runs it",
    "qdlib.cli.bench": "`qd bench`: tests/test_cli.py and tests/test_bench.py run it",
    "qdlib.cli.commands": "the `qd` commands that load models: tests/test_cli.py runs each",
    "qdlib.cli.interrupt": "what Ctrl-C keeps: tests/test_cli.py interrupts commands",
    "qdlib.cli.parser": "the parser: tests/test_cli.py parses every command and checks every option's help",
    "qdlib.cli.shared": "loads the teacher: tests/test_cli.py runs the commands that use it",
    "qdlib.cli.train": "the training commands: tests/test_cli.py runs them with the trainers replaced",
    "qdlib.settings": "re-exports the config classes; their modules have the examples",
    "qdlib.settings.names": "names only: tests/test_cli.py checks the library acts on them",
    "qdlib.tour": "`qd tour` runs the course end to end for minutes: tests/test_tour.py runs it",
    "qdlib.train.loop": "fit() trains for many steps: tests/test_train_loop.py runs it for every recipe",
    "qdlib.train.evaluate": "scores a draft on teacher-continued prompts: tests/test_distill_train.py runs it",
}


@pytest.fixture(scope="module")
def namespace(tiny):
    """The bundled teacher, its tokenizer, the reference draft and a short prompt."""
    from qdlib import load_draft

    teacher, tok = tiny
    ids = tok("def read_lines(path):\n", return_tensors="pt").input_ids
    return {"teacher": teacher, "tok": tok, "draft": load_draft(), "input_ids": ids}


# modules whose examples run for many seconds (a whole small bench; knowledge caches): the full tier runs them
SLOW_EXAMPLES = {"qdlib.bench", "qdlib.knowledge"}


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_EXAMPLES else m
                                  for m in MODULES])
def test_docstring_examples(name, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs=namespace, optionflags=FLAGS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"
    if name in NO_EXAMPLES:
        assert result.attempted == 0, f"{name} has examples now: remove it from NO_EXAMPLES"
    else:
        assert result.attempted > 0, f"{name} has no docstring example: add one, or list it in NO_EXAMPLES with why"


ALL_SKIPPED: set = set()  # every module's examples run (through ``namespace`` where they need models)


def test_no_module_has_only_skipped_examples():
    """A module whose examples are all ``+SKIP`` is not checked by them at all."""
    finder = doctest.DocTestFinder()
    only_skipped = set()
    for name in MODULES:
        examples = [ex for t in finder.find(importlib.import_module(name)) for ex in t.examples]
        if examples and all(ex.options.get(doctest.SKIP) for ex in examples):
            only_skipped.add(name)
    assert only_skipped <= ALL_SKIPPED, only_skipped
