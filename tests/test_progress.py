"""progress_bar: TQDM_DISABLE silences qdlib's bars, the Jupyter widget bar included."""

import pytest

from qdlib.progress import progress_bar


def test_env_disables_the_notebook_widget_bar_that_plain_tqdm_leaves_on(monkeypatch):
    import tqdm.auto
    import tqdm.notebook

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.notebook.tqdm)  # what tqdm.auto gives inside Jupyter
    bar = progress_bar(total=3)
    assert bar.disable
    bar.close()


@pytest.mark.parametrize("env, enabled, disabled", [("", True, False), ("0", True, False), ("1", True, True),
                                                     ("true", True, True), ("", False, True)])
def test_enabled_and_env(monkeypatch, env, enabled, disabled):
    monkeypatch.setenv("TQDM_DISABLE", env)
    bar = progress_bar(range(2), enabled=enabled, desc="t")
    assert bar.disable is disabled
    assert list(bar) == [0, 1]
