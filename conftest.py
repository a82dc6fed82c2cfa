"""pytest set-up for the whole repository, the notebooks included (`pytest --nbval`, or one notebook alone).

- a quiet, offline, deterministic environment, set before any notebook kernel starts
  (``--nbval-current-env``: kernels inherit it), so progress bars, hub calls and HF warnings stay off;
- stderr of notebook cells is not compared (guarded to .ipynb files);
- no ``MPLBACKEND`` here: the kernels draw with matplotlib's inline backend (``qdlib.notebook.setup``), so every
  figure is stored in the notebook (nbval does not compare images);
- runs write to a temporary folder (``QD_RUNS``), never to tracked files;
- under ``pytest -n N`` (pytest-xdist, the README's test command) each worker gets its own run folder and its share
  of the cores as torch threads (its notebook kernels inherit both), so N workers do not oversubscribe the machine.

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

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... in a worker of `pytest -n N`; None otherwise
if WORKER:
    threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads  # read when torch is first imported
    os.environ["QD_RUNS"] = tempfile.mkdtemp(prefix=f"qd-test-runs-{WORKER}-")
os.environ.pop("QD_MODEL", None)  # the tests choose their teacher explicitly


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
