"""The feature-fed draft: its hand-written layer, its cache, building, files, and lossless decoding with it."""

import pytest
import torch
from transformers import Qwen3Config

from qdlib.decoding import Settings, accept_round
from qdlib.feature_draft import (FeatureDraft, FeatureDraftConfig, build_feature_draft, load_feature_draft,
                                 save_feature_draft, trim_vocab)
from qdlib.speculative import generate_plain, process_logits, speculative_generate

from helpers import QWEN3_06B, chi_square, tiny_qwen3, two_token_counts


def causal_mask(T):
    return torch.full((T, T), float("-inf")).triu(1)[None, None]


def test_hand_written_layer_equals_transformers_qwen3_layer():
    target = tiny_qwen3(layers=4, seed=1)
    draft = build_feature_draft(target, 2)
    x = torch.randn(2, 9, 64)
    cos, sin = draft.rotary(x, torch.arange(9)[None])
    for layer in draft.layers:
        layer.self_attn.config._attn_implementation = "sdpa"
        ref = layer(x, attention_mask=causal_mask(9).expand(2, 1, 9, 9), position_embeddings=(cos, sin))
        mine = x + draft._attend(layer, layer.input_layernorm(x), cos, sin, None, 0)
        mine = mine + layer.mlp(layer.post_attention_layernorm(mine))
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_built_from_the_teacher_and_only_the_middle_trains():
    target = tiny_qwen3(layers=6, seed=2)
    draft = build_feature_draft(target, 2)
    assert draft.config.init_layers == (4, 5)
    torch.testing.assert_close(draft.layers[1].mlp.down_proj.weight, target.model.layers[5].mlp.down_proj.weight)
    torch.testing.assert_close(draft.head.weight, target.lm_head.weight)
    names = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("embed.", "head.")) for n in names) and "fc.weight" in names
    assert {id(p) for p in draft.trainable_parameters()} == {id(p) for p in draft.parameters() if p.requires_grad}
    # fc starts as a pass-through: z = feature + embedding
    f, e = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close(draft.fc(torch.cat([f, e], -1)), f + e)


def test_cached_steps_equal_the_full_forward_and_crop_rolls_back():
    draft = build_feature_draft(tiny_qwen3(layers=3, seed=3), 1)
    f, ids = torch.randn(1, 12, 64), torch.randint(0, 256, (1, 12))
    full, _ = draft(f, ids)
    kv = draft.new_cache(32)
    parts = [draft(f[:, a:b], ids[:, a:b], kv)[0] for a, b in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    kv.crop(6)
    again, _ = draft(f[:, 6:], ids[:, 6:], kv)
    torch.testing.assert_close(again, parts[2], rtol=0, atol=0)


def _cached_run(draft, f, ids, grad: bool):
    """A prefix, one tree level (two siblings and a child of the first) and a chain after a rollback."""
    kv = draft.new_cache(32)
    with torch.set_grad_enabled(grad):
        out = [draft(f[:, :8], ids[:, :8], kv)]
        mask = torch.cat([torch.ones(3, 8, dtype=torch.bool), torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]]).bool()], 1)
        out.append(draft(f[:, 8:11], ids[:, 8:11], kv, positions=torch.tensor([8, 8, 9]), mask=mask))
        kv.crop(8)
        out.append(draft(f[:, 8:12], ids[:, 8:12], kv))
    return [t.detach() for pair in out for t in pair]


def test_drafting_forward_equals_the_training_forward_and_follows_weight_changes():
    # drafting (no gradients, a cache) runs the lean fused forward of qdlib.target_engine.LeanStack;
    # training runs the layer written out above: the two must agree, on chains and on tree levels
    teacher = tiny_qwen3(layers=3, seed=4)
    counts = torch.arange(teacher.config.vocab_size).float()
    for draft in (build_feature_draft(teacher, 2), trim_vocab(build_feature_draft(teacher, 1), counts, 100)):
        f, ids = torch.randn(1, 12, 64), torch.randint(0, 256, (1, 12))
        for lean, ref in zip(_cached_run(draft, f, ids, grad=False), _cached_run(draft, f, ids, grad=True)):
            torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-5)
        assert draft._lean is not None  # the lean path did run
        with torch.no_grad():  # a weight changes (as an optimizer step would): drafting must use the new one
            draft.layers[0].mlp.down_proj.weight.mul_(-1.0)
        for lean, ref in zip(_cached_run(draft, f, ids, grad=False), _cached_run(draft, f, ids, grad=True)):
            torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    target = tiny_qwen3(layers=3)
    with pytest.raises(ValueError, match=r"num_layers=0 must be an integer in 1\.\.3"):
        build_feature_draft(target, 0)
    with pytest.raises(ValueError, match=r"draft_vocab=999 must be an integer in 1\.\.256"):
        build_feature_draft(target, 1, draft_vocab=999, token_counts=torch.ones(256))
    with pytest.raises(ValueError, match="draft_vocab needs token_counts"):
        build_feature_draft(target, 1, draft_vocab=16)


def test_save_and_load_round_trip(tmp_path):
    draft = build_feature_draft(tiny_qwen3(layers=3, seed=4), 1)
    counts = torch.arange(256.0)
    small = trim_vocab(draft, counts, 32)
    for d in (draft, small):
        save_feature_draft(d, tmp_path / "d", dtype=torch.float32)
        back = load_feature_draft(tmp_path / "d")
        f, ids = torch.randn(1, 5, 64), torch.randint(0, 256, (1, 5))
        torch.testing.assert_close(back(f, ids)[1], d(f, ids)[1])
        assert torch.equal(back.vocab_ids, d.vocab_ids)
    assert small.vocab_ids.tolist() == list(range(224, 256))  # the 32 most frequent
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a feature-draft folder"):
        load_feature_draft(tmp_path / "x")


def test_a_folder_with_head_tokens_loads_with_its_head_trimmed(tmp_path):
    import json

    from qdlib.errors import DamagedFileError
    from qdlib.feature_draft import HEAD_TOKENS, frequent_tokens

    teacher = tiny_qwen3(layers=3, seed=5)
    draft = build_feature_draft(teacher, 1).eval()
    save_feature_draft(draft, tmp_path / "d", dtype=torch.float32)
    counts = torch.randint(0, 1000, (teacher.config.vocab_size,))
    ids = frequent_tokens(counts, 40)
    (tmp_path / "d" / HEAD_TOKENS).write_text(json.dumps({"ids": ids.tolist()}))
    loaded = load_feature_draft(tmp_path / "d")
    assert loaded.head.out_features == 40 and torch.equal(loaded.vocab_ids, ids)
    torch.testing.assert_close(loaded.head.weight, draft.head.weight[ids])
    assert torch.equal(loaded.vocab_ids, trim_vocab(draft, counts, 40).vocab_ids)  # the same tokens trim_vocab keeps
    ids_in = torch.randint(3, 200, (1, 12))
    out, _ = speculative_generate(teacher, loaded, ids_in, max_new_tokens=16, gamma=3)
    assert torch.equal(out, generate_plain(teacher, ids_in, max_new_tokens=16)[0])
    (tmp_path / "d" / HEAD_TOKENS).write_text(json.dumps({"ids": [5, 5, 9]}))
    with pytest.raises(ValueError, match="distinct ids"):
        load_feature_draft(tmp_path / "d")
    (tmp_path / "d" / HEAD_TOKENS).write_text("{not json")
    with pytest.raises(DamagedFileError, match=HEAD_TOKENS):
        load_feature_draft(tmp_path / "d")


def test_exact_qwen3_06b_config_builds_with_the_right_shapes():
    with torch.device("meta"):
        draft = FeatureDraft(FeatureDraftConfig(teacher=Qwen3Config(**QWEN3_06B).to_dict(), num_layers=1))
        f, logits = draft(torch.zeros(1, 3, 1024), torch.zeros(1, 3, dtype=torch.long))
    assert draft.fc.weight.shape == (1024, 2048) and draft.head.weight.shape == (151936, 1024)
    assert f.shape == (1, 3, 1024) and logits.shape == (1, 3, 151936)
    with torch.device("meta"):
        trimmed = FeatureDraft(FeatureDraftConfig(teacher=Qwen3Config(**QWEN3_06B).to_dict(), draft_vocab=32768))
    assert trimmed.head.weight.shape == (32768, 1024)


def test_cannot_serve_as_transformers_assistant():
    target = tiny_qwen3(layers=3)
    draft = build_feature_draft(target, 1)
    with pytest.raises(TypeError, match="cannot serve as transformers' assistant_model"):
        target.generate(torch.tensor([[5, 6]]), assistant_model=draft, max_new_tokens=3, do_sample=False)


# ----------------------------------------------------------------------------- lossless decoding


@pytest.mark.parametrize("vocab", [None, 40])
def test_greedy_speculative_with_feature_draft_equals_the_teacher(vocab):
    target = tiny_qwen3(layers=8, seed=5)
    draft = build_feature_draft(target, 1)
    if vocab:
        draft = trim_vocab(draft, torch.rand(256, generator=torch.Generator().manual_seed(0)), vocab)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        ids = torch.randint(2, 256, (1, 1 + 3 * i), generator=g)  # a one-token prompt included
        ref, _ = generate_plain(target, ids, max_new_tokens=20, eos_token_id=-1)
        for gamma in (1, 3, 6):
            out, stats = speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=20, eos_token_id=-1)
            assert torch.equal(out, ref), (i, gamma)
            assert stats.draft_calls > 0 and stats.new_tokens == 20


def test_feature_drafter_holds_the_teachers_features_of_exactly_the_verified_prefix():
    """Before every proposal the drafter's features equal the teacher's features of ``seq[:-1]`` computed from
    scratch, and its cache holds only positions read from true features (never its own guesses)."""
    from qdlib.drafters import FeatureDrafter
    from qdlib.feature_draft import teacher_features

    target = tiny_qwen3(layers=4, seed=6)
    draft = build_feature_draft(target, 1)
    checked = []

    class Spy(FeatureDrafter):
        def propose(self, seq, k):
            with torch.no_grad():
                ref = teacher_features(target, torch.tensor([seq[:-1]]))[0]
            torch.testing.assert_close(self.feats, ref, rtol=1e-4, atol=1e-4)
            assert self.kv.length <= len(seq) - 1
            out = super().propose(seq, k)
            assert self.kv.length == len(seq) - 1  # own-feature positions dropped again
            checked.append(len(seq))
            return out

    ids = torch.randint(2, 256, (1, 6))
    spy = Spy(draft, Settings())
    out, stats = speculative_generate(target, spy, ids, gamma=3, max_new_tokens=25, eos_token_id=-1)
    assert len(checked) == stats.rounds > 5
    assert torch.equal(out, generate_plain(target, ids, max_new_tokens=25, eos_token_id=-1)[0])


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [None, 8])
def test_sampling_with_feature_draft_matches_the_target_distribution(vocab):
    """Joint distribution of 2 sampled tokens equals the target's exact one (chi-square), for the full and a trimmed
    draft vocabulary (q is zero outside the subset); and the same statistic rejects the draft's own distribution."""
    V = 12
    target = tiny_qwen3(vocab=V, hidden=32, layers=4, seed=7, tie_word_embeddings=False)
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)
    draft = build_feature_draft(target, 1)
    with torch.no_grad():
        draft.fc.weight.add_(torch.randn(draft.fc.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    if vocab:
        draft = trim_vocab(draft, torch.arange(V, 0, -1.0), vocab)  # tokens 0..7
    ids = torch.tensor([[3, 5]])
    with torch.no_grad():
        p1 = process_logits(target(input_ids=ids).logits[0, -1], 1.0)
        joint = torch.stack([p1[a].double() * process_logits(target(input_ids=torch.tensor([[3, 5, a]])).logits[0, -1],
                                                             1.0).double() for a in range(V)])
    stat, critical, against = chi_square(two_token_counts(target, draft, ids, 2500, 1.0, gamma=2), joint)
    assert stat < critical
    # power: counts drawn from a wrong distribution (the target's first token, a uniform second) fail the same check
    assert against(p1.double()[:, None] * torch.full((V,), 1.0 / V, dtype=torch.float64)[None]) > 10 * critical


def test_accept_round_sampling_keeps_the_target_distribution():
    """The pure acceptance step alone: first token of a one-proposal round is distributed as p."""
    p_logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p = torch.softmax(p_logits[0], -1)
    g = torch.Generator().manual_seed(0)
    s = Settings(temperature=1.0, generator=g)
    n = 40_000
    counts = torch.zeros(4)
    for x in torch.multinomial(q, n, replacement=True, generator=g).tolist():
        k, nxt = accept_round([x], p_logits, [q], s)
        counts[x if k == 1 else nxt] += 1
    assert 0.5 * (counts / n - p).abs().sum() < 0.012
    assert 0.5 * (counts / n - q).abs().sum() > 0.2  # and it is not the draft's


# ----------------------------------------------------------------------------- training


def small_config(**kw):
    from qdlib.feature_train import FeatureTrainConfig

    base = dict(steps=6, batch_size=2, max_seq_length=32, learning_rate=3e-3, warmup_steps=2, generated=2, prompt_tokens=8,
                eval_every=3, eval_prompts=2, checkpoint_every=2, max_files=3, max_tokens_per_source=20_000,
                source_weights={"stdlib": 1.0})
    return FeatureTrainConfig(**{**base, **kw})


def test_grown_draft_computes_the_same_function_then_trains_its_new_layer():
    from qdlib.feature_train import grow_from

    target = tiny_qwen3(layers=4, seed=5)
    small = build_feature_draft(target, 1)
    torch.nn.init.normal_(small.fc.weight, std=0.1)  # a "trained" draft: not the pass-through it starts as
    big = grow_from(build_feature_draft(target, 3), small)
    f, ids = torch.randn(2, 7, 64), torch.randint(0, 256, (2, 7))
    for a, b in zip(small(f, ids), big(f, ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    big(f, ids)[1].logsumexp(-1).sum().backward()  # the zeroed projections still receive gradient
    assert big.layers[2].mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot grow a 3-layer draft"):
        grow_from(build_feature_draft(target, 1), big)


def test_a_run_grows_from_a_draft_whose_folder_trims_its_head(tmp_path):
    """`qd train-fast --init-from outputs/fast_draft`: that folder trims the head on load (head_tokens.json); the run
    starts from the full head it stores, so the grown draft computes the same full-vocabulary logits."""
    import json

    from qdlib.feature_draft import HEAD_TOKENS, save_feature_draft
    from qdlib.feature_train import initial_draft

    target = tiny_qwen3(layers=4, seed=5)
    trained = build_feature_draft(target, 1)
    torch.nn.init.normal_(trained.fc.weight, std=0.1)
    save_feature_draft(trained, tmp_path / "d")
    (tmp_path / "d" / HEAD_TOKENS).write_text(json.dumps({"ids": list(range(40))}))
    assert load_feature_draft(tmp_path / "d").head.out_features == 40  # trimmed when loaded for decoding
    grown = initial_draft(target, small_config(num_layers=2, init_from=str(tmp_path / "d")))
    f, ids = torch.randn(2, 7, 64), torch.randint(0, 256, (2, 7))
    full = load_feature_draft(tmp_path / "d", trim_head=False)
    torch.testing.assert_close(grown(f, ids)[1], full(f, ids)[1], rtol=0, atol=0)


def test_train_config_refuses_bad_values():
    with pytest.raises(ValueError, match=r"fast.source_weights=\{'numpy': 1.0\} names 'numpy', which are not allowed; "
                                         r"allowed: weights >= 0 of stdlib, torch, transformers"):
        small_config(source_weights={"numpy": 1.0})
    with pytest.raises(ValueError, match="fast.steps=0 is out of range; allowed: an integer >= 1"):
        small_config(steps=0)


@pytest.mark.slow
def test_training_learns_and_keeps_the_best(tiny, tmp_path):
    """Resume, the best checkpoint and the NaN guard are tested for every recipe in test_train_loop.py."""
    import json

    from qdlib.feature_train import train_feature_draft

    teacher, tok = tiny
    run = train_feature_draft(small_config(), tmp_path / "a", teacher, tok, log=lambda s: None)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert steps[-1]["kl1"] < steps[0]["kl1"]  # it learns
    best = json.loads((run / "best" / "eval.json").read_text())
    evals = [r for r in rows if "eval" in r]
    assert [e["step"] for e in evals] == [3, 6]
    assert best["validation_agreement"] == max((e["eval"]["depth1"] + e["eval"]["depth2"]) / 2 for e in evals)
    with pytest.raises(ValueError, match="was made with other settings"):
        train_feature_draft(small_config(learning_rate=1e-4), run, teacher, tok, log=lambda s: None)


# ----------------------------------------------------------------------------- the committed fast draft


def test_committed_fast_draft_loads_and_decodes_losslessly(tiny):
    from qdlib import load_draft
    from qdlib.corpus import heldout_prompts, heldout_texts

    teacher, tok = tiny
    fast = load_draft("fast")
    assert isinstance(fast, FeatureDraft) and fast.config.gamma >= 1 and not fast.training
    for p in heldout_prompts(tok, heldout_texts(), n_prompts=2, prompt_tokens=48, seed=3):
        ids = torch.tensor([p])
        out, stats = speculative_generate(teacher, fast, ids, max_new_tokens=24)  # its own tuned gamma
        assert torch.equal(out, generate_plain(teacher, ids, max_new_tokens=24)[0])
        assert len(stats.proposed_at) == fast.config.gamma and stats.accepted > 0


@pytest.mark.slow
def test_committed_fast_draft_card_matches_its_weights(tiny):
    """The card's test agreement is recomputed from the shipped weights, with the head trimmed as it loads."""
    import json

    from qdlib import load_draft, paths
    from qdlib.corpus import heldout_texts
    from qdlib.distill_data import heldout_eval_set
    from qdlib.feature_train import EVAL_SEED_TEST, feature_agreement

    teacher, tok = tiny
    card = json.loads((paths.FAST_DRAFT_DIR / "metrics.json").read_text())
    es = heldout_eval_set(teacher, tok, heldout_texts(), n_prompts=50, seed=EVAL_SEED_TEST)
    fast = load_draft("fast")
    shipped = card["head_tokens"]["agreement"]["stdlib_test"]
    assert fast.head.out_features == card["head_tokens"]["n"]
    got = feature_agreement(teacher, fast, es)
    assert got["positions"] == shipped["positions"]
    assert got["depth1"] == pytest.approx(shipped["depth1"], abs=0.005)
