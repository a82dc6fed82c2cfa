"""The ``qd`` commands that use the teacher and the drafts: generate, compare-layers, build-cache, export-draft,
student, tour (the trainings are in :mod:`.train`, the bench in :mod:`.bench`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import ConfigError, MissingFileError
from .shared import check_device, load_teacher_for, quiet_hf, teacher_config, teacher_label, teacher_layers

DEFAULT_PROMPT = 'def read_config(path):\n    """Read a JSON configuration file and return it as a dict."""\n'


def cmd_generate(args) -> int:
    import torch

    check_device(args.device)
    model, tok = load_teacher_for(args)
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
    print(f"\n[{len(new)} new tokens in {dt:.2f} s = {len(new) / dt:.1f} tokens/s; teacher: {teacher_label(args)}, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}]", file=sys.stderr)
    return 0


def cmd_compare_layers(args) -> int:
    from ..corpus import heldout_texts
    from ..metrics import compare_strategies, format_table, text_windows
    from ..sampling import layer_importance

    check_device(args.device)
    positions = (teacher_config(args.model) or {}).get("max_position_embeddings")
    if positions is not None and args.seq_len > positions:
        raise ConfigError(f"--seq-len {args.seq_len} is longer than the teacher's {positions} positions; "
                          f"allowed: 2..{positions}")
    layers = teacher_layers(args.model)
    too_many = [k for k in args.k if layers is not None and k > layers]
    if too_many:
        raise ConfigError(f"--k {' '.join(map(str, too_many))} is more than the teacher's {layers} layers; "
                          f"allowed: 2..{layers}")
    teacher, tok = load_teacher_for(args)
    texts = heldout_texts()
    calibration, evaluation = texts[: args.calibration_texts], texts[args.calibration_texts :]
    batches = text_windows(tok, evaluation, seq_len=args.seq_len, n=args.windows)  # scored apart from calibration
    strategies = list(args.strategies)
    scores = None
    if "importance" in strategies:
        scores = layer_importance(teacher, tok, calibration)
    rows = compare_strategies(teacher, batches, ks=args.k, strategies=strategies, importance_scores=scores)
    print(f"untrained drafts of {teacher_label(args)} on {args.windows} held-out windows of {args.seq_len} tokens "
          f"(KL = KL(teacher || draft), agree = top-1 agreement, alpha = E[sum min(p, q)])")
    print(format_table(rows))
    return 0


def cmd_build_cache(args) -> int:
    from .. import paths
    from ..knowledge import build_knowledge_cache
    from ..models import model_name

    check_device(args.device)
    if args.items is not None and not Path(args.items).is_file():
        raise MissingFileError(f"--items {args.items}: no such file; omit it for the built-in items")
    layers = teacher_layers(args.model)
    if args.layer is not None and layers is not None and args.layer >= layers:
        raise ConfigError(f"--layer {args.layer} is not a layer of the teacher; allowed: 0..{layers - 1}")
    teacher, tok = load_teacher_for(args)
    cache = build_knowledge_cache(teacher, tok, args.items, layer=args.layer, answer_tokens=args.answer_tokens)
    out = args.out or paths.runs_dir() / "knowledge_cache" / model_name(teacher).replace("/", "--")
    cache.save(out)
    print(f"knowledge cache of {cache.num_items} items x {cache.states.shape[1]} tokens x {cache.hidden_size} "
          f"(layer {cache.layer}, {cache.memory_bytes() / 2**20:.2f} MiB, fingerprint {cache.fingerprint}) -> {out}")
    return 0


def cmd_export_draft(args) -> int:
    from transformers import AutoTokenizer

    from .. import paths
    from ..draft_files import export_qwen3, load_draft

    quiet_hf()
    draft = load_draft(args.draft)
    tok = AutoTokenizer.from_pretrained(paths.TEACHER_DIR if args.tokenizer is None else args.tokenizer)
    record = export_qwen3(draft, args.out, tokenizer=tok)
    print(f"Qwen3 draft written to {args.out} ({record['note']}); AutoModelForCausalLM.from_pretrained loads it")
    return 0


def cmd_student(args) -> int:
    from ..handouts import write_student_copies

    if args.notebooks is not None and not Path(args.notebooks).is_dir():
        raise MissingFileError(f"--notebooks {args.notebooks}: no such folder; omit it for the course's notebooks")
    written = write_student_copies(args.notebooks, args.out)
    print(f"{len(written)} student notebooks (solutions replaced by `raise NotImplementedError()`, the outputs that "
          f"would reveal an answer cleared) -> {written[0].parent}")
    return 0


def cmd_tour(args) -> int:
    from ..tour import tour

    check_device(args.device)
    quiet_hf()
    return tour(model=args.model, distill=args.distill, device=args.device)
