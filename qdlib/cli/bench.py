"""``qd bench``: every decoding method side by side, over the drafts the options name."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError, MissingFileError
from .options import listed, settings_from
from .shared import check_device, load_teacher_for


def _load_fusion_option(draft, path) -> None:
    """``--fusion FILE``: fusion weights from `qd train-memory --export FILE` put into the draft."""
    from ..memory_train import load_fusion

    if not Path(path).is_file():
        raise MissingFileError(f"--fusion {path}: no such file; write one with `qd train-memory --export FILE`")
    if not len(getattr(draft, "fusion", {})):
        raise ConfigError(f"--fusion {path}: this draft has no knowledge path to put fusion weights into")
    try:
        load_fusion(draft, path)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"--fusion {path} does not fit this draft's fusion blocks ({str(exc).splitlines()[0]})") from exc


def cmd_bench(args) -> int:
    from .. import paths
    from ..bench import capstone_score, run_bench
    from ..bench_methods import ablation_drafts
    from ..draft_files import load_draft
    from ..models import is_bundled, resolve_device
    from ..report import headline, report_markdown, write_report

    cfg = _bench_config(args)
    if listed(args, cfg):
        return 0
    check_device(args.device)
    if args.cache is not None and not (Path(args.cache) / "cache.json").is_file():
        raise MissingFileError(f"--cache {args.cache}: no knowledge cache there (no cache.json); build one with "
                               f"`qd build-cache --items FILE --out {args.cache}`")
    if args.draft is None and args.model is not None and not is_bundled(args.model):
        raise ConfigError(f"--model {args.model}: the reference draft belongs to the bundled teacher; pass --draft "
                          f"with a draft distilled from this teacher (`qd distill --config qwen3 --export <folder>`)")
    draft = load_draft(args.draft, device=resolve_device(args.device))  # before the teacher: fails faster
    if args.fusion is not None:
        _load_fusion_option(draft, args.fusion)
    drafts = {"reference": draft}
    # the "fast" rows: a candidate (the capstone), else the course's fast draft for the bundled teacher
    if args.candidate is not None:
        drafts["fast"] = load_draft(args.candidate, device=resolve_device(args.device))
    elif {"fast", "fast_chain", "fast_lookup"} & set(cfg.method_names) and args.draft is None \
            and (args.model is None or is_bundled(args.model)) \
            and (paths.FAST_DRAFT_DIR / "config.json").is_file():
        drafts["fast"] = load_draft("fast", device=resolve_device(args.device))
    for name, folder in _named_drafts(args.add):  # drafts of your own, one row each
        drafts[name] = load_draft(folder, device=resolve_device(args.device))
    teacher, tok = load_teacher_for(args)
    drafts |= ablation_drafts(teacher, draft, cfg.method_names)  # the never-distilled drafts, when asked for
    if args.cache is not None:  # a memory of the user's own items (`qd build-cache --items FILE`), no retraining
        from ..knowledge import load_knowledge_cache

        draft.set_knowledge(load_knowledge_cache(args.cache, teacher=teacher))
    report = run_bench(teacher, tok, drafts, cfg, progress=not args.quiet)
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


def _named_drafts(specs) -> list[tuple[str, str]]:
    """``--add NAME=DIR`` options as ``(name, folder)``, each checked."""
    from ..bench_methods import ROLES
    from ..settings.bench import METHODS

    out = []
    for spec in specs or ():
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--add {spec!r}: write NAME=DIR, e.g. --add mine=outputs/runs/my_draft/export")
        if name in METHODS or name in ROLES or name in dict(out):
            raise ConfigError(f"--add {spec!r}: the name {name!r} is taken (a method, a role or another --add); "
                              f"allowed: a new name")
        if not (Path(folder) / "config.json").is_file():
            raise MissingFileError(f"--add {spec!r}: {folder} holds no draft (no config.json)")
        out.append((name, folder))
    return out


def _bench_config(args):
    """The options and ``--set`` over the defaults, or over ``--quick``'s preset; ``--code PATH`` adds its kind."""
    from ..settings.bench import KINDS, QUICK

    preset = QUICK if args.quick else {}
    if args.setting__code is not None and "yours" not in (args.setting__kinds or ()):
        kinds = preset.get("kinds", [k for k in KINDS if k != "yours"])
        args.setting__kinds = list(args.setting__kinds or kinds) + ["yours"]
    return settings_from(args, preset)
