"""pytest set-up for the whole repository, the notebooks included (`pytest --nbval`, or one notebook alone).

- a quiet, offline, deterministic environment, set before any notebook kernel starts
  (``--nbval-current-env``: kernels inherit it), so progress bars, hub calls and HF warnings stay off;
- stderr of notebook cells is not compared (guarded to .ipynb files);
- no ``MPLBACKEND`` here: the kernels draw with matplotlib's inline backend (``qdlib.notebook.setup``), so every
  figure is stored in the notebook (nbval does not compare images);
- runs write to a temporary folder (``QD_RUNS``), never to tracked files.

The unit tests' fixtures live in ``tests/conftest.py``.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("QD_RUNS", tempfile.mkdtemp(prefix="qd-test-runs-"))
os.environ.pop("QD_MODEL", None)  # the tests choose their teacher explicitly


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
