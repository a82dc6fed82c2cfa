import subprocess
import sys

import pytest

from qdlib.cli import build_parser, main


def test_generate_runs_on_bundled_teacher(capsys):
    assert main(["generate", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def read_config(path):")
    assert "8 new tokens" in out.err


def test_generate_with_unreachable_hub_id_fails_clearly(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "Qwen/Qwen3-0.6B"]) == 2
    assert "bundled teacher works offline" in capsys.readouterr().err


def test_compare_layers_prints_table(capsys):
    assert main(["compare-layers", "--k", "6", "--strategies", "uniform", "first-k", "--windows", "4"]) == 0
    out = capsys.readouterr().out
    assert "uniform" in out and "[0, 5, 11, 16, 22, 27]" in out and "first-k" in out


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "qdlib.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout and "train-teacher" in r.stdout


def test_unknown_command_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fly"])


def test_build_cache_command(tmp_path, capsys):
    from qdlib import load_knowledge_cache, load_teacher

    assert main(["build-cache", "--answer-tokens", "4", "--out", str(tmp_path / "c")]) == 0
    assert "knowledge cache of 15 items" in capsys.readouterr().out
    cache = load_knowledge_cache(tmp_path / "c", teacher=load_teacher("tiny")[0])
    assert cache.num_items == 15 and cache.layer == 27


def test_distill_rejects_a_bad_config(tmp_path, capsys):
    from qdlib.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: 5\n")
    assert main(["distill", "--config", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "training.learning_rate=5" in err and "allowed: a number in (0, 1]" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("training:\n  lerning_rate: 0.1\n")
    assert main(["distill", "--config", str(typo)]) == 2
    assert "unknown key(s) ['lerning_rate']" in capsys.readouterr().err
