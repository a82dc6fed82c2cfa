"""The ``qd`` command: thin argument parsing over qdlib's modules.

    qd generate --prompt "def fibonacci(n):"     # the bundled teacher writes code
    qd train-teacher                              # train the bundled teacher (resumable)
    qd train-teacher --export                     # write outputs/teacher
    qd compare-layers --k 6                       # untrained drafts, side by side
    qd build-cache                                # the knowledge cache for the configured teacher
    qd distill --config tiny                      # distil the reference draft (resumable)
    qd distill --config tiny --export outputs/reference_draft   # measure the best draft and write it
    qd student                                    # student copies of the notebooks (solutions stubbed)
    qd bench                                      # every decoding method side by side, report + plots
    qd tour                                       # the whole story in a few minutes

``QD_MODEL`` (or ``--model``) selects another teacher, e.g. ``Qwen/Qwen3-0.6B`` or a local folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = 'def read_config(path):\n    """Read a JSON configuration file and return it as a dict."""\n'


def _quiet_hf():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in command output


def _load_teacher(args):
    """``(model, tokenizer)`` for ``--model``/``--device``, or None after printing why it failed."""
    from .models import TeacherLoadError, load_teacher

    _quiet_hf()
    try:
        return load_teacher(args.model, device=args.device)
    except TeacherLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_generate(args) -> int:
    import torch

    loaded = _load_teacher(args)
    if loaded is None:
        return 2
    model, tok = loaded
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
    print(f"\n[{len(new)} new tokens in {dt:.2f} s = {len(new) / dt:.1f} tokens/s; "
          f"teacher: {args.model or os.environ.get('QD_MODEL') or 'tiny'}, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}]", file=sys.stderr)
    return 0


def cmd_train_teacher(args) -> int:
    from .teacher import TeacherTrainConfig, export_teacher, train_teacher

    _quiet_hf()
    if args.export:
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
    from .metrics import compare_strategies, format_table, text_windows
    from .sampling import layer_importance
    from .corpus import heldout_texts

    loaded = _load_teacher(args)
    if loaded is None:
        return 2
    teacher, tok = loaded
    texts = heldout_texts()
    calibration, evaluation = texts[: args.calibration_texts], texts[args.calibration_texts :]
    batches = text_windows(tok, evaluation, seq_len=args.seq_len, n=args.windows)  # scored apart from calibration
    strategies = list(args.strategies)
    scores = None
    if "importance" in strategies:
        scores = layer_importance(teacher, tok, calibration)
    rows = compare_strategies(teacher, batches, ks=args.k, strategies=strategies, importance_scores=scores)
    print(f"untrained drafts of {args.model or os.environ.get('QD_MODEL') or 'tiny'} on {args.windows} held-out "
          f"windows of {args.seq_len} tokens (KL = KL(teacher || draft), agree = top-1 agreement, alpha = E[sum min(p, q)])")
    print(format_table(rows))
    return 0


def cmd_build_cache(args) -> int:
    from . import paths
    from .knowledge import build_knowledge_cache
    from .models import model_name

    loaded = _load_teacher(args)
    if loaded is None:
        return 2
    teacher, tok = loaded
    cache = build_knowledge_cache(teacher, tok, args.items, layer=args.layer, answer_tokens=args.answer_tokens)
    out = args.out or paths.runs_dir() / "knowledge_cache" / model_name(teacher).replace("/", "--")
    cache.save(out)
    print(f"knowledge cache of {cache.num_items} items x {cache.states.shape[1]} tokens x {cache.hidden_size} "
          f"(layer {cache.layer}, {cache.memory_bytes() / 2**20:.2f} MiB, fingerprint {cache.fingerprint}) -> {out}")
    return 0


def cmd_distill(args) -> int:
    from . import paths
    from .distill import DEFAULT_CONFIGS, load_config
    from .trainer import TrainingStopped, distill, export_draft

    path = DEFAULT_CONFIGS.get(args.config, args.config)
    try:
        cfg = load_config(path)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key in ("num_epochs", "steps_per_epoch", "batch_size"):
        if getattr(args, key) is not None:
            setattr(cfg.training, key, getattr(args, key))
    if args.no_knowledge:
        cfg.knowledge_enhancement.enabled = False
        if cfg.training.train_params == "fusion":
            print("error: --no-knowledge leaves no fusion parameters to train (train_params: fusion)", file=sys.stderr)
            return 2
    from .models import TeacherLoadError

    _quiet_hf()
    name = Path(str(path)).stem + ("_no_knowledge" if args.no_knowledge else "")
    run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "distill" / name
    try:
        if not args.export_only:
            # the teacher is loaded by every process on its own device
            distill(cfg, run_dir, teacher_name=args.model)
        if args.export or args.export_only:
            from accelerate.state import PartialState

            if PartialState().is_main_process:
                out = args.export or args.export_only
                export_draft(run_dir, out, teacher_name=args.model, cfg=cfg,
                             title="qdlib draft" + (" (ablation: no knowledge)" if args.no_knowledge else ""))
                print(f"draft written to {out}")
    except TeacherLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def cmd_student(args) -> int:
    from .student import write_student_copies

    written = write_student_copies(args.notebooks, args.out)
    print(f"{len(written)} student notebooks (solutions replaced by `raise NotImplementedError()`, outputs cleared) "
          f"-> {written[0].parent}")
    return 0


def _load_draft_for(args, teacher):
    """The draft for ``qd bench``: ``--draft`` or the reference draft; None after printing why not."""
    from .draft import DraftLoadError, load_draft

    try:
        return load_draft(args.draft, device=teacher.device)
    except DraftLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_bench(args) -> int:
    from . import paths
    from .bench import BenchConfig, run_bench
    from .report import headline, report_markdown, write_report

    try:
        cfg = BenchConfig(n_prompts=args.prompts, max_new_tokens=args.new_tokens, gamma=args.gamma,
                          repeats=args.repeats, temperature=args.temperature, sweep_prompts=args.sweep_prompts,
                          gammas=tuple(args.gammas), methods=tuple(args.methods) if args.methods else None,
                          kinds=tuple(args.kinds)).validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loaded = _load_teacher(args)
    if loaded is None:
        return 2
    teacher, tok = loaded
    draft = _load_draft_for(args, teacher)
    if draft is None:
        return 2
    report = run_bench(teacher, tok, draft, cfg, progress=not args.quiet)
    out = Path(args.out) if args.out else paths.runs_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    write_report(report, out)
    print(report_markdown(report))
    print(f"report, tables and plot written to {out}")
    h = headline(report)
    return 0 if "speedup" not in h or h["identical"] == h["prompts"] else 1


def cmd_tour(args) -> int:
    from .tour import tour

    _quiet_hf()
    return tour(model=args.model, distill=args.distill, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qd", description="qdlib: draft models and speculative decoding, step by step")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with the teacher")
    g.add_argument("--model", default=None, help="'tiny' (bundled), a hub id or a folder; default: $QD_MODEL or tiny")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--escapes", action="store_true", help="interpret \\n and friends in --prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu (default), cuda, mps or auto")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-teacher", help="train the bundled teacher (resumable) or export it")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--run-dir", default=None, help="default: outputs/runs/teacher")
    t.add_argument("--out-dir", default=None, help="export target; default: outputs/teacher")
    t.add_argument("--export", action="store_true", help="measure and write the trained teacher")
    t.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    t.add_argument("--ul-steps", type=int, default=None, help="unlikelihood polish steps after the main run (default 100)")
    t.set_defaults(func=cmd_train_teacher)

    c = sub.add_parser("compare-layers", help="compare untrained drafts from each layer-sampling strategy")
    c.add_argument("--model", default=None)
    c.add_argument("--k", type=int, nargs="+", default=[4, 6, 8])
    c.add_argument("--strategies", nargs="+", default=["uniform", "geometric", "logarithmic", "importance", "first-k"],
                   choices=["uniform", "geometric", "logarithmic", "importance", "first-k"])
    c.add_argument("--windows", type=int, default=16, help="held-out windows to score")
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--calibration-texts", type=int, default=4, help="held-out files used for importance scores")
    c.add_argument("--device", default=None)
    c.set_defaults(func=cmd_compare_layers)

    b = sub.add_parser("build-cache", help="build and save the knowledge cache for the configured teacher")
    b.add_argument("--model", default=None)
    b.add_argument("--items", default=None, help="YAML file of knowledge items; default: the built-in set")
    b.add_argument("--layer", type=int, default=None, help="teacher layer to cache; default: the last")
    b.add_argument("--answer-tokens", type=int, default=48)
    b.add_argument("--out", default=None, help="output folder; default: outputs/runs/knowledge_cache/<teacher>")
    b.add_argument("--device", default=None)
    b.set_defaults(func=cmd_build_cache)

    d = sub.add_parser("distill", help="distil a draft from the teacher (resumable; runs under accelerate launch)")
    d.add_argument("--config", default="tiny", help="'tiny', 'qwen3' or a YAML file (see qdlib/configs)")
    d.add_argument("--model", default=None, help="teacher; default: $QD_MODEL or tiny")
    d.add_argument("--device", default=None)
    d.add_argument("--run-dir", default=None, help="default: outputs/runs/distill/<config>")
    d.add_argument("--num-epochs", dest="num_epochs", type=int, default=None)
    d.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int, default=None)
    d.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    d.add_argument("--no-knowledge", action="store_true", help="the ablation: the same draft without knowledge fusion")
    d.add_argument("--export", default=None, metavar="DIR", help="after training, measure the best draft and write it to DIR")
    d.add_argument("--export-only", default=None, metavar="DIR", help="skip training; export the run's best draft to DIR")
    d.set_defaults(func=cmd_distill)

    s = sub.add_parser("student", help="write student copies of the notebooks (no solutions, no outputs)")
    s.add_argument("--notebooks", default=None, help="source folder; default: the course's notebooks/")
    s.add_argument("--out", default=None, help="target folder; default: outputs/runs/student")
    s.set_defaults(func=cmd_student)

    be = sub.add_parser("bench", help="measure every decoding method side by side (report, tables, plots)")
    be.add_argument("--model", default=None, help="teacher; default: $QD_MODEL or tiny")
    be.add_argument("--draft", default=None, help="draft folder; default: the reference draft (outputs/reference_draft)")
    be.add_argument("--device", default=None)
    be.add_argument("--prompts", type=int, default=8, help="prompts per kind (held-out code, knowledge paraphrases)")
    be.add_argument("--new-tokens", type=int, default=64)
    be.add_argument("--gamma", type=int, default=4)
    be.add_argument("--repeats", type=int, default=3)
    be.add_argument("--temperature", type=float, default=0.8, help="the sampling-mode rows; 0 skips them")
    be.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8], help="the gamma sweep")
    be.add_argument("--sweep-prompts", type=int, default=4, help="code prompts for the sweep; 0 skips it")
    be.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (see qdlib.bench.METHODS)")
    be.add_argument("--kinds", nargs="+", default=["code", "paraphrase"], choices=["code", "paraphrase"])
    be.add_argument("--out", default=None, help="report folder; default: outputs/runs/bench/<time>")
    be.add_argument("--quiet", action="store_true", help="no progress bar")
    be.set_defaults(func=cmd_bench)

    to = sub.add_parser("tour", help="the whole story, headless, in a few minutes")
    to.add_argument("--model", default=None, help="teacher; default: $QD_MODEL or tiny")
    to.add_argument("--device", default=None)
    to.add_argument("--distill", action="store_true", help="distil a small draft on the spot instead of loading one")
    to.set_defaults(func=cmd_tour)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
