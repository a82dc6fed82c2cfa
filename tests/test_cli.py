"""The ``qd`` command: it works, and every way it can fail ends in one clear line before any model loads."""

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from qdlib import cli
from qdlib.cli import build_parser, main
from qdlib.errors import ConfigError

# settings that make `qd distill` take seconds: no teacher-generated rows, a little text, tiny evaluation
FAST_DISTILL = [f"--set=training.{kv}" for kv in (
    "generated_sequences=0", "generated_share=0", "item_share=0", "max_text_tokens=5000", "eval_prompts=1",
    "eval_new_tokens=4", "eval_text_windows=1", "max_seq_length=32", "mixed_precision=no",
    "knowledge_answer_tokens=4", "num_epochs=1", "steps_per_epoch=2", "batch_size=2")]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command loads the teacher (the checks must come first).

    The stages import ``load_teacher`` at their top, so each module's own name is replaced; they
    are imported first, so that none binds the refusing stand-in for the tests that follow.
    """
    import qdlib.models
    import qdlib.tour
    import qdlib.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the options were checked")

    for module in (qdlib.models, qdlib.tour, qdlib.trainer):
        monkeypatch.setattr(module, "load_teacher", refuse)


def test_generate_runs_on_bundled_teacher(capsys):
    assert main(["generate", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def read_config(path):")
    assert "8 new tokens" in out.err


def test_help_imports_neither_torch_nor_transformers():
    # `qd --help` must answer at once: the CLI and the lazy package import no heavy module at import time
    code = ("import sys\nfrom qdlib.cli import main\nfor argv in (['--help'], ['distill', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'accelerate'})\n"
            "print(heavy())\nimport qdlib\nqdlib.sample_layers(28, 6)\nprint(heavy())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "train-teacher" in r.stdout and "SECTION.KEY=VALUE" in r.stdout
    assert lines[-2] == "[]"  # after both help texts: nothing heavy imported
    assert lines[-1] == "['torch']"  # ... and the probe does see torch once a name that needs it is used


def test_the_library_acts_on_the_strategy_names_the_settings_declare():
    from qdlib import sampling
    from qdlib.settings.names import EARLY_EXIT, STRATEGIES, STRATEGY_NAMES

    assert sampling.STRATEGIES is STRATEGIES and STRATEGY_NAMES == STRATEGIES + (EARLY_EXIT,)
    with pytest.raises(ConfigError, match=", ".join(STRATEGIES)):  # sample_layers refuses others, naming these
        sampling.sample_layers(28, 6, "random")
    assert build_parser().parse_args(["compare-layers", "--strategies", EARLY_EXIT]).strategies == [EARLY_EXIT]


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings)}" for name, sub in subparsers.choices.items()
               for action in sub._actions
               if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []
    assert set(subparsers.choices) == {"generate", "train-teacher", "train-fast", "export-draft", "compare-layers",
                                       "build-cache", "train-memory", "distill",
                                       "student", "bench", "tour"}


@pytest.mark.parametrize("argv, message", [
    (["generate", "--max-new-tokens", "-5"], "argument --max-new-tokens: -5 is out of range; allowed: an integer >= 1"),
    (["generate", "--temperature", "hot"], "argument --temperature: 'hot' is not a number"),
    (["generate", "--device", "gpu0"], "argument --device: unknown device 'gpu0'; allowed: cpu, cuda, cuda:N, mps or auto"),
    (["compare-layers", "--k", "1"], "argument --k: 1 is out of range; allowed: an integer >= 2"),
    (["distill", "--export", "a", "--export-only", "b"], "not allowed with argument --export"),
    (["fly"], "argument COMMAND: invalid choice: 'fly'"),
])
def test_bad_options_end_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.parametrize("argv, message", [
    (["compare-layers", "--k", "6", "40"], "error: --k 40 is more than the teacher's 28 layers; allowed: 2..28"),
    (["build-cache", "--layer", "28"], "error: --layer 28 is not a layer of the teacher; allowed: 0..27"),
    (["build-cache", "--items", "/no/such/items.yaml"], "error: --items /no/such/items.yaml: no such file"),
    (["bench", "--methods", "spec", "warp"], "error: bench.methods=['spec', 'warp'] names 'warp', which are not allowed"),
    (["bench", "--draft", "/no/such/draft"], "error: /no/such/draft is not a draft folder"),
    (["bench", "--gamma", "0"], "error: bench.gamma=0 is out of range; allowed: an integer >= 1"),
    (["bench", "--gammas", "2", "-1"], "error: bench.gammas=[2, -1] is out of range; allowed: a list of at least 1"),
    (["bench", "--set", "bench.gama=3"], "error: unknown bench key(s) ['gama'] (did you mean 'gamma'?)"),
    (["bench", "--set", "fast.steps=3"], "error: --set 'fast.steps=3': this command's keys are bench.KEY"),
    (["distill", "--batch-size", "0"], "training.batch_size=0 is out of range; allowed: an integer >= 1"),
    (["train-fast", "--lr", "2"], "error: fast.learning_rate=2 is out of range; allowed: a number in (0, 1]"),
    (["train-teacher", "--mixed-precision", "fp8"], "error: teacher.mixed_precision='fp8' is unknown; allowed: auto, bf16, no"),
    (["bench", "--cache", "/no/such/cache"], "error: --cache /no/such/cache: no knowledge cache there"),
    (["bench", "--fusion", "/no/such/fusion.safetensors"], "error: --fusion /no/such/fusion.safetensors: no such file"),
    (["bench", "--fusion", "outputs/memory_protocol/README.md", "--draft", "outputs/ablation_no_knowledge"],
     "error: --fusion outputs/memory_protocol/README.md: this draft has no knowledge path"),
    (["train-memory", "--gate-init", "1.5"], "error: memory.gate_init=1.5 is out of range; allowed: a number in [0, 1)"),
    (["train-memory", "--swapped-share", "1"], "error: memory.swapped_share=1 is out of range; allowed: a number in [0, 1)"),
    (["distill", "--config", "/no/such.yaml"], "error: config file /no/such.yaml does not exist"),
    (["distill", "--run-dir", "/no/such/run", "--export-only", "/no/out"], "error: /no/such/run/best holds no trained draft"),
    (["train-teacher", "--export", "--run-dir", "/no/such/run"], "error: /no/such/run holds no trained teacher"),
    (["compare-layers", "--seq-len", "5000"], "error: --seq-len 5000 is longer than the teacher's 1024 positions"),
    (["distill", "--set", "training.learning_rate=5", "--set", "draft_model.num_sampled_layers=40"],
     "2 problems: training.learning_rate=5 is out of range; allowed: a number in (0, 1]; "
     "draft_model.num_sampled_layers=40 is out of range; allowed: an integer in 2..28"),
    (["distill", "--no-knowledge", "--set", "training.train_params=fusion"], "needs knowledge_enhancement.enabled: true"),
    (["distill", "--no-knowledge", "--knowledge", "live"],
     "error: qd distill: --no-knowledge contradicts --knowledge live; give one of them"),
])
def test_bad_values_fail_before_any_model_loads(capsys, no_model_loads, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_missing_gpu_is_refused_before_loading(capsys, no_model_loads):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["generate", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device cuda: this machine has 0 CUDA device(s); use cpu or auto\n"


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache (a developer's real cache may hold Qwen3-0.6B) and an endpoint that refuses at once."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "hub"


def test_generate_with_unreachable_hub_id_fails_clearly(capsys, monkeypatch, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "Qwen/Qwen3-0.6B"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE is set" in err and "bundled teacher works offline" in err


def test_hub_id_without_network_fails_at_once(capsys, monkeypatch, hub_cache):
    # no HF_HUB_OFFLINE: one quick check of the endpoint, not a minute of retries
    monkeypatch.setenv("QD_MODEL", "Qwen/Qwen3-0.6B")
    t0 = time.perf_counter()
    assert main(["generate"]) == 2
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the hub is not reachable from here" in err and "Retrying" not in err
    assert seconds < 20  # before: 52-57 s of retries


def test_a_cached_hub_model_loads_without_network(capsys, hub_cache):
    from qdlib import paths

    snapshot = hub_cache / "models--qd--tiny-teacher" / "snapshots" / "abc123"  # the cache's own layout
    snapshot.mkdir(parents=True)
    (hub_cache / "models--qd--tiny-teacher" / "refs").mkdir()
    (hub_cache / "models--qd--tiny-teacher" / "refs" / "main").write_text("abc123")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).symlink_to(paths.TEACHER_DIR / name)
    assert main(["generate", "--model", "qd/tiny-teacher", "--max-new-tokens", "4"]) == 0
    assert "4 new tokens" in capsys.readouterr().err


@pytest.mark.slow  # 5 s: a fresh Python process loads the teacher twice
def test_loading_is_quiet_unless_asked(tmp_path):
    # a plain Python session (no test environment) sees no "Loading weights" bar unless progress=True
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS",
                                                          "TRANSFORMERS_VERBOSITY")}
    code = ("import sys, qdlib\nqdlib.load_teacher('tiny')\nqdlib.load_draft()\nprint('MARK', file=sys.stderr)\n"
            "qdlib.load_teacher('tiny', progress=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    quiet, loud = r.stderr.split("MARK")
    assert "Loading weights" not in quiet
    assert "Loading weights" in loud  # the probe can see the bar


def test_compare_layers_prints_table(capsys):
    assert main(["compare-layers", "--k", "6", "--strategies", "uniform", "first-k", "--windows", "4"]) == 0
    out = capsys.readouterr().out
    assert "uniform" in out and "[0, 5, 11, 16, 22, 27]" in out and "first-k" in out


def test_build_cache_command(tmp_path, capsys):
    from qdlib import load_knowledge_cache, load_teacher

    assert main(["build-cache", "--answer-tokens", "4", "--out", str(tmp_path / "c")]) == 0
    assert "knowledge cache of 15 items" in capsys.readouterr().out
    cache = load_knowledge_cache(tmp_path / "c", teacher=load_teacher("tiny")[0])
    assert cache.num_items == 15 and cache.layer == 27


def test_distill_honours_device_and_set(monkeypatch, tmp_path):
    seen = {}

    def fake_distill(cfg, run_dir, teacher_name=None):
        seen.update(cpu=os.environ.get("ACCELERATE_USE_CPU"), lr=cfg.training.learning_rate, run_dir=run_dir,
                    epochs=cfg.training.num_epochs, enabled=cfg.knowledge_enhancement.enabled)

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr("qdlib.trainer.distill", fake_distill)
    argv = ["distill", "--device", "cpu", "--run-dir", str(tmp_path / "r"), "--set", "training.learning_rate=1e-3",
            "--set", "training.num_epochs=5", "--num-epochs", "2", "--no-knowledge"]
    assert main(argv) == 0
    assert seen == {"cpu": "true", "lr": 0.001, "run_dir": tmp_path / "r", "epochs": 2, "enabled": False}
    assert "ACCELERATE_USE_CPU" not in os.environ  # restored afterwards


def test_distill_knowledge_live_sets_the_memory_and_names_the_run(monkeypatch, capsys):
    from qdlib import paths

    seen = {}

    def fake_distill(cfg, run_dir, teacher_name=None):
        k = cfg.knowledge_enhancement
        seen.update(run_dir=run_dir, enabled=k.enabled, memory=k.memory, lag=cfg.training.live_max_lag)

    monkeypatch.setattr("qdlib.trainer.distill", fake_distill)
    assert main(["distill", "--knowledge", "live", "--set", "training.live_max_lag=6"]) == 0
    assert seen == {"run_dir": paths.runs_dir() / "distill" / "distill_tiny_live", "enabled": True, "memory": "live",
                    "lag": 6}
    assert main(["distill", "--knowledge", "none"]) == 0
    assert seen["run_dir"].name == "distill_tiny_no_knowledge" and not seen["enabled"]
    assert main(["distill", "--knowledge", "live", "--list-keys"]) == 0
    assert 'knowledge_enhancement.memory = "live"' in capsys.readouterr().out


def test_train_fast_passes_its_options_and_export_needs_a_trained_run(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_train(cfg, run_dir, log=print):
        seen.update(layers=cfg.num_layers, steps=cfg.steps, lr=cfg.learning_rate, init=cfg.init_from, files=cfg.max_files,
                    run_dir=run_dir)

    monkeypatch.setattr("qdlib.feature_train.train_feature_draft", fake_train)
    argv = ["train-fast", "--steps", "7", "--layers", "2", "--lr", "2e-3", "--init-from", "outputs/fast_draft",
            "--max-files", "3", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    assert seen == {"layers": 2, "steps": 7, "lr": 0.002, "init": "outputs/fast_draft", "files": 3,
                    "run_dir": tmp_path / "r"}
    assert main(["train-fast", "--export", "--run-dir", str(tmp_path / "r")]) != 0
    assert "holds no trained fast draft" in capsys.readouterr().err


@pytest.mark.parametrize("command, cls, section", [
    ("train-fast", "FeatureTrainConfig", "fast"), ("train-teacher", "TeacherTrainConfig", "teacher"),
    ("train-memory", "RetrievalConfig", "memory"), ("bench", "BenchConfig", "bench")])
def test_each_configured_command_takes_its_schemas_keys_as_options_set_and_list_keys(capsys, no_model_loads, command,
                                                                                      cls, section):
    """One option per setting, named as the setting; --set for the same keys (the option wins); --list-keys."""
    import dataclasses

    from qdlib import settings

    fields = dataclasses.fields(getattr(settings, cls))
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = {o for a in sub._actions for o in a.option_strings}
    assert {"--" + f.name.replace("_", "-") for f in fields} <= options and {"--set", "--list-keys"} <= options
    assert main([command, "--seed", "3", "--set", f"{section}.seed=5", "--set", f"{section}.steps=9"
                 if command != "bench" else "bench.repeats=9", "--list-keys"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(fields) and f"{section}.seed = 3  # an integer >= 0; " in "\n".join(out)  # the option won
    assert any(line.startswith(f"{section}.{'repeats' if command == 'bench' else 'steps'} = 9  #") for line in out)


def test_ctrl_c_ends_in_one_line(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("qdlib.models.load_teacher", interrupted)
    assert main(["generate"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted: nothing was written"


def test_ctrl_c_while_preparing_distillation_data_leaves_no_half_made_run(capsys, monkeypatch, tmp_path):
    import qdlib.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qdlib.trainer, "build_distill_data", interrupted)
    run = tmp_path / "run"
    assert main(["distill", "--no-knowledge", "--run-dir", str(run), *FAST_DISTILL]) == 130
    assert last_line(capsys.readouterr().err) == "interrupted: nothing was written; rerun the same command to start"
    assert not run.exists()  # no empty run folder
    # with knowledge: the finished knowledge cache is kept (whole), and the message says so
    assert main(["distill", "--run-dir", str(run), *FAST_DISTILL]) == 130
    assert last_line(capsys.readouterr().err) == (
        f"interrupted: the knowledge cache in {run} is kept; rerun the same command to continue from there")
    assert sorted(p.name for p in run.iterdir()) == ["knowledge_cache"]


def test_ctrl_c_while_training_says_where_to_resume_and_resuming_works(capsys, monkeypatch, tmp_path):
    import qdlib.trainer

    real_loss, calls = qdlib.trainer.distill_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # during the second step
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(qdlib.trainer, "distill_loss", loss_then_ctrl_c)
    run = tmp_path / "run"
    argv = ["distill", "--no-knowledge", "--run-dir", str(run), *FAST_DISTILL]
    assert main(argv) == 130
    assert last_line(capsys.readouterr().err) == (
        f"interrupted at step 1 of 2; rerun the same call to resume from {run / 'last.pt'}")
    assert main(argv) == 0  # the same command resumes and finishes
    assert "resuming from step 1 of 2" in capsys.readouterr().out
    steps = [json.loads(line).get("step") for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2]  # no step done twice


def test_distill_rejects_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: 5\n  lerning_rate: 0.1\nknowledge_enhancement:\n  enabeld: true\n")
    assert main(["distill", "--config", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 problems" in err
    assert "training.learning_rate=5 is out of range; allowed: a number in (0, 1]" in err
    assert "['lerning_rate'] (did you mean 'learning_rate'?)" in err and "['enabeld']" in err
    assert not (tmp_path / "run").exists()


def test_distill_list_keys_shows_the_configs_values(capsys, no_model_loads):
    assert main(["distill", "--config", "tiny", "--list-keys", "--set", "training.seed=7"]) == 0
    out = capsys.readouterr().out
    assert "training.learning_rate = 0.002  # a number in (0, 1]; AdamW's peak learning rate" in out  # tiny's value
    assert "training.seed = 7  # an integer >= 0;" in out  # after --set
    assert "knowledge_enhancement.fusion_gate = \"channel\"  # channel, scalar;" in out


def test_library_errors_share_one_base():
    from qdlib import DraftLoadError, KnowledgeCacheError, QdError, TeacherLoadError
    from qdlib.trainer import TrainingStopped

    for cls, builtin in ((TeacherLoadError, RuntimeError), (DraftLoadError, RuntimeError),
                         (KnowledgeCacheError, ValueError), (TrainingStopped, RuntimeError)):
        assert issubclass(cls, QdError) and issubclass(cls, builtin)  # old `except ValueError` callers still work
    assert TrainingStopped.exit_code == 3 and cli.INTERRUPTED == 130
