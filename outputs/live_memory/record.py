"""Write outputs/live_memory/record.json from the probe's runs (each arm's settings, its validation scores at its last
step from its log.jsonl, its fusion gates, and its in-loop acceptance on unfamiliar code from loop_acceptance.json,
which measure.py writes), then README.md from record.json alone (``readme_text``; a test re-renders it).

    python outputs/live_memory/record.py outputs/runs/probe24
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("none", "live25", "live05", "live3l")
FUSION_LR_SCALE = {"live25": 5, "live05": 5, "live3l": 10}  # as run.sh sets them


def gate_opening(weights: Path):
    """The mean |tanh(gate)| over every fusion channel (None without fusion)."""
    import torch
    from safetensors.torch import load_file
    gates = [torch.tanh(v.float()).abs() for k, v in load_file(str(weights)).items() if k.endswith(".gate")]
    return round(torch.cat(gates).mean().item(), 4) if gates else None


def build_record(runs: Path) -> dict:
    loop = json.loads((runs / "loop_acceptance.json").read_text())
    arms = {}
    for arm in ARMS:
        evals = [json.loads(x) for x in (runs / arm / "log.jsonl").read_text().splitlines() if '"eval"' in x]
        kb = json.loads((runs / arm / "best" / "config.json").read_text()).get("knowledge_enhancement") or {}
        arms[arm] = {"knowledge": {k: kb.get(k) for k in ("enabled", "memory", "memory_layers", "after_layers",
                                                          "gate_init")} | {"fusion_lr_scale": FUSION_LR_SCALE.get(arm)},
                     "mean_abs_tanh_gate": gate_opening(runs / arm / "best" / "model.safetensors"),
                     "step": evals[-1]["step"], "validation": evals[-1]["eval"],
                     "loop": loop[f"{arm}_150"], "loop_detached": loop.get(f"{arm}_150_detached")}
    return {"what": "one budget (150 steps from outputs/ablation_no_knowledge), four memories; validation = "
                    "teacher-forced on 32 held-out standard-library prompts (live at lag 1); loop = greedy "
                    "speculative_generate at gamma 1 on 24 unfamiliar-code prompts (outputs/heldout_code), 64 new "
                    "tokens each", "arms": arms,
            "committed": {k: loop[k] for k in ("committed_reference", "committed_ablation") if k in loop}}


HEADER = """# The live memory, measured (issue 24)

The seed's fusion blocks reading the teacher's own states of the verified text (`knowledge_enhancement.memory: live`,
`qdlib.memories`) instead of a static cache. Four continuations of the committed no-knowledge draft
(`outputs/ablation_no_knowledge`) under one budget, differing only in the memory; `run.sh` reproduces everything
(the runs are git-ignored), `record.py` wrote `record.json` and this table.

"""


def readme_text(record: dict) -> str:
    arms = record["arms"]
    rows = ["| arm | memory | fusion after draft layers | validation agreement (lag 1) | KL | in-loop acceptance, "
            "gamma 1, unfamiliar | same weights, memory detached |", "|---|---|---|---|---|---|---|"]
    for arm, r in arms.items():
        k, v = r["knowledge"], r["validation"]["heldout"]
        mem = f"live, teacher layers {k['memory_layers'] or 'last'}" if k["memory"] == "live" and k["enabled"] else "none"
        det = f"{r['loop_detached']['acceptance_rate']:.3f}" if r["loop_detached"] else "-"
        rows.append(f"| {arm} | {mem} | {k['after_layers'] if k['enabled'] else '-'} | {v['agreement']:.4f} | "
                    f"{v['kl']:.4f} | {r['loop']['acceptance_rate']:.3f} ({r['loop']['accepted']}/"
                    f"{r['loop']['proposed']}) | {det} |")
    for name, r in record["committed"].items():
        rows.append(f"| {name.replace('_', ' ')} (shipped) | - | - | - | - | {r['acceptance_rate']:.3f} | - |")
    base = arms["none"]["loop"]["acceptance_rate"]
    best = max(arms[a]["loop"]["acceptance_rate"] for a in arms if a != "none") - base
    gates = ", ".join(f"{a} {r['mean_abs_tanh_gate']}" for a, r in arms.items() if r["mean_abs_tanh_gate"] is not None)
    return HEADER + "\n".join(rows) + f"""

Every loop output was identical to `generate_plain`'s ({sum(r['loop']['identical'] for r in arms.values())} of
{sum(r['loop']['prompts'] for r in arms.values())} prompt runs). The best live arm gains {100 * best:+.1f} points of
in-loop acceptance over the no-memory arm trained under the same budget, against the issue's bar of +5 points and
0.80: a live memory read through the seed's gated cross-attention adds almost nothing to a draft that already
has six of the teacher's layers. The fusion gates barely opened: they start at |tanh(gate)| 0.10, and after
training their mean is {gates}.
"""


if __name__ == "__main__":
    record = build_record(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/runs/probe24"))
    (HERE / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    (HERE / "README.md").write_text(readme_text(record))
