"""The benchmark's report: Markdown tables, JSON and plots of a :func:`qdlib.bench.run_bench` result.

:mod:`qdlib.bench` measures; this module only reads the report dict it returns
(and the ``report.json`` written here), so a committed report renders again
without running anything (``tests/test_bench_reference.py``):

    >>> from qdlib import paths
    >>> from qdlib.report import load_report, report_markdown
    >>> md = report_markdown(load_report(paths.BENCH_DIR))
    >>> md.startswith("# qd bench")
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bench import BUSY_MARGIN
from .bench_methods import DRAFT_OF, method_label
from .settings.bench import KINDS
from .errors import MissingFileError
from .io import atomic_dir, write_json_atomic


def headline(report: dict, kind: str = "code") -> dict:
    """The performance bar's numbers: qdlib speculative vs the teacher's generate and vs matched assisted generation."""
    rows = {(r["method"], r["mode"]): r for r in report["rows"] if r["kind"] == kind}
    spec, assisted = rows.get(("spec", "greedy")), rows.get(("assisted_matched", "greedy"))
    out = {"kind": kind}
    if spec:
        out.update(speedup=spec["speedup"], identical=spec["identical"], prompts=spec["prompts"])
        out["bar_2x"] = spec["speedup"] >= 2.0 and spec["identical"] == spec["prompts"]
    if spec and assisted:
        out["over_assisted_matched"] = spec["tokens_per_s"] / assisted["tokens_per_s"]
    return out


def _fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _vs_plain(row: dict, rows: list[dict]) -> str:
    """The row's speed-up over generate_plain (the same engine without a draft), from the row or, in reports written
    before it was stored, from the plain loop's row of the same table; "-" where the table has no plain loop."""
    if "speedup_vs_plain" in row:
        return f"{row['speedup_vs_plain']:.2f}x"
    plain = next((r for r in rows if r["method"] == "teacher_plain"), None)
    return f"{row['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if plain else "-"


def report_markdown(report: dict) -> str:
    """The report as Markdown tables (one per prompt kind and mode), with costs and the sweep."""
    env = report["environment"]
    card = report["draft"].get("card")
    trained = f" ({card['steps']} training steps, test agreement {card['agreement']:.3f})" if card else ""
    lines = [f"# qd bench: {report['teacher']} teacher, draft layers {report['draft']['layers']}{trained}", "",
             f"{env['cpu']}, {env['torch_threads']} torch threads; Python {env['python']}, torch {env['torch']}, "
             f"transformers {env['transformers']}, qdlib {env['qdlib']}. "
             f"{report['config']['max_new_tokens']} new tokens per prompt, gamma {report['config']['gamma']}, "
             f"median of {report['config']['repeats']} repeats; run took {report['seconds']:.0f} s.", ""]
    for kind in KINDS:
        for mode in ("greedy", "sampling"):
            lines += _table_lines(report, kind, mode)
    c = report["costs"]
    lines += ["## Costs", "", f"One teacher step: {c['teacher_step_ms']:.2f} ms. Draft/teacher step ratio c: " +
              ", ".join(f"{k} {v:.3f}" for k, v in c["c"].items()) + ". Verification of g+1 tokens, in teacher steps: " +
              ", ".join(f"g={g}: {v:.2f}" for g, v in c["verify_cost"].items()) + ".", ""]
    lines += _split_lines(c.get("verify_split"))
    lines += _time_lines(report)
    lines += _sweep_lines(report)
    h = headline(report)
    if "speedup" in h:
        lines += [f"**Headline** (held-out code, greedy): qdlib speculative decoding is {h['speedup']:.2f}x the teacher's "
                  f"own `generate`, output identical on {h['identical']}/{h['prompts']} prompts"
                  + (f", {h['over_assisted_matched']:.2f}x transformers assisted generation with matched settings"
                     if "over_assisted_matched" in h else "") + ".", ""]
    return "\n".join(lines)


def _kind_name(kind: str) -> str:
    return {"code": "held-out code", "unfamiliar": "unfamiliar third-party code", "yours": "your code"}.get(
        kind, "knowledge paraphrases")


def _table_lines(report: dict, kind: str, mode: str) -> list[str]:
    """One kind's table in one mode (nothing when it has no rows), with the busy-machine note and the agreement."""
    rows = [r for r in report["rows"] if r["kind"] == kind and r["mode"] == mode]
    if not rows:
        return []
    what = _kind_name(kind)
    lines = [f"## {what}, {mode}" + (f" (temperature {report['config']['temperature']})" if mode == "sampling" else ""),
             "", "| method | tokens/s | speed-up | vs plain loop | worst / median / best prompt | acceptance rate "
             "| tokens/target call | c | identical |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cc = report["costs"]["c"].get(DRAFT_OF.get(r["method"], r["method"]))
        ident = f"{r['identical']}/{r['prompts']}" if "identical" in r else "(sampled)"
        pp = r.get("per_prompt")
        spread = f"{pp['worst']:.2f} / {pp['median']:.2f} / {pp['best']:.2f}" if pp else "–"
        speed = (f"unreliable (busy machine: repeats differ by {r['repeat_spread']:.0%})" if r.get("unreliable")
                 else f"{r['speedup']:.2f}x")
        lines.append(f"| {r['label']} | {r['tokens_per_s']:.1f} | {speed} | {_vs_plain(r, rows)} | {spread} "
                     f"| {_fmt(r.get('acceptance'))} | {_fmt(r['tokens_per_target_call'])} | {_fmt(cc)} | {ident} |")
    busy = [r for r in rows if r.get("unreliable")]
    if busy:
        lines += ["", f"**The machine was busy**: the repeats of {len(busy)} method(s) differ by more than "
                      f"{BUSY_MARGIN:.0%} of their median, so those rows are not results. Rerun with nothing "
                      "else running."]
    a = report["alpha"].get(kind)
    if a:
        lines += ["", f"Teacher-forced agreement of the draft on these prompts: {a['agreement']:.3f} "
                      f"(sum-min alpha {a['alpha']:.3f}, {a['positions']} positions). \"acceptance rate\" in the table "
                      "is accepted over proposed draft tokens: a round stops at its first rejection, so it is "
                      "lower than the per-token agreement. A token tree proposes every node but keeps one path, so "
                      "its rate is lower still; compare trees with chains by tokens per target call."]
    return lines + [""]


def _sweep_lines(report: dict) -> list[str]:
    """The gamma sweep's table (nothing without a sweep)."""
    if not report["sweep"]:
        return []
    lines = [f"## Gamma sweep (held-out code, greedy, {report['config']['sweep_prompts']} prompts)", "",
             "Fewer prompts than the tables above, so its gamma-4 row need not match them. The theory columns use "
             "the micro-benchmark costs above (c and the verification costs); notebook 06 shows that the costs "
             "measured inside the loop are higher and bring the theory down to the measurement.", "",
             "| gamma | speed-up vs generate | vs plain loop | theory vs plain loop | tokens/call | theory tokens/call |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s['gamma']} | {s['speedup_vs_generate']:.2f}x | {s['speedup_vs_plain']:.2f}x | "
              f"{s['theory_speedup_vs_plain']:.2f}x | {s['tokens_per_target_call']:.2f} | {s['theory_tokens_per_call']:.2f} |"
              for s in report["sweep"]]
    return lines + [""]


def free_drafting_bound(row: dict) -> float | None:
    """The speed-up over the plain loop that the same rounds would reach if drafting cost nothing: the measured
    speed-up divided by the share of the time not spent drafting (None without a split or a plain-loop ratio).

    >>> free_drafting_bound({"speedup_vs_plain": 1.5, "time_split": {"draft": 0.25, "verify": 0.7, "other": 0.05}})
    2.0
    """
    split, ratio = row.get("time_split"), row.get("speedup_vs_plain")
    if not split or ratio is None or split["draft"] >= 1:
        return None
    return ratio / (1 - split["draft"])


def _time_lines(report: dict) -> list[str]:
    """Per kind, where each speculative method's time goes (greedy), and its bound if drafting were free."""
    lines = []
    for kind in KINDS:
        rows = [r for r in report["rows"] if r["kind"] == kind and r["mode"] == "greedy" and "time_split" in r
                and r["group"] != "baseline" and "speedup_vs_plain" in r]
        if not rows:
            continue
        what = _kind_name(kind)
        lines += [f"Where the time goes ({what}, greedy; shares from the first repeat). The last column divides the "
                  "speed-up over the plain loop by the share not spent drafting: what the same rounds would reach "
                  "if drafting cost nothing, the most a cheaper draft of the same acceptance can give.", "",
                  "| method | draft | verify | other | vs plain loop | if drafting were free |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['time_split']['draft']:.0%} | {r['time_split']['verify']:.0%} | "
                  f"{r['time_split']['other']:.0%} | {r['speedup_vs_plain']:.2f}x | {free_drafting_bound(r):.2f}x |"
                  for r in rows]
        lines.append("")
    return lines


def _split_lines(split: dict | None) -> list[str]:
    """The verification cost v(g), split into arithmetic and overhead, before (transformers) and after (qdlib)."""
    if not split:
        return []
    lines = ["Where a verification pass's extra cost goes (`qdlib.timing.verify_split`, isolated, medians): v(g) = one "
             "pass over g+1 tokens / one step of the same forward = 1 + arithmetic + overhead, where arithmetic is the "
             "pass's own matrix products run alone (weights read from memory as the pass reads them) and overhead "
             "everything else (norms, attention, cache writes, Python).", "",
             "| forward | step (ms) | g | v(g) | arithmetic | overhead |", "|---|---:|---:|---:|---:|---:|"]
    for engine, sp in split.items():
        for r in sp["rows"]:
            lines.append(f"| {engine} | {sp['step_ms']:.1f} | {r['gamma']} | {r['v']:.2f} | {r['v_arithmetic']:+.2f} "
                         f"| {r['v_overhead']:+.2f} |")
    return lines + [""]


def plot_report(report: dict):
    """One figure: speed-ups per method and kind (left), the gamma sweep with theory (right)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    greedy = [r for r in report["rows"] if r["mode"] == "greedy"]
    names = list(dict.fromkeys(r["method"] for r in greedy))
    kinds = [k for k in KINDS if any(r["kind"] == k for r in greedy)]
    w = 0.8 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        vals = {r["method"]: r for r in greedy if r["kind"] == kind}
        ys = [vals[n]["speedup"] if n in vals else 0 for n in names]
        bars = a.barh([i + j * w for i in range(len(names))], ys, height=w, label=kind)
        for bar_, n in zip(bars, names):
            r = vals.get(n)
            if r and "identical" in r and r["identical"] != r["prompts"]:
                a.text(bar_.get_width(), bar_.get_y() + w / 2, " output differs", va="center", fontsize=7)
    a.set_yticks([i + w * (len(kinds) - 1) / 2 for i in range(len(names))], [method_label(n)[0] for n in names], fontsize=8)
    a.axvline(1.0, color="grey", lw=0.8)
    a.axvline(2.0, color="grey", lw=0.8, ls="--")
    a.invert_yaxis()
    a.set_xlabel("speed-up over the teacher's greedy generate")
    a.legend(title="prompts")
    if report["sweep"]:
        s = report["sweep"]
        gs = [x["gamma"] for x in s]
        b.plot(gs, [x["theory_speedup_vs_plain"] for x in s], "-", label="theory (vs plain loop)")
        b.plot(gs, [x["speedup_vs_plain"] for x in s], "o", label="measured vs plain loop")
        b.plot(gs, [x["speedup_vs_generate"] for x in s], "s", label="measured vs generate")
        b.set_xlabel("gamma (draft tokens per round)")
        b.set_ylabel("speed-up")
        b.set_title(f"agreement (greedy alpha) {report['alpha']['code']['agreement']:.2f}, c {report['costs']['c']['spec']:.2f}", fontsize=9)
        b.legend(fontsize=8)
    else:
        b.axis("off")
    fig.tight_layout()
    return fig


def write_report(report: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``report.json``, ``report.md`` and ``bench.png`` into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(report_markdown(report), encoding="utf-8")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = plot_report(report)
        fig.savefig(tmp / "bench.png", dpi=110)
        plt.close(fig)
    return out_dir


def load_report(path: str | os.PathLike) -> dict:
    """Read a report written by :func:`write_report` (a folder or its ``report.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise MissingFileError(f"no bench report at {path}; run `qd bench` first")
    return json.loads(path.read_text(encoding="utf-8"))
