"""The live memory (qdlib.memories): the draft's fusion blocks read the teacher's states of the verified text.

What is proven here: after every round the drafter's memory equals a fresh teacher pass over the verified text
(both target engines, one layer, a middle layer, several layers); greedy output is the teacher's, token for token;
sampling keeps the target's distribution (a chi-square test that shows its own power); drafting incrementally
equals one full forward with the lag rule; and training never lets a position read a state it could not read while
drafting (a check that catches lag 0 and an unmasked memory).
"""

import math

import pytest
import torch

from helpers import chi_square, tiny_qwen3, two_token_counts
from qdlib import build_draft, paths, sample_layers
from qdlib.decoding import Settings, process_logits
from qdlib.drafters import LiveMemoryDrafter, ModelDrafter, as_drafter
from qdlib.combined_drafters import HybridDrafter, Pausing
from qdlib.errors import ConfigError
from qdlib.fusion import GatedFusion, KnowledgeCrossAttention, lag_mask
from qdlib.memories import LiveMemory, draw_lags, teacher_states
from qdlib.speculative import generate_plain, speculative_generate
from qdlib.trainer import start_from

LIVE = {"enabled": True, "memory": "live", "cache_dim": 96, "num_heads": 2}


def open_gates(draft, value: float):
    with torch.no_grad():
        for f in draft.fusion.values():
            f.gate.fill_(math.atanh(value))
    return draft


def live_draft(teacher, layers=None, gate=0.2, seed=0):
    """The reference draft's body (trained) with fresh fusion blocks reading a live memory, gates opened."""
    torch.manual_seed(seed)
    draft = build_draft(teacher, sample_layers(28, 6), knowledge_enhancement={**LIVE, "memory_layers": layers})
    start_from(draft, paths.DRAFT_DIR)  # fusion weights of another width keep their fresh initialisation
    return open_gates(draft.float().eval(), gate).set_knowledge("live")


@pytest.fixture(scope="module")
def prompts(tiny):
    from qdlib.corpus import heldout_prompts, heldout_texts

    _, tok = tiny
    return [torch.tensor([p]) for p in heldout_prompts(tok, heldout_texts(), n_prompts=3, prompt_tokens=40, seed=3)]


class Checked(LiveMemoryDrafter):
    """A live-memory drafter that compares its memory with a fresh teacher pass after every commit."""

    def __init__(self, draft, teacher):
        super().__init__(draft, Settings())
        self.teacher, self.errors = teacher, []

    def begin(self, seq, features):
        super().begin(seq, features)
        self._check(seq)

    def commit(self, seq, features):
        super().commit(seq, features)
        self._check(seq)

    def _check(self, seq):
        verified = seq[:-1]  # the target's cache holds every token but the last
        fresh = teacher_states(self.teacher, torch.tensor([verified]), self.feature_layers)[1]  # (1, M, D)
        assert self.memory.states.shape == fresh.shape, (self.memory.states.shape, fresh.shape)
        self.errors.append((self.memory.states - fresh).abs().max().item())


# ----------------------------------------------------------------------------- the memory while decoding


def _memory_is_the_verified_text(tiny, prompts, layers, engine):
    teacher, _ = tiny
    draft = live_draft(teacher, layers)
    for ids in prompts[:2]:
        drafter = Checked(draft, teacher)
        out, stats = speculative_generate(teacher, drafter, ids, gamma=4, max_new_tokens=24, eos_token_id=-1,
                                          engine=engine)
        assert 0 < stats.accepted < stats.proposed  # rounds that kept some proposals and rejected others
        assert len(drafter.errors) == stats.rounds + 1  # after the prompt and after every round
        assert max(drafter.errors) < 1e-4, drafter.errors
        assert len(drafter.memory) == out.shape[1] - 1


def test_memory_equals_a_fresh_teacher_pass_after_every_round(tiny, prompts):
    _memory_is_the_verified_text(tiny, prompts, None, "qdlib")


@pytest.mark.slow
@pytest.mark.parametrize("layers", [[27], [13], [6, 20, 27]])
@pytest.mark.parametrize("engine", ["qdlib", "transformers"])
def test_memory_equals_a_fresh_teacher_pass_every_layer_choice_and_engine(tiny, prompts, layers, engine):
    _memory_is_the_verified_text(tiny, prompts, layers, engine)


def test_greedy_output_is_the_teachers_and_the_memory_is_read(tiny, prompts):
    teacher, _ = tiny
    draft = live_draft(teacher)
    for ids in prompts[:2]:
        ref = teacher.generate(ids, do_sample=False, max_new_tokens=32, pad_token_id=1, eos_token_id=None)
        for gamma in (1, 4):
            out, stats = speculative_generate(teacher, draft, ids, gamma=gamma, max_new_tokens=32, eos_token_id=-1)
            assert torch.equal(out, ref), f"gamma {gamma}"
    # the memory changes the draft: the same weights detached propose otherwise somewhere on these prompts
    ids = prompts[0]
    _, states = teacher_states(teacher, ids, [27])
    live = draft(input_ids=ids, memory=LiveMemory(states=states)).logits
    detached = draft.set_knowledge(None)(input_ids=ids).logits
    draft.set_knowledge("live")
    assert (live - detached).abs().max() > 1e-2


@pytest.mark.slow
def test_greedy_with_wrappers_and_the_transformers_engine(tiny, prompts):
    """Hybrid and pausing wrappers carry the live memory's needs to the loop; transformers' forward feeds it too."""
    from qdlib.lookup import NgramDrafter

    teacher, _ = tiny
    draft = live_draft(teacher, [13, 27])
    for ids in prompts[:2]:
        ref = generate_plain(teacher, ids, max_new_tokens=24, eos_token_id=-1)[0]
        for proposer in (HybridDrafter(NgramDrafter([ref[0, 40:50].tolist()], max_n=2), draft), Pausing(draft)):
            out, _ = speculative_generate(teacher, proposer, ids, gamma=3, max_new_tokens=24, eos_token_id=-1)
            assert torch.equal(out, ref) and proposer.needs_features and proposer.feature_layers == (13, 27)
        out, _ = speculative_generate(teacher, draft, ids, gamma=3, max_new_tokens=24, eos_token_id=-1,
                                      engine="transformers")
        assert torch.equal(out, ref)


@pytest.mark.parametrize("max_len", [None, 400], ids=["transformers", "lean"])
def test_drafting_incrementally_equals_one_full_forward_with_the_lag_rule(tiny, prompts, max_len):
    """Depth j of a round reads the verified text j behind: the same logits as one forward over the whole text,
    on transformers' forward and on the lean one (given max_len, the fusion blocks run as hooks after their layers)."""
    teacher, _ = tiny
    draft = live_draft(teacher, gate=0.5)
    seq = prompts[1][0].tolist()
    drafter = as_drafter(draft, Settings(), max_len=max_len)
    _, states = teacher_states(teacher, torch.tensor([seq[:-1]]), [27])
    drafter.begin(seq, states[0])
    assert (drafter.engine is not None) == (max_len is not None)
    seen = []
    orig = drafter._forward
    drafter._forward = lambda tokens: seen.append(orig(tokens)) or seen[-1]
    prop = drafter.propose(seq, 4)
    full = draft(input_ids=torch.tensor([seq + prop.tokens[:-1]]), memory=LiveMemory(states=states),
                 memory_lags=1).logits[0, len(seq) - 1 :]  # (4, V): lag 1 at the first proposal, j at depth j
    torch.testing.assert_close(torch.stack(seen), full, rtol=1e-4, atol=1e-4)
    assert prop.tokens == full.argmax(-1).tolist()


def test_a_live_run_from_a_static_draft_keeps_its_body_and_starts_the_fusion_fresh(tiny):
    """start_from: the reference draft's fusion blocks were trained to read a static cache, so a live run starts
    them fresh (gates at gate_init); a static run keeps them."""
    from safetensors.torch import load_file

    teacher, _ = tiny
    saved = load_file(str(paths.DRAFT_DIR / "model.safetensors"))
    torch.manual_seed(0)
    live = build_draft(teacher, sample_layers(28, 6), knowledge_enhancement={**LIVE, "gate_init": 0.1})
    fresh = {k: v.clone() for k, v in live.state_dict().items() if k.startswith("fusion.")}
    start_from(live, paths.DRAFT_DIR)
    assert fresh and all(torch.equal(live.state_dict()[k], v) for k, v in fresh.items())
    assert torch.equal(live.model.layers[3].mlp.up_proj.weight, saved["model.layers.3.mlp.up_proj.weight"].float())
    static = build_draft(teacher, sample_layers(28, 6), knowledge_enhancement={"enabled": True, "cache_dim": 96,
                                                                               "num_heads": 2})
    start_from(static, paths.DRAFT_DIR)
    assert torch.equal(static.fusion["2"].gate, saved["fusion.2.gate"].float())


# ----------------------------------------------------------------------------- sampling stays lossless


@pytest.mark.slow
def test_sampling_with_a_live_memory_keeps_the_target_distribution():
    """The joint distribution of 2 sampled tokens equals the target's exact one (as test_speculative.py's test)."""
    V, T, n = 12, 1.0, 2500
    target = tiny_qwen3(vocab=V, hidden=32, layers=4, seed=7, tie_word_embeddings=False)
    draft = build_draft(target, [0, 3], knowledge_enhancement={"enabled": True, "memory": "live", "cache_dim": 32,
                                                               "num_heads": 1})
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)  # sharpen the target
        draft.lm_head.weight.add_(torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
        for f in draft.fusion.values():
            f.attn.o_proj.weight.mul_(50.0)  # a memory that moves the draft's distribution a lot
    open_gates(draft, 0.9).set_knowledge("live")
    ids = torch.tensor([[3, 5]])
    with torch.no_grad():
        p1 = process_logits(target(input_ids=ids).logits[0, -1], T)
        joint = torch.zeros(V, V, dtype=torch.float64)
        for a in range(V):
            joint[a] = p1[a].double() * process_logits(target(input_ids=torch.tensor([[3, 5, a]])).logits[0, -1], T).double()
        # the draft's own joint, read as it drafts: both proposals read the state of the one verified token
        _, s = teacher_states(target, ids[:, :1], [3])
        q_joint = torch.zeros(V, V, dtype=torch.float64)
        q1 = process_logits(draft(input_ids=ids, memory=LiveMemory(states=s)).logits[0, -1], T)
        for a in range(V):
            q2 = process_logits(draft(input_ids=torch.tensor([[3, 5, a]]), memory=LiveMemory(states=s)).logits[0, -1], T)
            q_joint[a] = q1[a].double() * q2.double()
        detached = process_logits(draft.set_knowledge(None)(input_ids=ids).logits[0, -1], T)
        draft.set_knowledge("live")
    assert 0.5 * (q1 - detached).abs().sum() > 0.05  # the memory really changes q
    stat, critical, against = chi_square(two_token_counts(target, draft, ids, n, T, gamma=2), joint)
    assert stat < critical
    # the same statistic rejects the draft's own distribution (what a loop that accepted everything would give)
    assert against(q_joint) > 10 * critical


# ----------------------------------------------------------------------------- training reads no future state


def changed_before(draft, teacher, x, lags, t, layers=(27,)):
    """Largest change of the draft's logits at positions <= t when everything the teacher has not verified while
    position t is drafted changes: the tokens after t (the teacher's states recomputed over the new text) and the
    teacher's state of position t itself (its own prediction of token t+1 comes from it)."""
    g = torch.Generator().manual_seed(t)
    y = x.clone()
    y[:, t + 1 :] = torch.randint(2, 8000, y[:, t + 1 :].shape, generator=g)
    _, sx = teacher_states(teacher, x, layers)
    _, sy = teacher_states(teacher, y, layers)
    sy[:, t] = torch.randn(sy[:, t].shape, generator=g)
    with torch.no_grad():
        a = draft(input_ids=x, memory=LiveMemory(states=sx), memory_lags=lags).logits[:, : t + 1]
        b = draft(input_ids=y, memory=LiveMemory(states=sy), memory_lags=lags).logits[:, : t + 1]
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def trained_view(tiny, prompts):
    teacher, _ = tiny
    x = torch.cat([p[:, :32] for p in prompts])  # (3, 32)
    return teacher, live_draft(teacher, gate=0.5), x


def test_no_future_state_leaks_with_random_lags(trained_view):
    teacher, draft, x = trained_view
    lags = draw_lags(x.shape, 4, torch.Generator().manual_seed(0))  # as the training batches draw them
    for t in (0, 5, 17, 30):
        assert changed_before(draft, teacher, x, lags, t) == 0.0  # exactly the same logits
    # a later token changed: the earlier logits stay exactly the same
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 8000
    sx, sy = teacher_states(teacher, x, [27])[1], teacher_states(teacher, y, [27])[1]
    with torch.no_grad():
        a = draft(input_ids=x, memory=LiveMemory(states=sx), memory_lags=lags).logits[:, :20]
        b = draft(input_ids=y, memory=LiveMemory(states=sy), memory_lags=lags).logits[:, :20]
    assert torch.equal(a, b)


@pytest.mark.parametrize("lags, name", [(0, "lag 0: the state of the position itself"),
                                        (-10**6, "no mask: the whole memory")])
def test_the_same_check_catches_a_leak(trained_view, lags, name):
    teacher, draft, x = trained_view
    assert min(changed_before(draft, teacher, x, lags, t) for t in (5, 17, 30)) > 1e-3, name


def test_training_batches_draw_lags_in_one_to_gamma_and_a_resumed_run_sees_the_same():
    a = draw_lags((4, 256), 3, torch.Generator().manual_seed(5))
    b = draw_lags((4, 256), 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {1, 2, 3}
    with pytest.raises(ConfigError, match="max_lag=0 must be an integer >= 1"):
        draw_lags((1, 4), 0)


# ----------------------------------------------------------------------------- the parts, and the modes


def test_a_query_that_may_read_nothing_is_left_exactly_as_it_was():
    fuse = GatedFusion(8, 6, 8, 2, gate_init=0.5)
    h = torch.randn(2, 4, 8)
    mem = fuse.attn.project_states(torch.randn(2, 3, 6))
    mask = lag_mask(torch.arange(4), torch.tensor([[1, 1, 1, 1], [9, 9, 1, 9]]), 3)  # (2, 4, 3)
    out = fuse(h, mem, mask)
    assert torch.equal(out[0, 0], h[0, 0]) and torch.equal(out[1, [0, 1, 3]], h[1, [0, 1, 3]])
    assert not torch.equal(out[0, 1:], h[0, 1:]) and not torch.equal(out[1, 2], h[1, 2])


def test_the_recency_bias_lets_a_head_find_the_newest_state_it_may_read():
    torch.manual_seed(0)
    positions, mask = torch.arange(6), lag_mask(torch.arange(6), 2, 5)  # the query at p reads slots <= p - 2
    h, same = torch.randn(1, 6, 8), torch.ones(1, 5, 6)  # identical states: content cannot tell the slots apart
    for recency in (False, True):
        attn = KnowledgeCrossAttention(8, 6, 8, 2, recency=recency)
        out, w = attn(h, attn.project_states(same), mask, positions=positions, return_weights=True)  # w (1, H, T, M)
        assert torch.allclose(out, attn(h, attn.project_states(same), mask, positions=positions), atol=1e-6)
        for p in range(3, 6):  # two or more readable slots
            readable = w[0, :, p, : p - 1]  # (H, p - 1)
            assert torch.allclose(readable.sum(-1), torch.ones(2)) and w[0, :, p, p - 1 :].abs().max() == 0
            steps = readable.diff(dim=-1)
            if recency:  # every head prefers newer states, head 0 (slope 1) puts most weight on the newest
                assert (steps > 0).all() and readable[0, -1] > 0.5
            else:  # without positions the states are indistinguishable
                assert steps.abs().max() < 1e-6
    with pytest.raises(ValueError, match="recency bias: pass positions="):
        attn(h, attn.project_states(same), mask)


def test_the_recency_bias_is_a_live_memory_setting(small):
    teacher, _ = small
    live = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "memory": "live"})
    static = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True})
    assert live.config.knowledge_enhancement["recency"] and all(f.attn.log_slope is not None for f in live.fusion.values())
    assert not static.config.knowledge_enhancement["recency"]
    assert all(f.attn.log_slope is None for f in static.fusion.values())
    with pytest.raises(ConfigError, match="recency=True needs memory: live"):
        build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "recency": True})


def test_modes_static_live_and_detached(small):
    from qdlib.knowledge import build_knowledge_cache

    teacher, tok = small
    draft = open_gates(build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True}), 0.5)
    plain = draft(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    cache = build_knowledge_cache(teacher, tok, answer_tokens=4)
    assert draft.set_knowledge(cache).knowledge is cache and draft.feature_layers is None
    assert isinstance(as_drafter(draft, Settings()), ModelDrafter)
    assert draft.set_knowledge("live").feature_layers == (3,)  # the teacher's last layer: 4 layers
    assert isinstance(as_drafter(draft, Settings()), LiveMemoryDrafter)
    assert torch.equal(draft(input_ids=torch.tensor([[5, 6, 7, 8]])).logits, plain)  # an empty memory: no change
    assert draft.set_knowledge(LiveMemory([1])).feature_layers == (1,)
    assert draft.set_knowledge(None).knowledge is None and draft.feature_layers is None
    assert torch.equal(draft(input_ids=torch.tensor([[5, 6, 7, 8]])).logits, plain)


@pytest.mark.parametrize("knowledge, match", [
    ("lve", r"set_knowledge\('lve'\): allowed are a KnowledgeCache \(static memory\), 'live'"),
    (LiveMemory([1, 3]), r"a live memory of teacher layers \[1, 3\] is 64 wide, this draft's fusion blocks read 32"),
    (LiveMemory([7]), r"memory_layers=\[7\]: \[7\] are not layers of the teacher; allowed: indices in 0..3"),
    (42, r"set_knowledge got a int; allowed are a KnowledgeCache"),
])
def test_bad_memories_are_refused_by_name(small, knowledge, match):
    teacher, _ = small
    draft = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True})
    with pytest.raises(ConfigError, match=match):
        draft.set_knowledge(knowledge)


def test_a_memory_passed_to_a_draft_without_live_memory_is_refused(small):
    teacher, _ = small
    draft = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True})
    with pytest.raises(ConfigError, match=r"no live memory attached; call draft.set_knowledge\('live'\)"):
        draft(input_ids=torch.tensor([[5, 6]]), memory=LiveMemory(states=torch.zeros(1, 2, 32)))
    with pytest.raises(ConfigError, match="LiveMemory layers=\\[2, 2\\] must be distinct"):
        LiveMemory([2, 2])


def test_several_layers_make_a_wider_memory_and_the_verifier_returns_them(small):
    from qdlib.target_engine import verifier

    teacher, _ = small
    draft = build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "memory": "live",
                                                                "memory_layers": [1, 3]})
    assert draft.config.knowledge_enhancement["memory_size"] == 64
    assert draft.set_knowledge("live").feature_layers == (1, 3)
    ids = [5, 6, 7, 8, 9]
    ref = teacher_states(teacher, torch.tensor([ids]), [1, 3])[1][0]  # (5, 64)
    for engine in ("qdlib", "transformers"):
        v = verifier(teacher, True, 16, engine, layers=[1, 3])
        _, first = v(ids[:3], 1)
        _, rest = v(ids[3:], 2)
        torch.testing.assert_close(torch.cat([first, rest]), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"feature layers \[4\] are not layers of the target; allowed: indices in 0..3"):
        verifier(teacher, True, 16, "qdlib", layers=[4])


def test_memory_rollback_keeps_the_projections_in_step(small):
    teacher, _ = small
    draft = open_gates(build_draft(teacher, [0, 3], knowledge_enhancement={"enabled": True, "memory": "live"}), 0.5)
    draft.set_knowledge("live")
    states = teacher_states(teacher, torch.tensor([[5, 6, 7, 8, 9, 10]]), [3])[1][0]  # (6, 32)
    mem = LiveMemory([3])
    mem.reset(states[:3])
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        draft(input_ids=x, memory=mem)  # projects 3 rows
        mem.append(states[3:])
        draft(input_ids=x, memory=mem)  # projects rows 3..5
        mem.crop(4)  # a rollback: rows 4 and 5 go
        torch.testing.assert_close(draft(input_ids=x, memory=mem).logits,
                                   draft(input_ids=x, memory=LiveMemory(states=states[:4])).logits, rtol=1e-5, atol=1e-5)
        mem.append(states[4:5] + 1.0)  # another row 4 than the one projected before
        torch.testing.assert_close(draft(input_ids=x, memory=mem).logits,
                                   draft(input_ids=x, memory=LiveMemory(states=torch.cat([states[:4], states[4:5] + 1]))).logits,
                                   rtol=1e-5, atol=1e-5)


def test_the_committed_live_memory_record_is_consistent_and_its_readme_comes_from_it():
    """outputs/live_memory: every arm's loop figures add up, every loop was lossless, and README.md is what
    record.py renders from record.json (no figure typed by hand)."""
    import importlib.util
    import json

    from qdlib import paths

    folder = paths.OUTPUTS_DIR / "live_memory"
    record = json.loads((folder / "record.json").read_text())
    for arm, r in record["arms"].items():
        for loop in filter(None, (r["loop"], r["loop_detached"])):
            assert loop["acceptance_rate"] == loop["accepted"] / loop["proposed"], arm
            assert loop["identical"] == loop["prompts"] > 0 and loop["gamma"] == 1, arm
        assert (r["knowledge"]["memory"] == "live") == (r["loop_detached"] is not None), arm
    spec = importlib.util.spec_from_file_location("live_record", folder / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (folder / "README.md").read_text() == module.readme_text(record)
