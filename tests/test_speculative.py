"""Speculative decoding is lossless: greedy equals the target's greedy output, sampling keeps its distribution."""

import pytest
import torch

from qdlib import build_draft, sample_layers
from qdlib.speculative import (_rollback, accept_or_resample, generate_plain, process_logits,
                               speculative_generate)

from helpers import tiny_qwen3


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a - b).abs().sum().item()


def empirical(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).double() / tokens.numel()


# ----------------------------------------------------------------------------- the accept/resample step

P = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05], dtype=torch.float64)
Q = torch.tensor([0.10, 0.40, 0.05, 0.25, 0.15, 0.05], dtype=torch.float64)
N = 200_000
TV_BOUND = 0.006  # sampling noise of 2e5 draws over 6 outcomes is ~0.002


def correct_rule(p, q, g):
    x = torch.multinomial(q.expand(N, -1), 1, replacement=True, generator=g).squeeze(-1)
    u = torch.rand(N, generator=g, dtype=p.dtype)
    return accept_or_resample(p.expand(N, -1), q.expand(N, -1), x, u, g)[1]


def broken_threshold(p, q, g):  # accept whenever p(x) > 0.1 (the original project's rule)
    x = torch.multinomial(q.expand(N, -1), 1, replacement=True, generator=g).squeeze(-1)
    ok = p[x] > 0.1
    res = torch.multinomial((p - q).clamp(min=0).expand(N, -1), 1, replacement=True, generator=g).squeeze(-1)
    return torch.where(ok, x, res)


def broken_resample_from_p(p, q, g):  # right acceptance, but resample from p instead of the residual
    x = torch.multinomial(q.expand(N, -1), 1, replacement=True, generator=g).squeeze(-1)
    u = torch.rand(N, generator=g, dtype=p.dtype)
    ok = u < (p[x] / q[x]).clamp(max=1)
    res = torch.multinomial(p.expand(N, -1), 1, replacement=True, generator=g).squeeze(-1)
    return torch.where(ok, x, res)


def broken_greedy_draft(p, q, g):  # draft takes argmax q but the rule still uses q's probabilities
    x = q.argmax().expand(N)
    u = torch.rand(N, generator=g, dtype=p.dtype)
    return accept_or_resample(p.expand(N, -1), q.expand(N, -1), x, u, g)[1]


def test_accept_rule_preserves_target_distribution():
    g = torch.Generator().manual_seed(0)
    out = correct_rule(P, Q, g)
    assert tv(empirical(out, 6), P) < TV_BOUND


@pytest.mark.parametrize("broken", [broken_threshold, broken_resample_from_p, broken_greedy_draft])
def test_the_same_check_catches_broken_rules(broken):
    g = torch.Generator().manual_seed(0)
    out = broken(P, Q, g)
    assert tv(empirical(out, 6), P) > 5 * TV_BOUND, f"{broken.__name__} was not caught"


def test_acceptance_probability_is_sum_min():
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(Q.expand(N, -1), 1, replacement=True, generator=g).squeeze(-1)
    u = torch.rand(N, generator=g, dtype=torch.float64)
    ok, _ = accept_or_resample(P.expand(N, -1), Q.expand(N, -1), x, u, g)
    assert ok.double().mean().item() == pytest.approx(torch.minimum(P, Q).sum().item(), abs=0.005)


def test_accept_rule_on_real_teacher_and_draft_distributions(tiny):
    teacher, tok = tiny
    draft = build_draft(teacher, sample_layers(28, 6))
    g = torch.Generator().manual_seed(2)
    for prompt in ["import os\n", "def main():\n    ", "class Config:\n    def __init__(self"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        p = torch.softmax(teacher(input_ids=ids).logits[0, -1].double(), -1)
        q = torch.softmax(draft(input_ids=ids).logits[0, -1].double(), -1)
        n = 100_000
        x = torch.multinomial(q, n, replacement=True, generator=g)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        _, out = accept_or_resample(p[None], q[None], x, u, g)  # (1, V) rows shared by all draws
        # compare on the target's 20 most likely tokens plus an "everything else" bucket
        top = torch.topk(p, 20).indices
        emp = torch.stack([(out == t).double().mean() for t in top])
        exp = p[top]
        emp = torch.cat([emp, 1 - emp.sum()[None]])
        exp = torch.cat([exp, 1 - exp.sum()[None]])
        assert tv(emp, exp) < 0.01, prompt


def test_process_logits_top_k_top_p_temperature():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert process_logits(logits, top_k=2)[2:].sum() == 0
    p = process_logits(logits, top_p=0.7)
    full = torch.softmax(logits, -1)
    assert full[0] < 0.7 <= full[:2].sum()
    assert (p[2:] == 0).all() and p.sum().item() == pytest.approx(1.0)
    assert process_logits(logits, temperature=0.5)[0] > full[0]


# ----------------------------------------------------------------------------- greedy is exact


def greedy_reference(model, ids, n, eos=None):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=1, eos_token_id=eos)


def top2_gap_at_divergence(model, a, b):
    """Logit gap between the target's top two tokens where two outputs first differ."""
    i = next(j for j in range(min(a.shape[1], b.shape[1])) if a[0, j] != b[0, j])
    logits = model(input_ids=a[:, :i]).logits[0, -1]
    top = torch.topk(logits, 2).values
    return (top[0] - top[1]).item()


def check_greedy(target, draft, prompts, gammas, n_new=24):
    mismatches = []
    for ids in prompts:
        ref = greedy_reference(target, ids, n_new)
        for gamma in gammas:
            # both stop at the model's end-of-text token (eos_token_id=None means the model's own)
            out, stats = speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=n_new)
            assert stats.new_tokens == out.shape[1] - ids.shape[1] <= n_new
            if not torch.equal(out, ref):
                gap = top2_gap_at_divergence(target, out, ref)
                assert gap < 1e-4, f"gamma {gamma}: output diverged with a top-2 logit gap of {gap} (not a near-tie)"
                mismatches.append(gap)
    return mismatches


@pytest.mark.slow
def test_greedy_equals_generate_small_random_qwen3():
    target = tiny_qwen3(layers=28, seed=3)
    draft = build_draft(target, sample_layers(28, 4))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 256, (1, int(torch.randint(1, 12, (1,), generator=g))), generator=g) for _ in range(16)]
    mism = check_greedy(target, draft, prompts, gammas=range(1, 9), n_new=16)  # 128 prompt/gamma pairs
    assert len(mism) == 0


@pytest.mark.slow
def test_greedy_equals_generate_bundled_teacher_many_prompts(tiny):
    from qdlib.corpus import heldout_prompts, heldout_texts

    teacher, tok = tiny
    draft = build_draft(teacher, sample_layers(28, 6))
    prompts = [torch.tensor([p]) for p in heldout_prompts(tok, heldout_texts(), n_prompts=8, prompt_tokens=48)]
    mism = check_greedy(teacher, draft, prompts, gammas=(1, 2, 3, 4, 6, 8), n_new=20)  # 48 prompt/gamma pairs
    assert len(mism) <= 1, f"{len(mism)} near-tie divergences"


@pytest.mark.slow
def test_greedy_with_fusion_cache_attached_and_detached():
    target = tiny_qwen3(layers=28, seed=4)
    draft = build_draft(target, sample_layers(28, 4), knowledge_enhancement={"enabled": True})
    torch.manual_seed(0)
    with torch.no_grad():
        for f in draft.fusion.values():
            f.gate.fill_(0.5)  # an open gate, so the cache really changes the draft

    class Cache:
        states = torch.randn(3, 5, 64)
        mask = torch.ones(3, 5, dtype=torch.bool)

    prompts = [torch.randint(2, 256, (1, 6)) for _ in range(4)]
    for cache in (Cache(), None):  # 24 prompt/gamma pairs (200 in all with the two tests above)
        draft.set_knowledge(cache)
        assert check_greedy(target, draft, prompts, gammas=(1, 4, 7)) == []


def test_plain_generation_equals_generate():
    target = tiny_qwen3(layers=6, seed=5)
    ids = torch.randint(2, 256, (1, 5))
    out, stats = generate_plain(target, ids, max_new_tokens=20)
    assert torch.equal(out, greedy_reference(target, ids, 20))
    assert stats.target_calls == stats.new_tokens and stats.tokens_per_target_call == 1.0


def test_stops_exactly_at_eos_and_budget():
    target = tiny_qwen3(layers=6, seed=6)
    draft = build_draft(target, [0, 5])
    ids = torch.randint(2, 256, (1, 4))
    ref = generate_plain(target, ids, max_new_tokens=16, eos_token_id=-1)[0]  # no end-of-text at all
    hf = greedy_reference(target, ids, 16)  # stops early if the model's own end-of-text comes up
    assert torch.equal(ref[:, : hf.shape[1]], hf)
    eos = int(ref[0, ids.shape[1] + 5])  # pretend the 6th generated token is end-of-text
    first = next(i for i in range(ids.shape[1], ref.shape[1]) if int(ref[0, i]) == eos)
    for gamma in (1, 3, 8):
        out, stats = speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=16, eos_token_id=eos)
        assert torch.equal(out, ref[:, : first + 1]) and int(out[0, -1]) == eos
        out, _ = speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=3, eos_token_id=-1)
        assert out.shape[1] == ids.shape[1] + 3


def test_hybrid_drafter_is_exact_and_uses_both_sources(tiny):
    """Greedy output equals the teacher's; the lookup drafts where the datastore matches, the draft model elsewhere."""
    from qdlib import load_draft
    from qdlib.corpus import heldout_prompts, heldout_texts
    from qdlib.combined_drafters import HybridDrafter
    from qdlib.lookup import NgramDrafter

    teacher, tok = tiny
    draft = load_draft()
    for p in heldout_prompts(tok, heldout_texts(), n_prompts=2, prompt_tokens=40, seed=5):
        ids = torch.tensor([p])
        ref = greedy_reference(teacher, ids, 32)
        store = NgramDrafter([ref[0, 40:].tolist()], max_n=3, min_n=3)  # the answer itself, as a datastore
        hybrid = HybridDrafter(store, draft)
        out, stats = speculative_generate(teacher, hybrid, ids, gamma=4, max_new_tokens=32)
        assert torch.equal(out, ref)
        assert 0 < hybrid.from_lookup < stats.rounds  # the first round has no 3-gram of the answer yet
    with pytest.raises(ValueError, match="min_tokens=0 must be an integer >= 1"):
        HybridDrafter(store, draft, min_tokens=0)


# ----------------------------------------------------------------------------- sampling end to end


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["model", "ngram", "hybrid"])
def test_sampling_end_to_end_matches_target_distribution(drafter):
    """Joint distribution of 2 sampled tokens over many generations equals the target's exact one.

    With a draft model (q a real distribution), a model-free n-gram drafter (q one-hot), and the hybrid of the two
    (lookup where it matches, the model elsewhere).
    """
    from qdlib.combined_drafters import HybridDrafter
    from qdlib.lookup import NgramDrafter

    V = 12
    target = tiny_qwen3(vocab=V, hidden=32, layers=4, seed=7, tie_word_embeddings=False)
    draft = build_draft(target, [0, 3])
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)  # sharpen the target
        draft.lm_head.weight.add_(torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    ids = torch.tensor([[3, 5]])
    T = 1.0
    with torch.no_grad():
        p1 = process_logits(target(input_ids=ids).logits[0, -1], T)
        joint = torch.zeros(V, V, dtype=torch.float64)
        for a in range(V):
            p2 = process_logits(target(input_ids=torch.tensor([[3, 5, a]])).logits[0, -1], T)
            joint[a] = p1[a].double() * p2.double()
        q1 = process_logits(draft(input_ids=ids).logits[0, -1], T)
    assert tv(p1.double(), q1.double()) > 0.2 and p1.max() < 0.9  # a real, different distribution
    g = torch.Generator().manual_seed(0)
    n = 2500
    counts = torch.zeros(V, V, dtype=torch.float64)
    # the n-gram store proposes (7, 2) after (3, 5), and continues any token it has seen
    store = NgramDrafter([[3, 5, 7, 2, 9], [1, 4, 6, 8]], max_n=2)
    proposer = {"model": draft, "ngram": store, "hybrid": HybridDrafter(NgramDrafter([[0, 5, 7]], max_n=1), draft)}[drafter]
    for _ in range(n):
        out, _ = speculative_generate(target, proposer, ids, gamma=2, max_new_tokens=2, temperature=T, generator=g,
                                      eos_token_id=-1)
        counts[out[0, 2], out[0, 3]] += 1
    # chi-square goodness of fit on the 144 cells (cells expecting < 5 counts merged into one bin)
    exp = (joint * n).flatten()
    obs = counts.flatten()
    big = exp >= 5
    e = torch.cat([exp[big], exp[~big].sum()[None]])
    o = torch.cat([obs[big], obs[~big].sum()[None]])
    chi2 = ((o - e) ** 2 / e).sum().item()
    dof = e.numel() - 1
    critical = dof + 4 * (2 * dof) ** 0.5  # about the 0.01% tail for these degrees of freedom
    assert chi2 < critical, f"chi-square {chi2:.1f} with {dof} degrees of freedom"
    if drafter != "model":
        return
    # the same statistic rejects the draft's own distribution: the test has power
    q_joint = torch.zeros(V, V, dtype=torch.float64)
    with torch.no_grad():
        for a in range(V):
            q2 = process_logits(draft(input_ids=torch.tensor([[3, 5, a]])).logits[0, -1], T)
            q_joint[a] = q1[a].double() * q2.double()
    eq = (q_joint * n).flatten()
    eq = torch.cat([eq[big], eq[~big].sum()[None]])
    assert ((o - eq) ** 2 / eq.clamp(min=1e-9)).sum().item() > 10 * critical


# ----------------------------------------------------------------------------- cache rollback and errors


def test_rollback_gives_the_same_logits_as_a_fresh_prefix():
    from transformers import DynamicCache

    m = tiny_qwen3(layers=4, seed=8)
    seq = torch.randint(2, 256, (1, 12))
    cache = DynamicCache(config=m.config)
    m(input_ids=seq, cache=cache, use_cache=True)
    _rollback(cache, 7)  # as after a rejection: keep the first 7 positions
    assert cache.get_seq_length() == 7
    nxt = torch.tensor([[9, 10]])
    got = m(input_ids=nxt, cache=cache, use_cache=True).logits
    ref = m(input_ids=torch.cat([seq[:, :7], nxt], 1)).logits[:, -2:]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_caches_hold_exactly_the_accepted_prefix(monkeypatch):
    """Every target call sees a cache of exactly the accepted tokens before its input."""
    target = tiny_qwen3(layers=6, seed=9)
    draft = build_draft(target, [0, 5])
    seen = []
    orig = type(target).forward

    def spy(self, input_ids=None, cache=None, **kw):
        seen.append((cache.get_seq_length() if cache is not None else 0, input_ids[0].tolist()))
        return orig(self, input_ids=input_ids, cache=cache, **kw)

    monkeypatch.setattr(type(target), "forward", spy)
    ids = torch.randint(2, 256, (1, 5))
    # transformers' forward (qdlib's engine is checked the same way in test_trees.py)
    out, stats = speculative_generate(target, draft, ids, gamma=4, max_new_tokens=20, eos_token_id=-1,
                                      engine="transformers")
    final = out[0].tolist()
    assert stats.accepted < stats.proposed  # some rejections happened
    assert len(seen) == stats.target_calls  # every target call was seen
    for cached, inp in seen:
        assert final[cached : cached + 1] == inp[:1]  # the first fed token continues the cached prefix
        assert cached + 1 <= len(final)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 0}, "gamma=0 must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature=-0.1 must be >= 0"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"max_new_tokens": 10_000}, "exceeds the model's context of 256 tokens"),
    ],
)
def test_bad_arguments(kwargs, match):
    target = tiny_qwen3(layers=2)
    draft = build_draft(target, [0, 1])
    with pytest.raises(ValueError, match=match):
        speculative_generate(target, draft, torch.tensor([[5, 6]]), **kwargs)


def test_bad_inputs_batch_empty_vocab():
    target = tiny_qwen3(layers=2)
    draft = build_draft(target, [0, 1])
    with pytest.raises(ValueError, match="batch size 2 is not supported"):
        speculative_generate(target, draft, torch.tensor([[5, 6], [7, 8]]))
    with pytest.raises(ValueError, match="the prompt is empty"):
        speculative_generate(target, draft, torch.zeros(1, 0, dtype=torch.long))
    other = build_draft(tiny_qwen3(vocab=300, layers=2), [0, 1])
    with pytest.raises(ValueError, match=r"draft vocabulary \(300\) differs from the target's \(256\)"):
        speculative_generate(target, other, torch.tensor([[5, 6]]))


def test_each_drafter_checks_what_it_needs_of_the_target_and_a_wrapper_checks_its_parts():
    """speculative_generate asks the drafter (Drafter.check), never its type: each kind names its own mismatch."""
    from qdlib.combined_drafters import HybridDrafter, Pausing
    from qdlib.feature_draft import build_feature_draft
    from qdlib.lookup import NgramDrafter

    target, ids = tiny_qwen3(layers=2), torch.tensor([[5, 6]])
    wide = tiny_qwen3(layers=2, hidden=128)
    with pytest.raises(ValueError, match=r"feature-fed draft was built for vocabulary 256 and hidden size 128, the "
                                         r"target has 256 and 64"):
        speculative_generate(target, build_feature_draft(wide, 1), ids)
    live = build_draft(wide, [0, 1], knowledge_enhancement={"enabled": True, "memory": "live"}).set_knowledge("live")
    with pytest.raises(ValueError, match=r"live memory reads states 128 wide per layer, the target's are 64"):
        speculative_generate(target, live, ids)
    other = build_draft(tiny_qwen3(vocab=300, layers=2), [0, 1])
    for wrapper in (HybridDrafter(NgramDrafter([[1, 2, 3]]), other), Pausing(other)):
        with pytest.raises(ValueError, match=r"draft vocabulary \(300\) differs from the target's \(256\)"):
            speculative_generate(target, wrapper, ids)
    speculative_generate(target, NgramDrafter([[1, 2, 3]]), ids, max_new_tokens=2)  # a lookup needs nothing


def test_each_drafter_times_its_own_drafting_path():
    """Drafter.step_cost: a model's step on the forward decoding uses, nothing for a lookup, a wrapper's dearest part."""
    from qdlib.decoding import Settings
    from qdlib.drafters import Drafter, as_drafter
    from qdlib.combined_drafters import HybridDrafter
    from qdlib.lookup import NgramDrafter

    class Fixed(Drafter):  # a stand-in with a known cost
        def __init__(self, cost):
            super().__init__(Settings())
            self.cost = cost

        def step_cost(self, context=96):
            return self.cost

    target = tiny_qwen3(layers=2)
    assert as_drafter(build_draft(target, [0, 1]), Settings()).step_cost(16) > 0
    assert as_drafter(NgramDrafter([[1, 2, 3]]), Settings()).step_cost() == 0.0
    hybrid = HybridDrafter(NgramDrafter([[1, 2, 3]]), Fixed(0.25)).configure(Settings(), vocab_size=256)
    assert hybrid.step_cost() == 0.25


def test_trace_reproduces_the_output():
    from qdlib.viz import trace_tokens

    target = tiny_qwen3(layers=6, seed=10)
    draft = build_draft(target, [0, 5])
    ids = torch.randint(2, 256, (1, 4))
    for gamma, n_new in ((3, 17), (5, 9), (1, 4)):
        out, stats = speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=n_new, eos_token_id=-1)
        kept = [t for t, kind in trace_tokens(stats.trace) if kind != "rejected"]
        assert kept == out[0, ids.shape[1]:].tolist()
        assert sum(stats.proposed_at) <= stats.proposed and stats.accepted == sum(stats.accepted_at)
