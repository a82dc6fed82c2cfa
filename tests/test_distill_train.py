"""The distillation trainer on a tiny random 28-layer teacher: its data, evaluation, card, 2 processes.

Resume, the NaN guard and the best checkpoint are tested for every recipe, this one included, in test_train_loop.py.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_qwen3

from qdlib import paths
from qdlib.settings import DEFAULT_CONFIGS, load_config
from qdlib.distill_data import DistillData
from qdlib.trainer import distill, evaluate_draft, share_prepared

VOCAB = 8192  # the bundled tokenizer's size


@pytest.fixture(scope="module")
def small_teacher():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.TEACHER_DIR)
    return tiny_qwen3(vocab=VOCAB, hidden=64), tok


def small_cfg(**training):
    cfg = load_config(DEFAULT_CONFIGS["tiny"])
    cfg.knowledge_enhancement.cache_dim = 32
    cfg.knowledge_enhancement.num_heads = 1
    base = dict(batch_size=2, max_seq_length=32, num_epochs=2, steps_per_epoch=2, generated_sequences=4,
                max_text_tokens=4000, eval_prompts=2, eval_new_tokens=8, knowledge_answer_tokens=8, item_new_tokens=16,
                eval_text_windows=4,
                checkpoint_every=1, mixed_precision="no", learning_rate=1e-3)
    for k, v in {**base, **training}.items():
        setattr(cfg.training, k, v)
    return cfg


@pytest.fixture(scope="module")
def prepared(small_teacher, tmp_path_factory):
    """Training data and knowledge cache built once; each test starts a run folder from copies of them."""
    base = tmp_path_factory.mktemp("prepared")
    run(small_cfg(num_epochs=1, steps_per_epoch=1), base, small_teacher)
    return base


def seeded(run_dir, prepared):
    return share_prepared(prepared, run_dir)


def run(cfg, run_dir, teacher, **kw):
    model, tok = teacher
    return distill(cfg, run_dir, teacher=model, tokenizer=tok, progress=False, log=lambda *_: None, **kw)


@pytest.mark.slow
def test_resume_refuses_another_config(small_teacher, prepared, tmp_path):
    run(small_cfg(num_epochs=1), seeded(tmp_path, prepared), small_teacher)
    with pytest.raises(ValueError, match="other settings"):
        run(small_cfg(num_epochs=1, learning_rate=5e-4), tmp_path, small_teacher)


@pytest.mark.slow
def test_more_epochs_on_resume_restretch_the_schedule_and_the_card_says_so(small_teacher, prepared, tmp_path):
    from qdlib.trainer import export_draft, read_log, schedule_restarts

    model, tok = small_teacher
    run_dir = seeded(tmp_path / "run", prepared)
    run(small_cfg(num_epochs=1), run_dir, small_teacher)
    out = run(small_cfg(num_epochs=2), run_dir, small_teacher)  # num_epochs may change on resume
    assert out["steps"] == 4
    events = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if '"event"' in x]
    assert events == [{"step": 2, "event": "schedule", "total_steps": 4, "previous_total_steps": 2}]
    train, _ = read_log(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and train[1]["lr"] == 0.0
    assert schedule_restarts(train) == [(2, 0.0, train[2]["lr"])] and train[2]["lr"] > 0
    (run_dir / "NOTES.md").write_text("Ran on a shared machine.\n")
    m = export_draft(run_dir, tmp_path / "out", teacher=model, tokenizer=tok, cfg=small_cfg(num_epochs=2),
                     n_prompts=2, log=lambda *_: None)
    assert m["steps"] == 4 and m["schedule_restarts"] == [(2, 0.0, train[2]["lr"])]
    assert 0 <= m["fusion_gate_max"] < 1  # the small config's draft has fusion layers
    card = (tmp_path / "out" / "README.md").read_text()
    assert "At step 2 the run was resumed with more epochs" in card and "jumped from 0 to" in card
    assert "## Run notes\nRan on a shared machine.\n" in card


@pytest.mark.slow
def test_share_prepared_reuses_the_data_and_refuses_an_empty_source(small_teacher, prepared, tmp_path):
    import qdlib.trainer as tr

    run_dir = seeded(tmp_path / "run", prepared)
    before = (run_dir / "data.pt").stat().st_mtime_ns
    out = run(small_cfg(num_epochs=1, objective="tvd"), run_dir, small_teacher)  # objective is not a data setting
    assert out["steps"] == 2 and (run_dir / "data.pt").stat().st_mtime_ns == before
    with pytest.raises(FileNotFoundError, match="no training data"):
        tr.share_prepared(tmp_path / "empty", tmp_path / "x")


@pytest.mark.slow
def test_data_mix_and_item_rows(small_teacher, tmp_path):
    run(small_cfg(num_epochs=1, item_share=0.5, generated_share=0.5), tmp_path, small_teacher)
    data = DistillData.from_state_dict(torch.load(tmp_path / "data.pt", weights_only=True))
    assert data.generated.shape == (4, 33) and len(data.items) == 15 * 3  # question + 2 training paraphrases each
    ids, mask = data.batch(step=0, rows=64, seq_len=300)
    assert ids.shape == (64, 301) and mask.shape == (64, 300)
    assert not mask.all()  # item and generated rows are shorter than this window: their padding is not scored
    assert (ids[~torch.cat([torch.ones(64, 1, dtype=torch.bool), mask], 1)] == data.pad_id).all()
    ids2, _ = data.batch(step=0, rows=64, seq_len=300)
    assert torch.equal(ids, ids2)  # deterministic per step
    # two processes with stride 2 split one global batch between them
    a, _ = data.batch(step=3, rows=4, seq_len=32, offset=0, stride=2)
    b, _ = data.batch(step=3, rows=4, seq_len=32, offset=1, stride=2)
    whole, _ = data.batch(step=3, rows=8, seq_len=32)
    assert torch.equal(torch.stack([a, b], 1).flatten(0, 1), whole)


def test_text_from_several_sources_each_capped(tiny):
    from qdlib.distill_data import build_distill_data, training_stream
    from qdlib.settings.distill import DistillConfig, text_sources

    teacher, tok = tiny
    t = DistillConfig().training
    t.text_sources = "stdlib, torch"
    data = build_distill_data(teacher, tok, generated=0, seq_len=32, max_text_tokens=300, max_files=2,
                              sources=text_sources(t), progress=False)
    parts = [training_stream(tok, max_files=2, max_tokens=300, source=s) for s in ("stdlib", "torch")]
    assert [len(p) for p in parts] == [300, 300] and torch.equal(data.text, torch.cat(parts))
    assert not torch.equal(parts[0], parts[1])


def test_a_continued_draft_counts_every_training_stage(tmp_path):
    from qdlib.settings.distill import DistillConfig
    from qdlib.train.cards import _stages_text, _training_stages

    first = tmp_path / "first"
    first.mkdir()
    (first / "metrics.json").write_text(json.dumps({"steps": 2400, "tokens_seen": 9_000_000, "train_wall_time_s": 600.0,
                                                    "config": {"training": {"generated_share": 0.5, "item_share": 0.1}}}))
    cfg = DistillConfig()
    cfg.training.init_from, cfg.training.text_sources = str(first), "stdlib,torch"
    stages = _training_stages(cfg, [{"step": 1000, "tokens": 4_000_000, "elapsed_s": 300.0}])
    assert [st["steps"] for st in stages] == [2400, 1000] and "text of stdlib,torch" in stages[1]["data"]
    text = _stages_text({"stages": stages})
    assert "stage 1: 2400 steps, 9,000,000 tokens, 10 minutes" in text and "stage 2: 1000 steps" in text
    second = tmp_path / "second"  # a draft continued twice carries all earlier stages
    second.mkdir()
    (second / "metrics.json").write_text(json.dumps({"stages": stages}))
    cfg.training.init_from = str(second)
    assert [st["steps"] for st in _training_stages(cfg, [{"step": 5, "tokens": 10, "elapsed_s": 1.0}])] == [2400, 1000, 5]
    cfg.training.init_from = None
    assert len(_training_stages(cfg, [{"step": 5, "tokens": 10, "elapsed_s": 1.0}])) == 1 and _stages_text({}) == ""


def test_eval_paraphrases_are_never_trained_on():
    from qdlib.distill_data import item_texts
    from qdlib.knowledge import load_items

    items = load_items(None)
    train, held = set(item_texts(items, "train")), set(item_texts(items, "eval"))
    assert held and not (train & held)


@pytest.mark.slow
def test_on_policy_and_train_params(small_teacher, prepared, tmp_path):
    cfg = small_cfg(num_epochs=1, steps_per_epoch=1, on_policy_share=0.5, generated_share=0.4, train_params="fusion")
    out = run(cfg, tmp_path, small_teacher)  # another mix: its data is built afresh
    m = out["model"]
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {n for n, _ in m.fusion.named_parameters(prefix="fusion")}


@pytest.mark.slow
def test_evaluate_reports_cache_attached_and_detached(small_teacher, prepared):
    from qdlib.draft import DraftForCausalLM
    from qdlib.knowledge import load_knowledge_cache

    ev = json.loads((prepared / "best" / "eval.json").read_text())["eval"]
    for key in ("heldout", "heldout_no_cache", "paraphrase", "paraphrase_no_cache"):
        assert 0 <= ev[key]["agreement"] <= 1 and 0 <= ev[key]["alpha"] <= 1 and ev[key]["kl"] >= -1e-6
    model, tok = small_teacher
    draft = DraftForCausalLM.from_pretrained(prepared / "best")
    cache = load_knowledge_cache(prepared / "knowledge_cache", model)
    draft.set_knowledge(cache)
    from qdlib.trainer import eval_sets
    sets = eval_sets(model, tok, n_prompts=2, seed=1, new_tokens=4)
    again = evaluate_draft(model, draft, sets, cache)
    assert set(again) == {"heldout", "text", "heldout_no_cache", "text_no_cache"}
    assert draft.knowledge is cache  # evaluation restores the attached cache
    attached = evaluate_draft(model, draft, sets, cache, detached=False)  # the memory protocol's arms: one pass each
    assert attached == {k: v for k, v in again.items() if not k.endswith("_no_cache")}


TWO_PROC = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    sys.path.insert(0, {tests!r})
    from test_distill_train import small_cfg
    from qdlib.trainer import distill
    from accelerate.state import PartialState
    out = distill(small_cfg(num_epochs=1), {run!r}, teacher_name={teacher!r}, progress=False)
    assert PartialState().num_processes == 2, PartialState()
    rank = PartialState().process_index
    save_file({{k: v.contiguous() for k, v in out["model"].state_dict().items() if k != "lm_head.weight"}},
              {run!r} + f"/rank{{rank}}.safetensors")
""")


@pytest.mark.slow
def test_two_cpu_processes_end_with_the_same_weights(small_teacher, tmp_path):
    from safetensors.torch import load_file

    model, tok = small_teacher
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    script = tmp_path / "two.py"
    script.write_text(TWO_PROC.format(tests=str(Path(__file__).parent), run=str(tmp_path / "run"), teacher=str(folder)))
    # two CPU processes (gloo): torchrun starts them, Accelerate sees WORLD_SIZE=2 and ACCELERATE_USE_CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                        str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = load_file(tmp_path / "run" / "rank0.safetensors"), load_file(tmp_path / "run" / "rank1.safetensors")
    assert w0.keys() == w1.keys()
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    # and training did change them
    start = tiny_qwen3(vocab=VOCAB, hidden=64).model.layers[27].mlp.down_proj.weight
    assert not torch.equal(w0["model.layers.5.mlp.down_proj.weight"], start)


@pytest.mark.slow
def test_qwen3_06b_config_trains_a_step(qwen3_06b, tmp_path, monkeypatch):
    """The Qwen3-0.6B distillation config, one step on a random-init teacher with every Qwen3-0.6B width
    (8 layers; the 28-layer config itself is checked on the meta device in test_models.py). Two of the knowledge
    items stand for the fifteen: each item's rows pass the 151,936-column head of both models, which is what costs."""
    import qdlib.trainer as trainer
    from qdlib import sample_layers

    load_items = trainer.load_items
    monkeypatch.setattr(trainer, "load_items", lambda path, teacher: load_items(path, teacher)[:2])
    model, tok = qwen3_06b
    n_layers = model.config.num_hidden_layers
    cfg = load_config(DEFAULT_CONFIGS["qwen3"], num_layers=n_layers)
    for k, v in dict(batch_size=1, max_seq_length=16, num_epochs=1, steps_per_epoch=1, gradient_accumulation_steps=2,
                     generated_sequences=1, max_text_tokens=2000, eval_prompts=1, eval_new_tokens=2,
                     knowledge_answer_tokens=2, item_new_tokens=2, eval_text_windows=2, mixed_precision="no").items():
        setattr(cfg.training, k, v)
    out = distill(cfg, tmp_path, teacher=model, tokenizer=tok, progress=False, log=lambda *_: None)
    m = out["model"]
    assert out["steps"] == 1 and out["bad_steps"] == 0 and out["layers"] == sample_layers(n_layers, 6)
    assert not m.model.embed_tokens.weight.requires_grad  # train_params: body
    assert m.model.layers[0].mlp.up_proj.weight.requires_grad
    assert m.config.vocab_size == 151936 and m.config.hidden_size == 1024 and len(m.fusion) == 2
    # the epoch-end evaluation ran on the 151,936-entry vocabulary, with the cache attached and detached
    evals = [json.loads(x)["eval"] for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1 and {"heldout", "heldout_no_cache"} <= set(evals[0])
    for scores in evals[0].values():
        assert 0 <= scores["agreement"] <= 1 and scores["kl"] >= -1e-6 and scores["positions"] > 0


@pytest.mark.slow
def test_a_fusion_phase_starts_from_a_distilled_draft_with_its_own_learning_rate(small_teacher, prepared, tmp_path):
    """init_from loads a trained draft (fusion blocks it lacks start closed); fusion_lr_scale speeds up the fusion."""
    from safetensors.torch import load_file

    base = run(small_cfg(num_epochs=1, steps_per_epoch=1), seeded(tmp_path / "base", prepared), small_teacher)
    src = load_file(str(base["best_dir"] / "model.safetensors"))
    cfg = small_cfg(num_epochs=1, steps_per_epoch=2, train_params="fusion", init_from=str(base["best_dir"]),
                    fusion_lr_scale=10.0)
    out = run(cfg, seeded(tmp_path / "fusion", prepared), small_teacher)
    m = out["model"]
    body = {n: p for n, p in m.state_dict().items() if not n.startswith("fusion.") and n in src}
    assert body and all(torch.equal(p, src[n]) for n, p in body.items())  # frozen: exactly the distilled draft
    assert any(not torch.equal(p, src[n]) for n, p in m.state_dict().items() if n.startswith("fusion.") and n in src)
    with pytest.raises(FileNotFoundError, match="init_from=.nowhere. is not a draft folder"):
        run(small_cfg(init_from="nowhere"), seeded(tmp_path / "bad", prepared), small_teacher)


@pytest.mark.slow
def test_a_live_memory_run_reads_the_teachers_states_from_the_same_pass_and_exports_a_live_draft(
        small_teacher, prepared, tmp_path, monkeypatch):
    """``knowledge_enhancement.memory: live``: one teacher forward per micro-batch gives the KL targets and the
    states; lags in 1..live_max_lag; the fusion blocks learn; best/ holds no cache; the export loads live."""
    import qdlib.trainer as tr
    from qdlib import build_draft, load_draft
    from qdlib.trainer import export_draft

    model, tok = small_teacher
    calls, lags_seen, real_loss = [], [], tr.DistillRecipe.loss
    forward = type(model).forward

    def counted(self, *a, **kw):
        calls[-1] += 1
        return forward(self, *a, **kw)

    def loss(self, batch, autocast):
        calls.append(0)
        lags_seen.append(batch[3])
        with monkeypatch.context() as m:
            m.setattr(type(model), "forward", counted)
            return real_loss(self, batch, autocast)

    monkeypatch.setattr(tr.DistillRecipe, "loss", loss)
    cfg = small_cfg(num_epochs=1, steps_per_epoch=2, live_max_lag=3, init_from=str(prepared / "best"))
    cfg.knowledge_enhancement.memory = "live"
    cfg.knowledge_enhancement.gate_init = 0.1  # the static draft's fusion blocks are not reused: they start fresh
    out = run(cfg, seeded(tmp_path / "live", prepared), small_teacher)
    assert calls == [1, 1]  # no second teacher forward for the memory
    assert all(lg.shape == (2, 32) and lg.min() >= 1 and lg.max() <= 3 for lg in lags_seen)
    torch.manual_seed(cfg.training.seed)  # the fusion blocks the run started from
    start = {k: v for k, v in build_draft(model, out["layers"], knowledge_enhancement=cfg.knowledge_block()).state_dict().items()
             if k.startswith("fusion.") and k.endswith(("q_proj.weight", "gate"))}
    assert len(start) == 4 and all(not torch.equal(out["model"].state_dict()[k], v) for k, v in start.items())  # learned
    assert not (out["best_dir"] / "knowledge_cache").exists()
    assert out["model"].feature_layers == (27,)
    ev = json.loads((out["best_dir"] / "eval.json").read_text())["eval"]
    assert {"heldout", "heldout_no_cache"} <= set(ev) and ev["heldout"]["kl"] != ev["heldout_no_cache"]["kl"]
    monkeypatch.setattr(tr.DistillRecipe, "loss", real_loss)
    m = export_draft(out["run_dir"], tmp_path / "out", teacher=model, tokenizer=tok, cfg=cfg, n_prompts=2,
                     log=lambda *_: None)
    assert m["memory"] == "live, teacher layers [27]" and "reading a live memory" in (tmp_path / "out" / "README.md").read_text()
    assert load_draft(tmp_path / "out").feature_layers == (27,) and not (tmp_path / "out" / "knowledge_cache").exists()
