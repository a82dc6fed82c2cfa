SETUP = '''# Setup: imports, seed, device; progress bars and library warnings kept quiet.
import os
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import time, warnings
warnings.filterwarnings("ignore")
import torch, transformers
import matplotlib.pyplot as plt
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
import qdlib

torch.manual_seed(0)
DEVICE = "cpu"  # the course runs on a laptop CPU; load_teacher(device="auto") would pick a GPU
print("device:", DEVICE)'''

VERSIONS = '''print("qdlib", qdlib.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| threads", torch.get_num_threads())'''

