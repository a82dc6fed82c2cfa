"""The ``qd`` command: thin argument parsing over qdlib's modules.

    qd generate --prompt "def fibonacci(n):"     # the bundled teacher writes code
    qd train-teacher                              # train the bundled teacher (resumable)
    qd train-teacher --export                     # write outputs/teacher
    qd compare-layers --k 6                       # untrained drafts, side by side
    qd build-cache                                # the knowledge cache for the configured teacher
    qd distill --config tiny                      # distil the reference draft (resumable)
    qd distill --config tiny --set training.learning_rate=1.0e-3   # any config key, checked like the file
    qd distill --config tiny --export outputs/reference_draft   # measure the best draft and write it
    qd student                                    # student copies of the notebooks (solutions stubbed)
    qd bench                                      # every decoding method side by side, report + plots
    qd tour                                       # the whole story in a few minutes

``QD_MODEL`` (or ``--model``) selects another teacher, e.g. ``Qwen/Qwen3-0.6B`` or a local folder.

How it fails: every option is checked before any model loads; any of qdlib's own
errors (:class:`qdlib.errors.QdError`) ends the command with one line
``error: ...`` (exit status 2; 3 when training stopped itself); Ctrl-C ends it
with one line saying what was kept and how to resume (exit status 130). This
module imports neither torch nor transformers at import time, so ``qd --help``
answers at once: each command imports what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

from .errors import ConfigError, MissingFileError, QdError

DEFAULT_PROMPT = 'def read_config(path):\n    """Read a JSON configuration file and return it as a dict."""\n'
INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
# qdlib.distill.STRATEGY_NAMES (sampling.STRATEGIES + sampling.EARLY_EXIT), copied because importing them imports
# torch; tests/test_cli.py checks that the copy is equal
STRATEGIES = ["uniform", "geometric", "logarithmic", "importance", "first-k"]

# ----------------------------------------------------------------------------- option types (checked by argparse)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number_at_least(low: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: a number >= {low}") from None
        if not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; allowed: a number >= {low}")
        return value

    parse.__name__ = f"number >= {low}"
    return parse


DEVICES = "cpu, cuda, cuda:N, mps or auto"


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; allowed: {DEVICES}")
    return text


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: ...``, exit status 2), like qdlib's own."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


# ----------------------------------------------------------------------------- shared steps


def _quiet_hf():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in command output


def _check_device(device: str | None) -> None:
    """Refuse a device this machine lacks now, before any model loads."""
    if device is None or device == "auto" or device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s); use cpu or auto")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS is not available on this machine; use cpu or auto")


def _teacher_config(model: str | None) -> dict | None:
    """The teacher's ``config.json`` if it is on disk (bundled, a folder or the HF cache), read without loading."""
    from .models import in_hub_cache, teacher_path

    where = teacher_path(model)
    local = Path(where).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    if in_hub_cache(where):
        from huggingface_hub import try_to_load_from_cache

        return json.loads(Path(try_to_load_from_cache(where, "config.json")).read_text(encoding="utf-8"))
    return None


def _teacher_layers(model: str | None) -> int | None:
    cfg = _teacher_config(model) or {}
    return cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers")


def _load_teacher(args):
    """``(model, tokenizer)`` for ``--model``/``--device`` (a failure is a TeacherLoadError, a QdError)."""
    from .models import load_teacher

    _quiet_hf()
    return load_teacher(args.model, device=args.device)


def _teacher_label(args) -> str:
    return args.model or os.environ.get("QD_MODEL") or "tiny"


# ----------------------------------------------------------------------------- commands


def cmd_generate(args) -> int:
    import torch

    _check_device(args.device)
    model, tok = _load_teacher(args)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                  attention_mask=torch.ones_like(ids))
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        kwargs.update(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    print(prompt, end="")
    print(tok.decode(new, skip_special_tokens=True))
    print(f"\n[{len(new)} new tokens in {dt:.2f} s = {len(new) / dt:.1f} tokens/s; teacher: {_teacher_label(args)}, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}]", file=sys.stderr)
    return 0


def cmd_train_teacher(args) -> int:
    from . import paths
    from .teacher import TeacherTrainConfig, export_teacher, train_teacher

    _quiet_hf()
    if args.export:
        run = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "teacher"
        if not (run / "last.pt").is_file():
            raise MissingFileError(f"{run} holds no trained teacher (no last.pt); run `qd train-teacher` first")
        export_teacher(args.run_dir, args.out_dir)
        return 0
    cfg = TeacherTrainConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    if args.no_compile:
        cfg.compile = False
    if args.ul_steps is not None:
        cfg.ul_steps = args.ul_steps
    train_teacher(cfg, args.run_dir)
    return 0


def cmd_compare_layers(args) -> int:
    from .corpus import heldout_texts
    from .metrics import compare_strategies, format_table, text_windows
    from .sampling import layer_importance

    _check_device(args.device)
    positions = (_teacher_config(args.model) or {}).get("max_position_embeddings")
    if positions is not None and args.seq_len > positions:
        raise ConfigError(f"--seq-len {args.seq_len} is longer than the teacher's {positions} positions; "
                          f"allowed: 2..{positions}")
    layers = _teacher_layers(args.model)
    too_many = [k for k in args.k if layers is not None and k > layers]
    if too_many:
        raise ConfigError(f"--k {' '.join(map(str, too_many))} is more than the teacher's {layers} layers; "
                          f"allowed: 2..{layers}")
    teacher, tok = _load_teacher(args)
    texts = heldout_texts()
    calibration, evaluation = texts[: args.calibration_texts], texts[args.calibration_texts :]
    batches = text_windows(tok, evaluation, seq_len=args.seq_len, n=args.windows)  # scored apart from calibration
    strategies = list(args.strategies)
    scores = None
    if "importance" in strategies:
        scores = layer_importance(teacher, tok, calibration)
    rows = compare_strategies(teacher, batches, ks=args.k, strategies=strategies, importance_scores=scores)
    print(f"untrained drafts of {_teacher_label(args)} on {args.windows} held-out windows of {args.seq_len} tokens "
          f"(KL = KL(teacher || draft), agree = top-1 agreement, alpha = E[sum min(p, q)])")
    print(format_table(rows))
    return 0


def cmd_build_cache(args) -> int:
    from . import paths
    from .knowledge import build_knowledge_cache
    from .models import model_name

    _check_device(args.device)
    if args.items is not None and not Path(args.items).is_file():
        raise MissingFileError(f"--items {args.items}: no such file; omit it for the built-in items")
    layers = _teacher_layers(args.model)
    if args.layer is not None and layers is not None and args.layer >= layers:
        raise ConfigError(f"--layer {args.layer} is not a layer of the teacher; allowed: 0..{layers - 1}")
    teacher, tok = _load_teacher(args)
    cache = build_knowledge_cache(teacher, tok, args.items, layer=args.layer, answer_tokens=args.answer_tokens)
    out = args.out or paths.runs_dir() / "knowledge_cache" / model_name(teacher).replace("/", "--")
    cache.save(out)
    print(f"knowledge cache of {cache.num_items} items x {cache.states.shape[1]} tokens x {cache.hidden_size} "
          f"(layer {cache.layer}, {cache.memory_bytes() / 2**20:.2f} MiB, fingerprint {cache.fingerprint}) -> {out}")
    return 0


def distill_overrides(args) -> list[str]:
    """``--set`` strings, then the dedicated options (which win), as ``section.key=value``."""
    overrides = list(args.set or [])
    for key in ("num_epochs", "steps_per_epoch", "batch_size"):
        if getattr(args, key) is not None:
            overrides.append(f"training.{key}={getattr(args, key)}")
    if args.no_knowledge or args.knowledge == "none":
        overrides.append("knowledge_enhancement.enabled=false")
    elif args.knowledge == "live":
        overrides += ["knowledge_enhancement.enabled=true", "knowledge_enhancement.memory=live"]
    return overrides


def _knowledge_mode(args) -> str:
    """``none``, ``live`` or ``static`` (the config's own choice when neither flag is given)."""
    if args.no_knowledge:
        if args.knowledge not in (None, "none"):
            raise ConfigError(f"qd distill: --no-knowledge contradicts --knowledge {args.knowledge}; give one of them")
        return "none"
    return args.knowledge or "static"


@contextlib.contextmanager
def _accelerate_device(device: str | None):
    """Make Accelerate use ``--device`` (cpu: ``ACCELERATE_USE_CPU``); the environment is restored afterwards."""
    if device in (None, "auto", "cuda", "mps"):  # Accelerate's own choice: cuda, then mps, then cpu
        yield
        return
    if device != "cpu":
        raise ConfigError(f"qd distill --device {device}: use cpu, cuda or auto; choose GPUs with CUDA_VISIBLE_DEVICES "
                          f"or `accelerate launch`")
    old = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = old


def cmd_distill(args) -> int:
    from .distill import DEFAULT_CONFIGS, config_keys, load_config

    from . import paths

    mode = _knowledge_mode(args)
    path = DEFAULT_CONFIGS.get(args.config, args.config)
    cfg = load_config(path, num_layers=_teacher_layers(args.model), overrides=distill_overrides(args))
    if args.list_keys:
        print("\n".join(config_keys(cfg)))
        return 0
    _check_device(args.device)
    if mode == "static" and cfg.knowledge_enhancement.enabled and cfg.knowledge_enhancement.memory == "live":
        mode = "live"  # the config file asks for it
    name = Path(str(path)).stem + {"none": "_no_knowledge", "live": "_live", "static": ""}[mode]
    args.run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "distill" / name
    from accelerate.state import PartialState

    from .trainer import distill, export_draft

    _quiet_hf()
    with _accelerate_device(args.device):
        if not args.export_only:
            distill(cfg, args.run_dir, teacher_name=args.model)  # every process loads the teacher on its device
        out = args.export or args.export_only
        if out and PartialState().is_main_process:
            export_draft(args.run_dir, out, teacher_name=args.model, cfg=cfg,
                         title="qdlib draft" + {"none": " (ablation: no knowledge)", "live": " (live memory)",
                                                "static": ""}[mode])
            print(f"draft written to {out}")
    return 0


def cmd_train_fast(args) -> int:
    from . import paths
    from .feature_train import FeatureTrainConfig, export_fast_draft, train_feature_draft

    _quiet_hf()
    args.run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "fast_draft"
    if args.export:
        if not (args.run_dir / "best" / "config.json").is_file():
            raise MissingFileError(f"{args.run_dir} holds no trained fast draft (no best/); run `qd train-fast` first")
        out = Path(args.out_dir) if args.out_dir else args.run_dir / "export"
        export_fast_draft(args.run_dir, out)
        print(f"fast draft written to {out}; load it with qdlib.load_draft({str(out)!r})")
        return 0
    cfg = FeatureTrainConfig(num_layers=args.layers, steps=args.steps, lr=args.lr, init_from=args.init_from,
                             max_files=args.max_files)
    train_feature_draft(cfg, args.run_dir, log=lambda s: print(s, flush=True))
    print(f"best draft in {args.run_dir / 'best'}; `qd train-fast --export` measures it and writes its card")
    return 0


def cmd_train_memory(args) -> int:
    from . import paths
    from .draft import load_draft
    from .memory import code_items
    from .memory_train import RetrievalConfig, export_fusion, load_fusion, measure_trained, retrieval_data, train_retrieval

    cfg = RetrievalConfig(items=args.items, steps=args.steps, learning_rate=args.lr, gate_init=args.gate_init,
                          swapped_share=args.swapped_share, question_rows=not args.no_question_rows,
                          fusion_init=args.fusion_init)
    run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "memory_retrieval"
    teacher, tok = _load_teacher(args)
    held_out = {it["id"].split("::")[1] for it in code_items(48)}  # the protocol's items never become training items
    data = retrieval_data(teacher, tok, cfg, run_dir, exclude=held_out)
    best = train_retrieval(teacher, load_draft(), data, cfg, run_dir, log=lambda s: print(s, flush=True))
    weights = run_dir / "best" / "fusion.pt"
    if args.export:  # measure the exported (bf16) weights, so that the file and the protocol agree exactly
        weights = export_fusion(weights, args.export)
        print(f"fusion weights written to {weights}")
    trained = load_draft()
    load_fusion(trained, weights)
    out = Path(args.measure) if args.measure else run_dir / "protocol.json"
    r = measure_trained(out, trained, load_draft(), teacher, tok, training={**best, "config": vars(cfg)})
    for kind in ("paraphrase", "question"):
        gains = {name: r[kind][name]["gain"] for name in ("reference", "retrieval")}
        print(f"{kind} rows: gain over detached (own / swapped / shuffled): "
              + "; ".join(f"{n} {g['own']:+.3f} / {g['swapped']:+.3f} / {g['shuffled']:+.3f}" for n, g in gains.items())
              + f"; copy bound own {r[kind]['copy_bound']['own']['copy_only']:.3f}, "
              f"swapped {r[kind]['copy_bound']['others']['copy_only']:.3f}")
    print(f"protocol written to {out}")
    return 0


def cmd_export_draft(args) -> int:
    from transformers import AutoTokenizer

    from . import paths
    from .draft import export_qwen3, load_draft

    _quiet_hf()
    draft = load_draft(args.draft)
    if not hasattr(draft, "fusion"):
        raise ConfigError(f"{args.draft} is a feature-fed draft: it reads the teacher's hidden states, which no "
                          f"plain Qwen3 does; only layer-sampled drafts export to Qwen3")
    tok = AutoTokenizer.from_pretrained(paths.TEACHER_DIR if args.tokenizer is None else args.tokenizer)
    record = export_qwen3(draft, args.out, tokenizer=tok)
    print(f"Qwen3 draft written to {args.out} ({record['note']}); AutoModelForCausalLM.from_pretrained loads it")
    return 0


def cmd_student(args) -> int:
    from .handouts import write_student_copies

    if args.notebooks is not None and not Path(args.notebooks).is_dir():
        raise MissingFileError(f"--notebooks {args.notebooks}: no such folder; omit it for the course's notebooks")
    written = write_student_copies(args.notebooks, args.out)
    print(f"{len(written)} student notebooks (solutions replaced by `raise NotImplementedError()`, the outputs that "
          f"would reveal an answer cleared) -> {written[0].parent}")
    return 0


def _load_fusion_option(draft, path) -> None:
    """``--fusion FILE``: fusion weights from `qd train-memory --export FILE` put into the draft."""
    from .memory_train import load_fusion

    if not Path(path).is_file():
        raise MissingFileError(f"--fusion {path}: no such file; write one with `qd train-memory --export FILE`")
    if not len(getattr(draft, "fusion", {})):
        raise ConfigError(f"--fusion {path}: this draft has no knowledge path to put fusion weights into")
    try:
        load_fusion(draft, path)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"--fusion {path} does not fit this draft's fusion blocks ({str(exc).splitlines()[0]})") from exc


def cmd_bench(args) -> int:
    from . import paths
    from .bench import capstone_score, run_bench
    from .draft import load_draft
    from .feature_draft import FeatureDraft
    from .models import is_bundled, resolve_device
    from .report import headline, report_markdown, write_report

    cfg = _bench_config(args)
    _check_device(args.device)
    if args.cache is not None and not (Path(args.cache) / "cache.json").is_file():
        raise MissingFileError(f"--cache {args.cache}: no knowledge cache there (no cache.json); build one with "
                               f"`qd build-cache --items FILE --out {args.cache}`")
    if args.draft is None and args.model is not None and not is_bundled(args.model):
        raise ConfigError(f"--model {args.model}: the reference draft belongs to the bundled teacher; pass --draft "
                          f"with a draft distilled from this teacher (`qd distill --config qwen3 --export <folder>`)")
    draft = load_draft(args.draft, device=resolve_device(args.device))  # before the teacher: fails faster
    if args.fusion is not None:
        _load_fusion_option(draft, args.fusion)
    # the "fast" rows: a candidate (the capstone), else the course's fast draft for the bundled teacher
    fast = None
    if args.candidate is not None:
        fast = load_draft(args.candidate, device=resolve_device(args.device))
        if not isinstance(fast, FeatureDraft):
            raise ConfigError(f"--candidate {args.candidate} is a layer-sampled draft; the candidate is a feature-fed "
                              f"draft (`qd train-fast --export DIR`). Compare layer-sampled drafts with --draft")
    elif {"fast", "fast_chain", "fast_lookup"} & set(cfg.method_names) and args.draft is None \
            and (args.model is None or is_bundled(args.model)) \
            and (paths.FAST_DRAFT_DIR / "config.json").is_file():
        fast = load_draft("fast", device=resolve_device(args.device))
    teacher, tok = _load_teacher(args)
    if args.cache is not None:  # a memory of the user's own items (`qd build-cache --items FILE`), no retraining
        from .knowledge import load_knowledge_cache

        draft.set_knowledge(load_knowledge_cache(args.cache, teacher=teacher))
    report = run_bench(teacher, tok, draft, cfg, progress=not args.quiet, fast_draft=fast)
    report["draft"]["fusion"] = args.fusion  # None: the draft's own fusion weights
    out = Path(args.out) if args.out else paths.runs_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    write_report(report, out)
    print(report_markdown(report))
    print(f"report, tables and plot written to {out}")
    if args.candidate is not None and "spec_no_cache" in cfg.method_names and "unfamiliar" in cfg.kinds:
        s = capstone_score(report)
        print(f"capstone: the candidate is {s['candidate_vs_plain']:.2f}x generate_plain, the reference draft "
              f"{s['reference_vs_plain']:.2f}x; score {s['score']:.2f} "
              f"({'beats' if s['beats_reference'] else 'does not beat'} the reference draft"
              f"{'' if s['exact'] else '; its output differed from the teacher, so it scores 0'})")
    h = headline(report)
    return 0 if "speedup" not in h or h["identical"] == h["prompts"] else 1


def _bench_config(args):
    from .bench import BenchConfig, quick_config

    try:
        if args.quick:
            return quick_config()
        kinds = tuple(args.kinds) + (("yours",) if args.code is not None else ())
        return BenchConfig(n_prompts=args.prompts, max_new_tokens=args.new_tokens, gamma=args.gamma,
                           repeats=args.repeats, temperature=args.temperature, sweep_prompts=args.sweep_prompts,
                           gammas=tuple(args.gammas), methods=tuple(args.methods) if args.methods else None,
                           kinds=kinds, code=args.code).validate()
    except ValueError as exc:  # bench.py's checks predate QdError
        raise ConfigError(str(exc)) from exc


def cmd_tour(args) -> int:
    from .tour import tour

    _check_device(args.device)
    _quiet_hf()
    return tour(model=args.model, distill=args.distill, device=args.device)


# ----------------------------------------------------------------------------- what Ctrl-C keeps


def _kept_nothing(args) -> str:
    return "nothing was written"


def _kept_by_distill(args) -> str:
    run = getattr(args, "run_dir", None)
    if run is None:
        return "nothing was written; rerun the same command to start"
    run = Path(run)
    if (run / "last.pt").exists():
        return f"the run in {run} is kept (checkpoint last.pt); rerun the same command to resume"
    kept = [what for what, name in (("the knowledge cache", "knowledge_cache"), ("the training data", "data.pt"))
            if (run / name).exists()]
    if kept:
        return (f"{' and '.join(kept)} in {run} {'is' if len(kept) == 1 else 'are'} kept; rerun the same command to "
                f"continue from there")
    return "nothing was written; rerun the same command to start"


def _kept_by_train_teacher(args) -> str:
    from . import paths

    if args.export:
        return "nothing was written (the export replaces its folder only when complete)"
    run = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "teacher"
    if (run / "last.pt").exists():
        return f"the last checkpoint {run / 'last.pt'} is kept; rerun the same command to resume from it"
    return "no checkpoint was written yet; rerun the same command to start"


def _kept_by_train_fast(args) -> str:
    if args.export:
        return "nothing was written (the export replaces its folder only when complete)"
    if (Path(args.run_dir) / "last.pt").exists():
        return f"the last checkpoint {Path(args.run_dir) / 'last.pt'} is kept; rerun the same command to resume from it"
    return "no checkpoint was written yet; rerun the same command to start"


KEPT_ON_INTERRUPT = {
    "train-teacher": _kept_by_train_teacher,
    "train-fast": _kept_by_train_fast,
    "export-draft": lambda args: "nothing was written (the folder is replaced only when complete)",
    "distill": _kept_by_distill,
    "build-cache": lambda args: "no cache was written (it is saved whole at the end)",
    "train-memory": lambda args: "the last checkpoint (every 100 steps) is kept; rerun the same command to resume",
    "bench": lambda args: "no report was written (it is written at the end); rerun the same command to measure",
    "student": lambda args: "the copies already written are complete; rerun the same command to write them all",
    "tour": lambda args: "the tour writes only under outputs/runs/tour; rerun `qd tour` to start again",
}


# ----------------------------------------------------------------------------- the parser


def _opt(parser, *names, **kwargs):
    """``add_argument`` that insists on help text (a test checks every option has some)."""
    if not kwargs.get("help"):
        raise TypeError(f"option {names[0]} needs help text")
    return parser.add_argument(*names, **kwargs)


def _common(parser, *, device: str = "cpu (default), cuda, cuda:N, mps or auto (cuda, then mps, then cpu)"):
    _opt(parser, "--model", default=None, help="teacher: 'tiny' (bundled), a hub id or a folder; default: $QD_MODEL or tiny")
    _opt(parser, "--device", type=_device, default=None, help=device)


def _add_memory_command(sub) -> None:
    """``train-memory``: retrieval training of the knowledge path, measured by the three-arm protocol."""
    m = sub.add_parser("train-memory", help="retrieval training of the draft's fusion blocks, then the three-arm "
                                            "protocol on held-out items (resumable)")
    _common(m)
    _opt(m, "--items", type=_int_at_least(80), default=400, help="training items (stdlib training functions; default 400)")
    _opt(m, "--steps", type=_int_at_least(1), default=1200, help="optimizer steps (default 1200)")
    _opt(m, "--lr", type=_number_at_least(0.0), default=3e-3, help="peak learning rate of the fusion blocks (default 3e-3)")
    _opt(m, "--gate-init", type=_number_at_least(0.0), default=0.1, help="tanh(gate) at the start, below 1 (default 0.1)")
    _opt(m, "--swapped-share", type=_number_at_least(0.0), default=0.25,
         help="share of steps whose memory holds none of the batch's items, below 1 (default 0.25)")
    _opt(m, "--no-question-rows", action="store_true", help="train on the paraphrase rows only")
    _opt(m, "--fusion-init", choices=["keep", "similarity"], default="keep",
         help="start from the distilled fusion weights (keep, the default) or from a similarity lookup")
    _opt(m, "--run-dir", default=None, help="default: outputs/runs/memory_retrieval")
    _opt(m, "--measure", default=None, help="protocol JSON to write; default: <run-dir>/protocol.json")
    _opt(m, "--export", default=None, help="also write the best fusion weights here (bf16 .safetensors)")
    m.set_defaults(func=cmd_train_memory)


def _add_fast_draft_commands(sub) -> None:
    """``train-fast`` and ``export-draft``: the drafts beyond the seed's design."""
    at_least_1 = _int_at_least(1)
    f = sub.add_parser("train-fast", help="train the fast draft, a draft that reads the teacher (resumable), or export it")
    _opt(f, "--steps", type=at_least_1, default=3000, help="optimizer steps of 16 x 256 tokens (default 3000)")
    _opt(f, "--layers", type=at_least_1, default=1, help="decoder layers of the draft (default 1)")
    _opt(f, "--lr", type=_number_at_least(0.0), default=1e-3, help="peak learning rate (default 1e-3)")
    _opt(f, "--init-from", default=None, help="a fast-draft folder to continue from (more layers allowed: grown)")
    _opt(f, "--max-files", type=at_least_1, default=None, help="only the first N files of each source (quick trials)")
    _opt(f, "--run-dir", default=None, help="default: outputs/runs/fast_draft")
    _opt(f, "--export", action="store_true", help="measure the run's best draft and write it with its card")
    _opt(f, "--out-dir", default=None, help="export target; default: <run-dir>/export")
    f.set_defaults(func=cmd_train_fast)

    x = sub.add_parser("export-draft", help="write a layer-sampled draft as a plain Qwen3 model (serving engines)")
    _opt(x, "out", help="the folder to write (replaced only when complete)")
    _opt(x, "--draft", default=None, help="a layer-sampled draft folder; default: the course's reference draft "
                                          "(its knowledge path is dropped, as with the cache detached)")
    _opt(x, "--format", choices=("qwen3",), default="qwen3", help="qwen3: Qwen3ForCausalLM with its tokenizer (the only format)")
    _opt(x, "--tokenizer", default=None, help="tokenizer folder or hub id to copy beside it; default: the bundled teacher's")
    x.set_defaults(func=cmd_export_draft)


BENCH_KINDS = ("code", "unfamiliar", "paraphrase")  # qdlib.bench.KINDS but 'yours' (--code adds it)


def _add_distill_command(sub) -> None:
    """``distill``: layer-sampled distillation (static, live or no memory), resumable, with export."""
    at_least_1 = _int_at_least(1)
    d = sub.add_parser("distill", help="distil a draft from the teacher (resumable; runs under accelerate launch)")
    _opt(d, "--config", default="tiny", help="'tiny', 'qwen3' or a YAML file (see qdlib/configs)")
    _common(d, device="cpu, cuda or auto; default: what Accelerate picks (cuda, then mps, then cpu)")
    _opt(d, "--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
         help="override one config key, checked like the file (repeatable), e.g. training.learning_rate=1.0e-3")
    _opt(d, "--list-keys", action="store_true", help="list every config key with its value (after --set) and what is allowed, then stop")
    _opt(d, "--run-dir", default=None, help="default: outputs/runs/distill/<config>")
    _opt(d, "--num-epochs", dest="num_epochs", type=at_least_1, default=None, help="= --set training.num_epochs=N")
    _opt(d, "--steps-per-epoch", dest="steps_per_epoch", type=at_least_1, default=None,
         help="= --set training.steps_per_epoch=N")
    _opt(d, "--batch-size", dest="batch_size", type=at_least_1, default=None, help="= --set training.batch_size=N")
    _opt(d, "--knowledge", choices=("static", "live", "none"), default=None,
         help="what the fusion blocks read: static (a knowledge cache, the config's default), live (the teacher's "
              "states of the verified text, qdlib.memories) or none (the ablation); run folder default "
              "outputs/runs/distill/<config>[_live|_no_knowledge]")
    _opt(d, "--no-knowledge", action="store_true", help="the ablation: the same draft without knowledge fusion "
         "(= --knowledge none)")
    export = d.add_mutually_exclusive_group()
    _opt(export, "--export", default=None, metavar="DIR", help="after training, measure the best draft and write it to DIR")
    _opt(export, "--export-only", default=None, metavar="DIR", help="skip training; export the run's best draft to DIR")
    d.set_defaults(func=cmd_distill)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qd", description="qdlib: draft models and speculative decoding, step by step")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    at_least_1, at_least_0, non_negative = _int_at_least(1), _int_at_least(0), _number_at_least(0.0)

    g = sub.add_parser("generate", help="generate text with the teacher")
    _common(g)
    _opt(g, "--prompt", default=DEFAULT_PROMPT, help="the text to continue (default: a function signature)")
    _opt(g, "--escapes", action="store_true", help="interpret \\n and friends in --prompt")
    _opt(g, "--max-new-tokens", type=at_least_1, default=64, help="tokens to generate (default 64)")
    _opt(g, "--temperature", type=non_negative, default=0.0, help="0 = greedy (default); > 0 samples")
    _opt(g, "--seed", type=at_least_0, default=0, help="random seed for sampling (default 0)")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-teacher", help="train the bundled teacher (resumable) or export it")
    _opt(t, "--steps", type=at_least_1, default=None, help="main-phase optimizer steps (default 2400)")
    _opt(t, "--run-dir", default=None, help="default: outputs/runs/teacher")
    _opt(t, "--out-dir", default=None, help="export target; default: outputs/teacher")
    _opt(t, "--export", action="store_true", help="measure and write the trained teacher")
    _opt(t, "--no-compile", action="store_true", help="skip torch.compile")
    _opt(t, "--ul-steps", type=at_least_0, default=None, help="unlikelihood polish steps after the main run (default 100)")
    t.set_defaults(func=cmd_train_teacher)

    _add_fast_draft_commands(sub)

    c = sub.add_parser("compare-layers", help="compare untrained drafts from each layer-sampling strategy")
    _common(c)
    _opt(c, "--k", type=_int_at_least(2), nargs="+", default=[4, 6, 8], help="draft depths to compare (default 4 6 8)")
    _opt(c, "--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES, help="layer-sampling strategies (default: all)")
    _opt(c, "--windows", type=at_least_1, default=16, help="held-out windows to score (default 16)")
    _opt(c, "--seq-len", type=_int_at_least(2), default=128, help="tokens per window (default 128)")
    _opt(c, "--calibration-texts", type=at_least_1, default=4, help="held-out files used for importance scores (default 4)")
    c.set_defaults(func=cmd_compare_layers)

    b = sub.add_parser("build-cache", help="build and save the knowledge cache for the configured teacher")
    _common(b)
    _opt(b, "--items", default=None, help="YAML file of knowledge items; default: the built-in set")
    _opt(b, "--layer", type=at_least_0, default=None, help="teacher layer to cache; default: the last")
    _opt(b, "--answer-tokens", type=at_least_1, default=48, help="teacher answer tokens cached per item (default 48)")
    _opt(b, "--out", default=None, help="output folder; default: outputs/runs/knowledge_cache/<teacher>")
    b.set_defaults(func=cmd_build_cache)
    _add_memory_command(sub)

    _add_distill_command(sub)

    s = sub.add_parser("student", help="write student copies of the notebooks (no solutions; figures and outputs kept)")
    _opt(s, "--notebooks", default=None, help="source folder; default: the course's notebooks/")
    _opt(s, "--out", default=None, help="target folder; default: outputs/runs/student")
    s.set_defaults(func=cmd_student)

    be = sub.add_parser("bench", help="measure every decoding method side by side (report, tables, plots)")
    _common(be)
    _opt(be, "--draft", default=None, help="draft folder; default: the reference draft (outputs/reference_draft)")
    _opt(be, "--prompts", type=at_least_1, default=8, help="prompts per kind")
    _opt(be, "--new-tokens", type=at_least_1, default=64, help="tokens generated per prompt (default 64)")
    _opt(be, "--gamma", type=at_least_1, default=4, help="draft tokens proposed per round (default 4)")
    _opt(be, "--repeats", type=at_least_1, default=3, help="timed repeats per method; the median is reported (default 3)")
    _opt(be, "--temperature", type=non_negative, default=0.8, help="the sampling-mode rows; 0 skips them")
    _opt(be, "--gammas", type=at_least_1, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8], help="the gamma sweep")
    _opt(be, "--sweep-prompts", type=at_least_0, default=4, help="code prompts for the sweep; 0 skips it")
    _opt(be, "--methods", nargs="+", default=None, help="a subset of the methods (see qdlib.bench.METHODS)")
    _opt(be, "--kinds", nargs="+", default=list(BENCH_KINDS), choices=BENCH_KINDS, help="prompt kinds: held-out stdlib "
         "code, unfamiliar third-party code, knowledge paraphrases (default: all three)")
    _opt(be, "--code", default=None, metavar="PATH", help="your own Python code (a .py file or folder): prompts cut "
         "from it as from the unfamiliar set, every method measured on them")
    _opt(be, "--quick", action="store_true",
         help="the capstone's scoring run (about a minute): 3 unfamiliar-code prompts, 48 tokens, greedy, 2 repeats; "
              "generate, generate_plain, the reference draft and the fast draft or --candidate; other settings ignored")
    _opt(be, "--candidate", default=None, metavar="DIR",
         help="a feature-fed draft folder (`qd train-fast --export DIR`) measured in the fast rows instead of the "
              "committed one; with --quick, prints its capstone score against the reference draft")
    _opt(be, "--cache", default=None, metavar="DIR",
         help="attach this knowledge cache (`qd build-cache --items FILE`); its items' eval_paraphrases become the "
              "paraphrase prompts")
    _opt(be, "--fusion", default=None, metavar="FILE",
         help="fusion weights for the draft (`qd train-memory --export FILE`)")
    _opt(be, "--out", default=None, help="report folder; default: outputs/runs/bench/<time>")
    _opt(be, "--quiet", action="store_true", help="no progress bar")
    be.set_defaults(func=cmd_bench)

    to = sub.add_parser("tour", help="the whole story, headless, in a few minutes")
    _common(to)
    _opt(to, "--distill", action="store_true", help="distil a small draft on the spot instead of loading one")
    to.set_defaults(func=cmd_tour)
    return p


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> int:
    """Run ``qd``; qdlib's errors and Ctrl-C end in one line on stderr (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QdError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        note = _one_line(exc.args[0]) if exc.args else ""  # the library may say what it kept
        note = note or KEPT_ON_INTERRUPT.get(args.command, _kept_nothing)(args)
        print("\n" + (note if note.startswith("interrupted") else f"interrupted: {note}"), file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
