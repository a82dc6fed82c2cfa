"""The committed benchmark report is complete and self-consistent (its tables were written from its JSON)."""

import pytest

from qdlib import paths
from qdlib.report import METHODS, headline, load_report, report_markdown

pytestmark = pytest.mark.skipif(not (paths.BENCH_DIR / "report.json").exists(), reason="no committed bench report")


@pytest.fixture(scope="module")
def report():
    return load_report(paths.BENCH_DIR)


def test_reference_report_covers_every_method_and_kind(report):
    greedy = {(r["method"], r["kind"]) for r in report["rows"] if r["mode"] == "greedy"}
    assert greedy == {(m, k) for m in METHODS for k in ("code", "paraphrase")}
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
