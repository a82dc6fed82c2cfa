"""``qd tour``: the whole story, headless, in a few minutes on a laptop CPU.

    $ qd tour                 # bundled teacher, committed reference draft
    $ qd tour --distill        # distil a small draft on the spot (about 3 minutes more)
    $ QD_MODEL=Qwen/Qwen3-0.6B qd tour --distill

Six steps, one per notebook: load the teacher; sample its layers; load (or
build) the knowledge cache; load the reference draft (or distil one); decode
speculatively with the token view in colour; the fast draft that reads the
teacher (notebook 07), on third-party code no training used; end with a short
benchmark of both drafts beside the teacher alone, interleaved and repeated. Each
step prints what it did and how long it took. Everything it writes goes under
``outputs/runs/tour/``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from . import paths, trainer
from .bench import BenchConfig, run_bench
from .corpus import heldout_prompts, heldout_texts
from .costs import count_params
from .settings import DEFAULT_CONFIGS, load_config
from .draft import build_draft
from .draft_files import DraftLoadError, load_draft
from .heldout_code import heldout_code_prompts
from .knowledge import build_knowledge_cache, load_items, nearest_items
from .models import TeacherLoadError, is_bundled, load_teacher, model_name
from .report import report_markdown
from .sampling import sample_layers
from .speculative import hf_generate_kwargs, speculative_generate
from .viz import layer_strip, render_trace_ansi


def _say(title: str):
    print(f"\n\033[1m{title}\033[0m" if sys.stdout.isatty() else f"\n== {title}")


def _short_distil(teacher, tokenizer, run_dir, log=print):
    """A small distillation (the tour's ``--distill``): 40 steps on a reduced data mix, knowledge on."""
    cfg = load_config(DEFAULT_CONFIGS["tiny" if is_bundled(model_name(teacher)) else "qwen3"])
    t = cfg.training
    t.num_epochs, t.steps_per_epoch, t.checkpoint_every = 1, 40, 20
    t.generated_sequences, t.max_text_tokens, t.item_share = 32, 200_000, 0.1
    t.eval_prompts, t.eval_new_tokens, t.eval_text_windows = 8, 32, 4
    t.batch_size = min(t.batch_size, 8)
    trainer.distill(cfg, run_dir / "run", teacher=teacher, tokenizer=tokenizer, log=log)
    trainer.export_draft(run_dir / "run", run_dir / "draft", teacher=teacher, tokenizer=tokenizer, cfg=cfg,
                 n_prompts=8, title="qd tour draft (40 steps)", log=log)
    return run_dir / "draft"


def tour(model: str | None = None, *, distill: bool = False, device=None) -> int:
    """Run the tour; returns a process exit code (0 when the speculative output equals the teacher's)."""
    t_start = time.perf_counter()
    torch.manual_seed(0)

    _say("1. The teacher")
    try:
        teacher, tok = load_teacher(model, device=device)
    except TeacherLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = model_name(teacher)
    L = teacher.config.num_hidden_layers
    print(f"{name}: {L} decoder layers, hidden size {teacher.config.hidden_size}, "
          f"{count_params(teacher) / 1e6:.1f}M parameters, vocabulary {teacher.config.vocab_size}")

    _say("2. Layer sampling: which of the teacher's layers a 6-layer draft keeps")
    for strategy in ("uniform", "geometric", "logarithmic"):
        layers = sample_layers(L, 6, strategy=strategy)
        print(f"{strategy:>12}  {layer_strip(L, layers)}  {layers}")

    draft = _draft_step(teacher, tok, distill)
    same = _speculative_step(teacher, tok, draft, is_bundled(name))
    fast = _fast_step(teacher, tok, draft) if is_bundled(name) else None
    _bench_step(teacher, tok, draft, fast, is_bundled(name))
    print(f"\ntour finished in {time.perf_counter() - t_start:.0f} s")
    print("\nNext, measure it on your own code (a .py file or a project folder; nothing else should run meanwhile):\n"
          "  qd bench --code path/to/your/project --kinds unfamiliar --temperature 0 --sweep-prompts 0 \\\n"
          "           --methods teacher_generate teacher_plain fast")
    return 0 if same else 1


def _draft_step(teacher, tok, distill: bool):
    """Step 3: the reference draft (or one distilled now, or an untrained one) and its knowledge cache."""
    _say("3. The draft and its knowledge cache")
    draft = None
    if distill:
        card = paths.DRAFT_DIR / "metrics.json"
        ref = f"; the reference draft had {json.loads(card.read_text())['steps']:,}" if card.exists() else ""
        print(f"distilling a small draft (40 steps{ref}) ...")
        draft = load_draft(_short_distil(teacher, tok, paths.runs_dir() / "tour", log=print), device=teacher.device)
    else:
        try:
            draft = load_draft(None, device=teacher.device)
            print(f"the course's reference draft ({paths.DRAFT_DIR.name})")
        except DraftLoadError as exc:
            print(f"note: {exc}")
            print("continuing with an untrained uniform draft with a knowledge cache built now "
                  "(run `qd tour --distill` to distil one first)")
    if draft is None:
        L = teacher.config.num_hidden_layers
        draft = build_draft(teacher, sample_layers(L, 6), knowledge_enhancement={"enabled": True}).float()
        draft.set_knowledge(build_knowledge_cache(teacher, tok, progress=False))
    cache = draft.knowledge
    print(f"draft layers {draft.config.kept_layers}: {count_params(draft) / 1e6:.1f}M parameters, "
          f"{len(draft.fusion)} gated cross-attention blocks")
    if cache is not None:
        print(f"knowledge cache: {cache.num_items} items x {cache.states.shape[1]} tokens x {cache.hidden_size} "
              f"(teacher layer {cache.layer}), {cache.memory_bytes() / 1e6:.1f} MB")
        para = next((p for it in load_items(None, teacher) for p in it["eval_paraphrases"]), None)
        if para:
            best = nearest_items(cache, teacher, tok, para, k=1)[0]
            print(f"a question it never saw: {para!r}\n  nearest cached item: {best[0]!r} (cosine {best[1]:.2f})")
    return draft


def _speculative_step(teacher, tok, draft, bundled: bool) -> bool:
    """Step 4: one speculative generation, shown round by round; whether it equals the teacher's own output."""
    _say("4. Speculative decoding: the draft proposes, the teacher verifies")
    prompts = heldout_prompts(tok, heldout_texts(), n_prompts=1, prompt_tokens=48, seed=0) if bundled else []
    ids = torch.tensor(prompts[:1]) if prompts else tok("The capital of France is", return_tensors="pt").input_ids
    ids = ids.to(teacher.device)
    out, stats = speculative_generate(teacher, draft, ids, gamma=4, max_new_tokens=64)
    ref = teacher.generate(ids, **hf_generate_kwargs(ids, tok, max_new_tokens=64))
    same = torch.equal(out.cpu(), ref.cpu())
    print(tok.decode(ids[0]), end="")
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        print(render_trace_ansi(tok, stats.trace))
        print("\033[42;30m accepted \033[0m \033[41;30m\033[9m rejected \033[0m \033[44;37m correction \033[0m "
              "\033[43;30m bonus \033[0m")
    else:
        print(tok.decode(out[0, ids.shape[1]:]))
    print(f"{stats.new_tokens} tokens in {stats.rounds} rounds: {stats.accepted}/{stats.proposed} draft tokens "
          f"accepted, {stats.tokens_per_target_call:.2f} tokens per teacher call; "
          f"identical to the teacher's own greedy output: {same}")
    if bundled:
        print("(the text reads as nonsense: the bundled teacher is a 13.6M-parameter model trained for under two "
              "hours on a CPU; what matters is that speculative decoding reproduces it exactly)")
    return same


def _bench_step(teacher, tok, draft, fast, bundled: bool) -> None:
    """Step 6: a short benchmark of the teacher alone, the drafts and the alternatives."""
    _say("6. A short benchmark (3 prompts, 48 tokens, 2 interleaved repeats; `qd bench` does it properly)")
    drafts = {"reference": draft} | ({"fast": fast} if fast is not None else {})
    cfg = BenchConfig(n_prompts=3, max_new_tokens=48, repeats=2, temperature=0.0, sweep_prompts=0,
                      cost_repeats=3,  # the step costs are not printed here: time them briefly
                      methods=("teacher_generate", "teacher_plain", "spec", "assisted_matched", "prompt_lookup", "fast"),
                      kinds=("unfamiliar",) if fast is not None else ("code",) if bundled else ("paraphrase",))
    report = run_bench(teacher, tok, drafts, cfg, progress=False)
    md = report_markdown(report).split("\n## ")
    print("## " + md[1].strip())


def _fast_step(teacher, tok, reference):
    """Step 5: the committed fast draft beside the reference draft on one prompt of unfamiliar code."""
    _say("5. A draft that reads the teacher: the fast draft on third-party code no training used")
    try:
        fast = load_draft("fast", device=teacher.device)
        ids = torch.tensor(heldout_code_prompts(tok, 1, 48)).to(teacher.device)
    except (DraftLoadError, FileNotFoundError) as exc:
        print(f"note: {exc}")
        return None
    print(f"the fast draft: {fast.config.num_layers} decoder layer(s) fed the teacher's last hidden state, "
          f"gamma {fast.config.gamma}")
    print(tok.decode(ids[0])[-200:], end="")
    ref = teacher.generate(ids, **hf_generate_kwargs(ids, tok, max_new_tokens=64))
    print(tok.decode(ref[0, ids.shape[1]:]))
    for label, d in (("reference draft (6 of 28 layers)", reference), ("fast draft", fast)):
        out, st = speculative_generate(teacher, d, ids, max_new_tokens=64)
        print(f"{label:>33}: {st.tokens_per_target_call:.2f} tokens per teacher call, {st.accepted}/{st.proposed} "
              f"accepted, identical to the teacher's own greedy output: {torch.equal(out.cpu(), ref.cpu())}")
    return fast
