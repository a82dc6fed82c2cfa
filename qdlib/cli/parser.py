"""The ``qd`` command's parser: one sub-command per step of the course.

The commands a config describes take their options from its schema (:func:`.options.add_settings`): one per
setting, named as the setting, with ``--set`` and ``--list-keys``. A few settings keep a short alias.
"""

from __future__ import annotations

from ..settings import (BenchConfig, FeatureTrainConfig, RetrievalConfig, TeacherTrainConfig, TrainingConfig)
from ..settings.names import STRATEGY_NAMES
from .bench import cmd_bench
from .commands import (DEFAULT_PROMPT, cmd_build_cache, cmd_compare_layers, cmd_export_draft, cmd_generate,
                       cmd_student, cmd_tour)
from .options import Parser, add_settings, common, int_at_least, number_at_least, opt
from .train import cmd_distill, cmd_train_fast, cmd_train_memory, cmd_train_teacher


def _add_teacher_commands(sub) -> None:
    """``generate`` and ``train-teacher``."""
    g = sub.add_parser("generate", help="generate text with the teacher")
    common(g)
    opt(g, "--prompt", default=DEFAULT_PROMPT, help="the text to continue (default: a function signature)")
    opt(g, "--escapes", action="store_true", help="interpret \\n and friends in --prompt")
    opt(g, "--max-new-tokens", type=int_at_least(1), default=64, help="tokens to generate (default 64)")
    opt(g, "--temperature", type=number_at_least(0.0), default=0.0, help="0 = greedy (default); > 0 samples")
    opt(g, "--seed", type=int_at_least(0), default=0, help="random seed for sampling (default 0)")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-teacher", help="train the bundled teacher (resumable) or export it")
    opt(t, "--run-dir", default=None, help="default: outputs/runs/teacher")
    opt(t, "--out-dir", default=None, help="export target; default: outputs/teacher")
    opt(t, "--export", action="store_true", help="measure and write the trained teacher")
    add_settings(t, TeacherTrainConfig, "teacher")
    t.set_defaults(func=cmd_train_teacher)


def _add_draft_commands(sub) -> None:
    """``compare-layers``, ``build-cache``, ``train-memory``: the seed's draft and its knowledge path."""
    c = sub.add_parser("compare-layers", help="compare untrained drafts from each layer-sampling strategy")
    common(c)
    opt(c, "--k", type=int_at_least(2), nargs="+", default=[4, 6, 8], help="draft depths to compare (default 4 6 8)")
    opt(c, "--strategies", nargs="+", default=list(STRATEGY_NAMES), choices=STRATEGY_NAMES,
        help="layer-sampling strategies (default: all)")
    opt(c, "--windows", type=int_at_least(1), default=16, help="held-out windows to score (default 16)")
    opt(c, "--seq-len", type=int_at_least(2), default=128, help="tokens per window (default 128)")
    opt(c, "--calibration-texts", type=int_at_least(1), default=4, help="held-out files used for importance scores (default 4)")
    c.set_defaults(func=cmd_compare_layers)

    b = sub.add_parser("build-cache", help="build and save the knowledge cache for the configured teacher")
    common(b)
    opt(b, "--items", default=None, help="YAML file of knowledge items; default: the built-in set")
    opt(b, "--layer", type=int_at_least(0), default=None, help="teacher layer to cache; default: the last")
    opt(b, "--answer-tokens", type=int_at_least(1), default=48, help="teacher answer tokens cached per item (default 48)")
    opt(b, "--out", default=None, help="output folder; default: outputs/runs/knowledge_cache/<teacher>")
    b.set_defaults(func=cmd_build_cache)

    m = sub.add_parser("train-memory", help="retrieval training of the draft's fusion blocks, then the three-arm "
                                            "protocol on held-out items (resumable)")
    common(m)
    opt(m, "--run-dir", default=None, help="default: outputs/runs/memory_retrieval")
    opt(m, "--measure", default=None, help="protocol JSON to write; default: <run-dir>/protocol.json")
    opt(m, "--export", default=None, help="also write the best fusion weights here (bf16 .safetensors)")
    add_settings(m, RetrievalConfig, "memory", aliases={"learning_rate": ["--lr"]})
    m.set_defaults(func=cmd_train_memory)


def _add_fast_draft_commands(sub) -> None:
    """``train-fast`` and ``export-draft``: the drafts beyond the seed's design."""
    f = sub.add_parser("train-fast", help="train the fast draft, a draft that reads the teacher (resumable), or export it")
    opt(f, "--run-dir", default=None, help="default: outputs/runs/fast_draft")
    opt(f, "--export", action="store_true", help="measure the run's best draft and write it with its card")
    opt(f, "--out-dir", default=None, help="export target; default: <run-dir>/export")
    add_settings(f, FeatureTrainConfig, "fast", aliases={"num_layers": ["--layers"], "learning_rate": ["--lr"]})
    f.set_defaults(func=cmd_train_fast)

    x = sub.add_parser("export-draft", help="write a layer-sampled draft as a plain Qwen3 model (serving engines)")
    opt(x, "out", help="the folder to write (replaced only when complete)")
    opt(x, "--draft", default=None, help="a layer-sampled draft folder; default: the course's reference draft "
                                         "(its knowledge path is dropped, as with the cache detached)")
    opt(x, "--format", choices=("qwen3",), default="qwen3", help="qwen3: Qwen3ForCausalLM with its tokenizer (the only format)")
    opt(x, "--tokenizer", default=None, help="tokenizer folder or hub id to copy beside it; default: the bundled teacher's")
    x.set_defaults(func=cmd_export_draft)


def _add_distill_command(sub) -> None:
    """``distill``: layer-sampled distillation (static, live or no memory), resumable, with export."""
    d = sub.add_parser("distill", help="distil a draft from the teacher (resumable; runs under accelerate launch)")
    opt(d, "--config", default="tiny", help="'tiny', 'qwen3' or a YAML file (see qdlib/configs)")
    common(d, device_help="cpu, cuda or auto; default: what Accelerate picks (cuda, then mps, then cpu)")
    opt(d, "--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
        help="override one config key of any section, checked like the file (repeatable), e.g. "
             "draft_model.num_sampled_layers=8")
    opt(d, "--list-keys", action="store_true", help="list every config key with its value (after --set) and what is allowed, then stop")
    opt(d, "--run-dir", default=None, help="default: outputs/runs/distill/<config>")
    opt(d, "--knowledge", choices=("static", "live", "none"), default=None,
        help="what the fusion blocks read: static (a knowledge cache, the config's default), live (the teacher's "
             "states of the verified text, qdlib.memories) or none (the ablation); run folder default "
             "outputs/runs/distill/<config>[_live|_no_knowledge]")
    opt(d, "--no-knowledge", action="store_true", help="the ablation: the same draft without knowledge fusion "
        "(= --knowledge none)")
    export = d.add_mutually_exclusive_group()
    opt(export, "--export", default=None, metavar="DIR", help="after training, measure the best draft and write it to DIR")
    opt(export, "--export-only", default=None, metavar="DIR", help="skip training; export the run's best draft to DIR")
    add_settings(d, TrainingConfig, "training", with_set=False)  # the training section's keys as options
    d.set_defaults(func=cmd_distill)


def _add_bench_command(sub) -> None:
    """``bench``: every decoding method, over the drafts the options name."""
    be = sub.add_parser("bench", help="measure every decoding method side by side (report, tables, plots)")
    common(be)
    opt(be, "--draft", default=None, help="draft folder; default: the reference draft (outputs/reference_draft)")
    opt(be, "--quick", action="store_true",
        help="the capstone's scoring run (about a minute): 3 unfamiliar-code prompts, 48 tokens, greedy, 2 repeats; "
             "generate, generate_plain, the reference draft and the fast draft or --candidate; options and --set "
             "change this preset")
    opt(be, "--candidate", default=None, metavar="DIR",
        help="a draft folder (the capstone's: `qd train-fast --export DIR`) measured in the fast rows instead of the "
             "committed fast draft; with --quick, prints its capstone score against the reference draft")
    opt(be, "--add", action="append", default=None, metavar="NAME=DIR",
        help="one more draft folder, measured in a row of its own named NAME with its own settings (repeatable)")
    opt(be, "--cache", default=None, metavar="DIR",
        help="attach this knowledge cache (`qd build-cache --items FILE`); its items' eval_paraphrases become the "
             "paraphrase prompts")
    opt(be, "--fusion", default=None, metavar="FILE", help="fusion weights for the draft (`qd train-memory --export FILE`)")
    opt(be, "--out", default=None, help="report folder; default: outputs/runs/bench/<time>")
    opt(be, "--quiet", action="store_true", help="no progress bar")
    add_settings(be, BenchConfig, "bench", aliases={"n_prompts": ["--prompts"], "max_new_tokens": ["--new-tokens"]})
    be.set_defaults(func=cmd_bench)


def build_parser() -> Parser:
    """The ``qd`` parser with every command."""
    p = Parser(prog="qd", description="qdlib: draft models and speculative decoding, step by step")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_teacher_commands(sub)
    _add_fast_draft_commands(sub)
    _add_draft_commands(sub)
    _add_distill_command(sub)
    s = sub.add_parser("student", help="write student copies of the notebooks (no solutions; figures and outputs kept)")
    opt(s, "--notebooks", default=None, help="source folder; default: the course's notebooks/")
    opt(s, "--out", default=None, help="target folder; default: outputs/runs/student")
    s.set_defaults(func=cmd_student)
    _add_bench_command(sub)
    to = sub.add_parser("tour", help="the whole story, headless, in a few minutes")
    common(to)
    opt(to, "--distill", action="store_true", help="distil a small draft on the spot instead of loading one")
    to.set_defaults(func=cmd_tour)
    return p
