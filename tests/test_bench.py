"""qd bench: every method on the same prompts, lossless rows identical, a complete report; the n-gram drafter."""

import json
import re

import pytest
import torch

from qdlib import build_draft, paths, sample_layers
from qdlib.bench import (BUSY_MARGIN, METHODS, SAMPLING_METHODS, BenchConfig, code_prompts, run_bench, capstone_score,
                         teacher_forced_alpha)
from qdlib.bench_methods import CallCounter, ablation_drafts, loop_acceptance
from qdlib.report import free_drafting_bound, headline, load_report, report_markdown, write_report
from qdlib.feature_draft import build_feature_draft
from qdlib.errors import ConfigError
from qdlib.lookup import NgramDrafter
from qdlib.speculative import speculative_generate

from helpers import tiny_qwen3


# ----------------------------------------------------------------------------- the n-gram drafter


def test_ngram_drafter_prefers_the_longest_and_latest_match():
    d = NgramDrafter([[1, 2, 3, 4], [9, 2, 3, 7, 8], [5, 3, 6]], max_n=3, min_n=1)
    assert d.propose([0, 9, 2, 3], 2) == [7, 8]  # (9, 2, 3) is the longest suffix found
    assert d.propose([0, 1, 2, 3], 3) == [4]  # (1, 2, 3): only one token follows
    assert d.propose([0, 0, 3], 1) == [6]  # (3,) alone: the latest occurrence wins
    assert d.propose([42], 4) == []
    ctx = NgramDrafter([], max_n=2, include_context=True)
    assert ctx.propose([4, 5, 6, 7, 4, 5], 2) == [6, 7]  # prompt-lookup style, from the context itself
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter([[1]], max_n=1, min_n=2)


def test_ngram_drafter_decoding_is_lossless_and_accepts_copied_text():
    target = tiny_qwen3(layers=6, seed=11)
    ids = torch.randint(2, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=1)
    right = ref[0].tolist()
    wrong = right[:10] + [(t + 7) % 256 for t in right[10:]]  # the same start, then a wrong continuation
    for store in ([right], [wrong], [[3, 4, 5]]):
        drafter = NgramDrafter(store, max_n=3, min_n=2)
        out, stats = speculative_generate(target, drafter, ids, gamma=4, max_new_tokens=24, eos_token_id=-1)
        assert out[0].tolist() == right[: out.shape[1]] and out.shape[1] == ids.shape[1] + 24
        if store == [right]:
            assert stats.accepted >= 12 and stats.tokens_per_target_call > 2
    with pytest.raises(TypeError, match="propose"):
        speculative_generate(target, object(), ids)


# ----------------------------------------------------------------------------- costs and counts


def test_call_counter_counts_forward_calls():
    m = torch.nn.Linear(2, 2)
    with CallCounter(m=m, absent=None) as n:
        m(torch.zeros(1, 2))
        m(torch.zeros(3, 2))
    m(torch.zeros(1, 2))  # after the block: not counted, hooks removed
    assert n == {"m": 2} and not m._forward_pre_hooks


def test_loop_acceptance_counts_what_the_loop_accepted_and_checks_the_output():
    target = tiny_qwen3(layers=4, seed=3)
    prompts = [[5, 9, 11, 7], [3, 3, 8]]
    same = loop_acceptance(target, target, prompts, gamma=1, max_new_tokens=10)  # the target as its own draft
    assert same["acceptance_rate"] == 1.0 and same["proposed"] >= 10 and same["identical"] == 2
    other = loop_acceptance(target, tiny_qwen3(layers=2, seed=4), prompts, gamma=3, max_new_tokens=10)
    assert other["identical"] == 2 and other["gamma"] == 3 and other["prompts"] == 2
    assert other["acceptance_rate"] == other["accepted"] / other["proposed"] < 1.0  # an unrelated draft misses


def test_teacher_forced_alpha_of_an_exact_copy_is_one():
    target = tiny_qwen3(layers=4, seed=12)
    copy = build_draft(target, [0, 1, 2, 3])  # every layer: the same model
    half = build_draft(target, [0, 3])
    seqs = [torch.randint(2, 256, (20,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    a = teacher_forced_alpha(target, copy, seqs, [8, 8, 8])
    assert a["agreement"] == 1.0 and a["alpha"] == pytest.approx(1.0, abs=1e-5) and a["positions"] == 3 * 12
    assert teacher_forced_alpha(target, half, seqs, [8, 8, 8])["alpha"] < 0.999


@pytest.mark.parametrize("kwargs, match", [
    ({"n_prompts": 0}, r"bench.n_prompts=0 is out of range; allowed: an integer >= 1"),
    ({"repeats": 1.5}, r"bench.repeats=1.5 is not an integer"),
    ({"gammas": (0, 2)}, r"bench.gammas=\[0, 2\] is out of range; allowed: a list of at least 1 gammas \(each >= 1\)"),
    ({"methods": ("spec", "warp_drive")}, r"bench.methods=.* names 'warp_drive', which are not allowed; allowed: a "
                                          r"list of: teacher_generate, "),
    ({"kinds": ("poetry",)}, r"bench.kinds=\['poetry'\] names 'poetry'.*allowed: a list of: code, unfamiliar"),
    ({"temperature": -1}, r"bench.temperature=-1 is out of range; allowed: a number >= 0"),
    ({"dynamic_threshold": 2}, r"bench.dynamic_threshold=2 is out of range; allowed: a number in \[0, 1\]"),
    ({"kinds": ("code", "yours")}, r"'yours' only together with bench.code=PATH"),
    ({"n_prompts": 0, "seed": -1}, r"2 problems: bench.n_prompts=0 .*; bench.seed=-1 is out of range"),
])
def test_bench_config_errors_name_the_value_and_what_is_allowed(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BenchConfig(**kwargs).validate()


def test_cli_bench_refuses_unknown_method(capsys):
    from qdlib.cli import main

    assert main(["bench", "--methods", "teleport"]) == 2
    assert "teleport" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a whole (small) bench


def r_plain_over_generate(r, row) -> float:
    """tokens/s of the teacher's generate over that of generate_plain, in the row's kind and mode."""
    speed = {x["method"]: x["tokens_per_s"] for x in r["rows"] if x["kind"] == row["kind"] and x["mode"] == row["mode"]}
    return speed["teacher_generate"] / speed["teacher_plain"]


@pytest.mark.slow
def test_small_bench_on_the_bundled_teacher(tiny, tmp_path):
    teacher, tok = tiny
    draft = build_draft(teacher, sample_layers(28, 6)).float()  # untrained, no knowledge: spec_no_cache drops out
    fast = build_feature_draft(teacher, 1).float()  # an untrained feature-fed draft for the "fast" rows
    cfg = BenchConfig(n_prompts=2, max_new_tokens=8, repeats=1, gammas=(1, 4), sweep_prompts=1, cost_repeats=5)
    r = run_bench(teacher, tok, {"reference": draft, "fast": fast, **ablation_drafts(teacher, draft, METHODS)}, cfg,
                  progress=False)
    greedy = {(x["method"], x["kind"]) for x in r["rows"] if x["mode"] == "greedy"}
    expected = {(m, k) for m in METHODS if m != "spec_no_cache" for k in ("code", "unfamiliar", "paraphrase")}
    assert greedy == expected
    assert r["config"]["method_names"] == [m for m in METHODS if m != "spec_no_cache"]  # what ran, recorded
    sampled = {(x["method"], x["kind"]) for x in r["rows"] if x["mode"] == "sampling"}
    assert sampled == {(m, k) for m in SAMPLING_METHODS for k in ("code", "unfamiliar", "paraphrase")}
    for x in r["rows"]:  # every row has both speed-ups: over generate and over the same engine without a draft
        assert x["speedup_vs_plain"] == pytest.approx(x["speedup"] * r_plain_over_generate(r, x), rel=1e-9)
    for x in r["rows"]:
        assert x["tokens_per_s"] > 0 and x["new_tokens"] >= 1
        if x["method"] == "teacher_generate":
            assert x["speedup"] == pytest.approx(1.0)
        if x.get("acceptance") is not None:
            assert 0.0 <= x["acceptance"] <= 1.0
        if x["mode"] == "greedy":
            assert x["tokens_per_target_call"] >= 1.0
            if x["group"] in ("baseline", "qdlib", "ablation") or x["method"] in ("retrieval", "context_lookup"):
                assert x["identical"] == x["prompts"] == 2, x["label"]  # qdlib's own loops are lossless
    assert set(r["costs"]["c"]) == {"spec", "untrained_uniform", "early_exit", "fast"}
    assert r["fast_draft"]["num_layers"] == 1
    assert all(v > 0 for v in r["costs"]["c"].values())
    assert [s["gamma"] for s in r["sweep"]] == [1, 4]
    a = r["alpha"]["code"]["agreement"]
    assert r["sweep"][1]["theory_tokens_per_call"] == pytest.approx((1 - a ** 5) / (1 - a))
    assert r["environment"]["torch"] == torch.__version__ and r["environment"]["cpu"]
    for x in r["rows"]:  # the per-prompt spread and the busy-machine check
        pp = x["per_prompt"]
        assert pp["worst"] <= pp["median"] <= pp["best"]
        assert x["unreliable"] == (x["repeat_spread"] > BUSY_MARGIN)
    for engine in ("transformers", "qdlib"):  # v(g) split into arithmetic and overhead, before and after
        for row in r["costs"]["verify_split"][engine]["rows"]:
            assert row["v"] == pytest.approx(1 + row["v_arithmetic"] + row["v_overhead"])

    out = write_report(r, tmp_path / "bench")
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "bench.png"}
    assert load_report(out) == json.loads(json.dumps(r))
    md = (out / "report.md").read_text()
    for m in METHODS:
        if m != "spec_no_cache":
            assert METHODS[m][0] in md
    assert "Headline" in md and "Gamma sweep" in md
    h = headline(r)
    assert h["identical"] == 2 and h["bar_2x"] == (h["speedup"] >= 2.0)
    with pytest.raises(FileNotFoundError, match="qd bench"):
        load_report(tmp_path / "nothing")
    assert report_markdown(r) == md
    assert "worst / median / best prompt" in md and "| qdlib | " in md and "The machine was busy" not in md
    for x in r["rows"]:  # where the time goes: a draft that cost nothing could only be faster, and the plain loop has no draft
        if x["mode"] == "greedy" and "time_split" in x:
            bound = free_drafting_bound(x)
            assert bound == pytest.approx(x["speedup_vs_plain"] / (1 - x["time_split"]["draft"]))
            assert bound >= x["speedup_vs_plain"] and (x["method"] != "teacher_plain" or bound == 1.0)
            if x["group"] != "baseline":
                assert f"| {x['label']} | {x['time_split']['draft']:.0%} |" in md, x["label"]
    busy = json.loads(json.dumps(r))
    row = next(x for x in busy["rows"] if x["method"] == "fast")
    row.update(unreliable=True, repeat_spread=0.4)
    md = report_markdown(busy)
    assert "The machine was busy" in md and "unreliable (busy machine: repeats differ by 40%)" in md


@pytest.mark.slow
def test_bench_runs_any_drafts_it_is_given_each_under_its_name(tiny):
    """drafts is a dict: the reference's rows, plus one row per draft of your own (its own settings), each with its
    own c; methods whose draft is absent are left out, and no caller branches on a draft's type."""
    teacher, tok = tiny
    ref = build_draft(teacher, sample_layers(28, 6)).float()
    mine = build_draft(teacher, sample_layers(28, 4)).float()
    lookup = NgramDrafter([], max_n=3, include_context=True)  # a model-free drafter is a draft too
    cfg = BenchConfig(n_prompts=1, max_new_tokens=6, repeats=1, temperature=0, sweep_prompts=0, kinds=("code",),
                      methods=("teacher_plain", "spec", "fast"), cost_repeats=3)  # no "fast" draft: its row is left out
    r = run_bench(teacher, tok, {"reference": ref, "mine": mine, "lookup4": lookup}, cfg, progress=False)
    rows = {x["method"]: x for x in r["rows"]}
    assert set(rows) == {"teacher_generate", "teacher_plain", "spec", "mine", "lookup4"}
    assert rows["mine"]["group"] == "yours" and "'mine'" in rows["mine"]["label"]
    assert all(rows[m]["identical"] == 1 for m in ("spec", "mine", "lookup4"))  # lossless, whichever draft
    assert set(r["costs"]["c"]) == {"spec", "mine", "lookup4"} and r["fast_draft"] is None
    assert "draft 'mine'" in report_markdown(r)
    with pytest.raises(ConfigError, match="'reference' entry"):
        run_bench(teacher, tok, ref, cfg, progress=False)  # a bare draft, not a dict
    with pytest.raises(ConfigError, match=r"\['spec'\] are method names"):
        run_bench(teacher, tok, {"reference": ref, "spec": mine}, cfg, progress=False)


def test_cli_bench_add_names_its_bad_value(tmp_path, capsys):
    from qdlib.cli import main

    for spec, says in (("mine", "write NAME=DIR"), ("spec=x", "is taken"), (f"mine={tmp_path}", "no config.json")):
        assert main(["bench", "--quick", "--add", spec]) != 0
        assert says in capsys.readouterr().err, spec


def test_the_report_names_the_trained_draft_behind_it(tiny, tmp_path):
    from qdlib.bench import draft_card
    from qdlib.draft import DraftForCausalLM

    teacher, _ = tiny
    draft = build_draft(teacher, sample_layers(28, 6)).float()
    assert draft_card(draft) is None  # built in memory: no card
    draft.save_pretrained(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"steps": 7, "agreement": 0.5}))
    loaded = DraftForCausalLM.from_pretrained(tmp_path)
    assert draft_card(loaded) == {"steps": 7, "agreement": 0.5}
    report = load_report(paths.REPO_DIR / "outputs" / "bench_reference")
    report["draft"]["card"] = draft_card(loaded)
    assert report_markdown(report).splitlines()[0].endswith("(7 training steps, test agreement 0.500)")


def test_cli_bench_offers_every_prompt_kind_by_default():
    from qdlib.settings import KINDS
    from qdlib.cli import build_parser

    from qdlib.cli.bench import _bench_config

    cfg = _bench_config(build_parser().parse_args(["bench"]))
    assert tuple(cfg.kinds) + ("yours",) == KINDS and "unfamiliar" in KINDS  # "yours" comes with --code PATH
    cfg = _bench_config(build_parser().parse_args(["bench", "--code", "qdlib/paths.py"]))
    assert cfg.code == "qdlib/paths.py" and cfg.kinds[-1] == "yours"


@pytest.mark.slow
def test_quick_bench_scores_a_candidate_against_the_reference(tmp_path, capsys):
    """The capstone's scoring run, end to end, with the committed fast draft as the candidate (shortened: two
    prompts of 24 tokens instead of three of 48, fewer timed cost calls; the preset is quick_config's doctest)."""
    from qdlib.bench import capstone_score
    from qdlib.cli import main

    assert main(["bench", "--quick", "--candidate", str(paths.FAST_DRAFT_DIR), "--quiet", "--out", str(tmp_path),
                 "--prompts", "2", "--new-tokens", "24", "--cost-repeats", "3"]) == 0
    out = capsys.readouterr().out
    report = load_report(tmp_path)
    assert report["config"]["n_prompts"] == 2 and report["config"]["gamma"] == 3  # the options change only the size
    assert {r["method"] for r in report["rows"]} == {"teacher_generate", "teacher_plain", "spec_no_cache", "fast"}
    assert all(r["identical"] == r["prompts"] == 2 and r["mode"] == "greedy" for r in report["rows"])
    s = capstone_score(report)
    assert s["exact"] and f"score {s['score']:.2f}" in out and "capstone: the candidate is" in out


def test_capstone_score_gives_nothing_to_a_candidate_that_changes_the_output():
    from qdlib.bench import capstone_score

    row = dict(kind="unfamiliar", mode="greedy", prompts=3)
    report = {"rows": [{**row, "method": "spec_no_cache", "speedup_vs_plain": 1.2, "identical": 3},
                       {**row, "method": "fast", "speedup_vs_plain": 3.0, "identical": 2}]}
    s = capstone_score(report)
    assert s == {**s, "exact": False, "score": 0.0, "beats_reference": False}
    with pytest.raises(ValueError, match=r"no greedy unfamiliar rows for \['fast'\]"):
        capstone_score({"rows": report["rows"][:1]})


@pytest.mark.slow
def test_bench_uses_a_cache_of_the_users_own_items_without_retraining(tmp_path, capsys):
    """`qd build-cache --items FILE`, then `qd bench --cache DIR`: the paraphrase prompts are that file's, the draft is
    unchanged but for the memory it reads (and, with --fusion, retrieval-trained fusion weights)."""
    from qdlib.cli import main
    from qdlib.knowledge import load_knowledge_cache, save_items
    from qdlib.memory import code_items

    items = code_items(2, seed=5)
    save_items(items, tmp_path / "items.yaml")
    assert main(["build-cache", "--items", str(tmp_path / "items.yaml"), "--answer-tokens", "8",
                 "--out", str(tmp_path / "cache")]) == 0
    assert [it["id"] for it in load_knowledge_cache(tmp_path / "cache").items] == [it["id"] for it in items]
    argv = ["bench", "--cache", str(tmp_path / "cache"), "--kinds", "paraphrase", "--prompts", "4", "--new-tokens", "8",
            "--repeats", "1", "--cost-repeats", "3", "--temperature", "0", "--sweep-prompts", "0", "--quiet",
            "--methods", "teacher_plain", "spec", "spec_no_cache", "--out", str(tmp_path / "bench")]
    fusion = paths.OUTPUTS_DIR / "memory_protocol" / "retrieval_keep_fusion.safetensors"
    assert main(argv + ["--fusion", str(fusion)]) == 0
    report = load_report(tmp_path / "bench")
    assert {(r["kind"], r["method"]) for r in report["rows"]} == {  # the teacher's generate is always the baseline
        ("paraphrase", m) for m in ("teacher_generate", "teacher_plain", "spec", "spec_no_cache")}
    assert all(r["prompts"] == r["identical"] == 4 for r in report["rows"])  # 2 items x 2 paraphrases, all exact
    assert report["draft"]["memory_items"] == [it["id"] for it in items] and report["draft"]["fusion"] == str(fusion)


def test_code_prompts_come_from_the_learners_own_files(tiny, tmp_path):
    _, tok = tiny
    src = paths.REPO_DIR / "qdlib"
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("bench.py", "report.py", "speculative.py"):
        (folder / name).write_text((src / name).read_text())
    prompts = code_prompts(tok, folder, 4, 32)
    assert len(prompts) == 4 and all(len(p) == 32 for p in prompts)
    assert prompts == code_prompts(tok, folder, 4, 32)  # deterministic
    (tmp_path / "small.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="small.py gives only 0 prompt\\(s\\) of 32 tokens .* needs 4"):
        code_prompts(tok, tmp_path / "small.py", 4, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no Python files"):
        code_prompts(tok, tmp_path / "empty", 4, 32)
    with pytest.raises(ValueError, match="only together with bench.code=PATH"):
        BenchConfig(kinds=("yours",)).validate()
    with pytest.raises(ValueError, match="no such file or folder"):
        BenchConfig(kinds=("yours",), code=str(tmp_path / "nope")).validate()


def test_the_committed_instructor_capstone_run_is_within_budget_and_its_record_says_its_score():
    """The record is honest: within the budget, exact output, and its README states the score its report gives
    (a tie since the reference draft drafts on the lean forward)."""
    folder = paths.OUTPUTS_DIR / "capstone_instructor"
    log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) <= 300, "the capstone allows at most 300 optimizer steps"
    assert json.loads((folder / "draft_config.json").read_text())["num_layers"] == 1
    score = capstone_score(json.loads((folder / "report.json").read_text()))
    readme = (folder / "README.md").read_text()
    assert score["exact"] and re.search(rf"score\s+{score['score']:.2f}", readme.replace("*", "")), score
    assert ("beats the reference draft" in readme.splitlines()[0]) == score["beats_reference"]
