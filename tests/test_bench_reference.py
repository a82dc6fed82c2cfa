"""The committed benchmark report is complete and self-consistent (its tables were written from its JSON)."""

import pytest

from qdlib import paths
from qdlib.report import headline, load_report, report_markdown
from qdlib.settings import METHODS


@pytest.fixture(scope="module")
def report():
    return load_report(paths.BENCH_DIR)


def test_reference_report_covers_every_method_and_kind(report):
    greedy = {(r["method"], r["kind"]) for r in report["rows"] if r["mode"] == "greedy"}
    # the committed report was written before the fast draft, the hybrid drafter and the unfamiliar-code prompts
    # existed (outputs/bench_fast has the fast rows); a report written since records the methods it ran, and a
    # refreshed reference report (`qd bench --out outputs/bench_reference`) covers all of them
    kinds = ("code", "unfamiliar", "paraphrase") if "unfamiliar" in report["prompts"] else ("code", "paraphrase")
    newer = {"fast", "hybrid", "fast_chain", "fast_lookup", "context_lookup", "teacher_plain_hf"}  # added since
    methods = report["config"].get("method_names") or [m for m in METHODS if m not in newer]
    assert set(methods) >= set(METHODS) - newer - {"spec_no_cache"}
    assert greedy == {(m, k) for m in methods for k in kinds}
    assert any(r["mode"] == "sampling" for r in report["rows"])
    assert [s["gamma"] for s in report["sweep"]] == list(range(1, 9))
    assert report["draft"]["knowledge"] and report["draft"]["layers"] == [0, 5, 11, 16, 22, 27]
    assert report["environment"]["cpu"] and report["environment"]["torch_threads"] >= 1


def test_reference_report_lossless_rows_and_tables(report):
    for r in report["rows"]:
        if r["mode"] == "greedy" and r["group"] in ("baseline", "qdlib", "ablation"):
            assert r["identical"] == r["prompts"], r["label"]
    h = headline(report)
    spec = next(r for r in report["rows"] if (r["method"], r["kind"], r["mode"]) == ("spec", "code", "greedy"))
    assert h["speedup"] == spec["speedup"]
    assert (paths.BENCH_DIR / "report.md").read_text() == report_markdown(report)
    assert (paths.BENCH_DIR / "bench.png").stat().st_size > 10_000


def test_fast_bench_report_shows_the_fast_draft_beside_the_reference_on_unfamiliar_code():
    fast = load_report(paths.OUTPUTS_DIR / "bench_fast")
    rows = {(r["method"], r["kind"], r["mode"]): r for r in fast["rows"]}
    for kind in ("unfamiliar", "code"):
        for method in ("fast", "spec", "spec_no_cache"):
            r = rows[(method, kind, "greedy")]
            assert r["identical"] == r["prompts"] == 8, (method, kind)  # lossless
            plain = rows[("teacher_plain", kind, "greedy")]["tokens_per_s"]
            assert r["speedup_vs_plain"] == pytest.approx(r["tokens_per_s"] / plain)  # both speed-ups reported
        assert ("fast", kind, "sampling") in rows
    committed = __import__("json").loads((paths.FAST_DRAFT_DIR / "config.json").read_text())
    assert fast["config"]["max_new_tokens"] == 96 and fast["fast_draft"]["num_layers"] == committed["num_layers"]
    assert fast["costs"]["c"]["fast"] < fast["costs"]["c"]["spec_no_cache"]
    assert (paths.OUTPUTS_DIR / "bench_fast" / "report.md").read_text() == report_markdown(fast)
