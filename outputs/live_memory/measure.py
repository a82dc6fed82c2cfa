"""In-loop depth-1 acceptance (greedy speculative_generate at gamma 1) on the unfamiliar-code set, for the probe's
four drafts (each also with its memory detached) and the two shipped drafts; writes RUNS/loop_acceptance.json.

    python outputs/live_memory/measure.py 24 outputs/runs/probe24
"""
import json
import sys

import torch

from qdlib import load_draft, load_teacher
from qdlib.bench_methods import loop_acceptance
from qdlib.heldout_code import heldout_code_prompts

torch.manual_seed(0)
teacher, tok = load_teacher("tiny")
prompts = heldout_code_prompts(tok, n_prompts=int(sys.argv[1]), prompt_tokens=64, seed=0)
P = sys.argv[2] if len(sys.argv) > 2 else "outputs/runs/probe24"
out = {}
for name, folder in [("committed_reference", "outputs/reference_draft"),
                     ("committed_ablation", "outputs/ablation_no_knowledge"),
                     ("none_150", f"{P}/none/best"), ("live25_150", f"{P}/live25/best"),
                     ("live05_150", f"{P}/live05/best"), ("live3l_150", f"{P}/live3l/best")]:
    d = load_draft(folder).float().eval()
    out[name] = loop_acceptance(teacher, d, prompts, gamma=1, max_new_tokens=64)
    print(name, json.dumps(out[name]), flush=True)
    if getattr(d, "knowledge", None) is not None:
        d.set_knowledge(None)
        out[name + "_detached"] = loop_acceptance(teacher, d, prompts, gamma=1, max_new_tokens=64)
        print(name + "_detached", json.dumps(out[name + "_detached"]), flush=True)
with open(f"{P}/loop_acceptance.json", "w") as f:
    json.dump(out, f, indent=1)
