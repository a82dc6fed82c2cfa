import nbformat as nbf

def build(cells, path):
    nb = nbf.v4.new_notebook()
    out = []
    for c in cells:
        kind, src = c[0], c[1].strip("\n")
        tags = c[2] if len(c) > 2 else []
        if kind == "md":
            cell = nbf.v4.new_markdown_cell(src)
        else:
            if src.rstrip().endswith(";") and "check(" in src:
                src = src.rstrip()[:-1]
                i = src.rfind("check(")
                if i == 0 or src[i - 1] == "\n":
                    src = src[:i] + "_ = " + src[i:]
            cell = nbf.v4.new_code_cell(src)
        if tags:
            cell.metadata["tags"] = list(tags)
        out.append(cell)
    nb.cells = out
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbf.write(nb, path)

SETUP = '''# Setup: versions, seed, device. Quiet progress bars and library warnings.
import os
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import warnings
warnings.filterwarnings("ignore")
import torch, transformers
import matplotlib
import matplotlib.pyplot as plt
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
import qdlib

torch.manual_seed(0)
DEVICE = "cpu"  # everything in this course runs on a laptop CPU; qdlib.load_teacher(device="auto") picks a GPU
print("qdlib", qdlib.__version__, "| torch", torch.__version__.split("+")[0], "| transformers", transformers.__version__)'''

SETUP_VERSIONS = '''# NBVAL_IGNORE_OUTPUT
print("torch threads:", torch.get_num_threads(), "| teacher:", os.environ.get("QD_MODEL") or "tiny (bundled)")'''
