"""The ``qd`` commands that train: train-teacher, train-fast, train-memory and distill. Each builds its config from
the options its schema made (:func:`.options.settings_from`), so a bad value is named before any model loads."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import ConfigError, MissingFileError
from .options import listed, option_overrides, settings_from
from .shared import check_device, load_teacher_for, quiet_hf, teacher_layers


def cmd_train_teacher(args) -> int:
    from .. import paths
    from ..teacher import export_teacher, train_teacher

    cfg = settings_from(args)
    if listed(args, cfg):
        return 0
    quiet_hf()
    if args.export:
        run = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "teacher"
        if not (run / "last.pt").is_file():
            raise MissingFileError(f"{run} holds no trained teacher (no last.pt); run `qd train-teacher` first")
        export_teacher(args.run_dir, args.out_dir)
        return 0
    train_teacher(cfg, args.run_dir)
    return 0


def cmd_train_fast(args) -> int:
    from .. import paths
    from ..feature_train import export_fast_draft, train_feature_draft

    cfg = settings_from(args)
    if listed(args, cfg):
        return 0
    quiet_hf()
    args.run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "fast_draft"
    if args.export:
        if not (args.run_dir / "best" / "config.json").is_file():
            raise MissingFileError(f"{args.run_dir} holds no trained fast draft (no best/); run `qd train-fast` first")
        out = Path(args.out_dir) if args.out_dir else args.run_dir / "export"
        export_fast_draft(args.run_dir, out)
        print(f"fast draft written to {out}; load it with qdlib.load_draft({str(out)!r})")
        return 0
    train_feature_draft(cfg, args.run_dir, log=lambda s: print(s, flush=True))
    print(f"best draft in {args.run_dir / 'best'}; `qd train-fast --export` measures it and writes its card")
    return 0


def cmd_train_memory(args) -> int:
    from .. import paths
    from ..draft_files import load_draft
    from ..memory import code_items
    from ..memory_train import export_fusion, load_fusion, measure_trained, retrieval_data, train_retrieval

    cfg = settings_from(args)
    if listed(args, cfg):
        return 0
    check_device(args.device)
    run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "memory_retrieval"
    teacher, tok = load_teacher_for(args)
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


def distill_overrides(args) -> list[str]:
    """``--set`` strings, then the training options (which win), as ``section.key=value``."""
    overrides = option_overrides(args, "training")
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
    from ..settings import DEFAULT_CONFIGS, config_keys, load_config

    from .. import paths

    mode = _knowledge_mode(args)
    path = DEFAULT_CONFIGS.get(args.config, args.config)
    cfg = load_config(path, num_layers=teacher_layers(args.model), overrides=distill_overrides(args))
    if args.list_keys:
        print("\n".join(config_keys(cfg)))
        return 0
    check_device(args.device)
    if mode == "static" and cfg.knowledge_enhancement.enabled and cfg.knowledge_enhancement.memory == "live":
        mode = "live"  # the config file asks for it
    name = Path(str(path)).stem + {"none": "_no_knowledge", "live": "_live", "static": ""}[mode]
    args.run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / "distill" / name
    from accelerate.state import PartialState

    from ..trainer import distill, export_draft

    quiet_hf()
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
