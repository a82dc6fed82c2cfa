"""Token trees are lossless: greedy tree decoding equals the teacher's greedy output, sampling keeps its
distribution (and the same checks catch broken rules), and every cache holds exactly the verified text."""

import pytest
import torch

from qdlib.decoding import Settings, process_logits
from qdlib.feature_draft import build_feature_draft
from qdlib.speculative import generate_plain, speculative_generate
from qdlib.trees import (TreeShape, accept_tree, chain_parents, check_tree, children_of, merge_chain, path_to,
                         tree_mask)

from helpers import tiny_qwen3

P = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05], dtype=torch.float64)


def tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


# ----------------------------------------------------------------------------- structure


def test_masks_and_paths():
    parents = [-1, 0, -1, 1, 2]
    mask = tree_mask(parents)
    for i in range(5):  # a node sees the root, its ancestors and itself, nothing else
        seen = {c - 1 for c in range(1, 6) if mask[i + 1, c]}
        assert seen == set(path_to(parents, i))
        assert mask[i + 1, 0]
    assert tree_mask(chain_parents(4)).equal(torch.ones(5, 5, dtype=torch.bool).tril())
    assert children_of(parents) == {-1: [0, 2], 0: [1], 1: [3], 2: [4], 3: [], 4: []}


def test_check_tree_names_the_problem():
    with pytest.raises(ValueError, match="node 1 has parent 1"):
        check_tree([3, 4], [-1, 1])
    with pytest.raises(ValueError, match="node 1 repeats token 3 under parent -1"):
        check_tree([3, 3], [-1, -1])
    with pytest.raises(ValueError, match="one parent per token"):
        check_tree([3], [])
    check_tree(*merge_chain([3, 4], [-1, -1], [3, 9, 9]))


def test_tree_shape_checks_its_fields():
    with pytest.raises(ValueError, match="TreeShape.budget=0 must be an integer >= 1"):
        TreeShape(budget=0)
    with pytest.raises(ValueError, match="TreeShape.sure=1.5 must be in"):
        TreeShape(sure=1.5)
    with pytest.raises(ValueError, match="unknown tree settings \\['depth'\\]"):
        TreeShape.from_dict({"depth": 3})
    assert TreeShape.from_dict(None) is None and TreeShape.from_dict({"budget": 4}).budget == 4


def test_greedy_accept_tree_is_the_longest_path_the_target_agrees_with():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 10, (1,), generator=g))
        parents = [int(torch.randint(-1, i, (1,), generator=g)) if i else -1 for i in range(n)]
        tokens = []
        for i, p in enumerate(parents):  # distinct siblings from a 4-token vocabulary
            used = {tokens[c] for c in range(i) if parents[c] == p}
            free = [t for t in range(4) if t not in used]
            tokens.append(free[int(torch.randint(0, len(free), (1,), generator=g))] if free else None)
        keep = [i for i, t in enumerate(tokens) if t is not None and all(tokens[a] is not None for a in path_to(parents, i))]
        if len(keep) < n:
            continue
        logits = torch.randn(n + 1, 4, generator=g)
        path, nxt = accept_tree(tokens, parents, logits, Settings())
        top = logits.argmax(-1).tolist()
        # brute force: among all root-to-node paths, the longest whose every token is the target's argmax
        best = []
        for i in range(n):
            p = path_to(parents, i)
            if all(tokens[p[d]] == top[0 if d == 0 else p[d - 1] + 1] for d in range(len(p))) and len(p) > len(best):
                best = p
        assert path == best
        assert nxt == top[(best[-1] + 1) if best else 0]


# ----------------------------------------------------------------------------- sampling at one node


def _one_node(rule, children, n, seed=0):
    """``n`` outputs of one tree step whose root has ``children`` (token ids) under the target P."""
    g = torch.Generator().manual_seed(seed)
    s = Settings(temperature=1.0, generator=g)
    logits = P.float().log()[None].expand(len(children) + 1, -1).clone()  # every row: P (children have no kids)
    out = torch.empty(n, dtype=torch.long)
    for k in range(n):
        path, nxt = rule(children, [-1] * len(children), logits, s)
        out[k] = children[path[0]] if path else nxt
    return torch.bincount(out, minlength=6).double() / n


def _broken_no_removal(tokens, parents, logits, s):
    """Tries each child with probability p(x) but never removes a rejected child from p."""
    p = s.dist(logits[0])
    for i, c in enumerate(children_of(parents)[-1]):
        if torch.rand(1, generator=s.generator).item() < p[tokens[c]].item():
            return [i], None
    return [], s.pick(p)


def _broken_threshold(tokens, parents, logits, s):
    """Keeps a child when p(x) > 0.1 (the original project's rule), else samples from p."""
    p = s.dist(logits[0])
    for i, c in enumerate(children_of(parents)[-1]):
        if p[tokens[c]] > 0.1:
            return [i], None
    return [], s.pick(p)


@pytest.mark.parametrize("children", [[0], [1, 0], [4, 2, 5]])
def test_multi_candidate_rule_keeps_the_target_distribution(children):
    assert tv(_one_node(accept_tree, children, 40_000), P) < 0.012  # noise of 4e4 draws over 6 outcomes: ~0.005


@pytest.mark.parametrize("broken", [_broken_no_removal, _broken_threshold])
def test_the_same_check_catches_broken_tree_rules(broken):
    assert tv(_one_node(broken, [1, 0], 40_000), P) > 0.05


# ----------------------------------------------------------------------------- decoding with trees

SHAPES = [TreeShape(budget=1, branch=1, width=1), TreeShape(budget=4, branch=2, width=2, min_prob=0.0),
          TreeShape(budget=8, branch=3, width=3, sure=0.9, min_prob=0.0), TreeShape(budget=12, branch=4, width=4),
          TreeShape(budget=6, branch=2, width=1, sure=0.5, min_prob=0.2)]


def _spy_caches(monkeypatch, target):
    """Check after every round that the target's cache and the drafter's features equal a fresh prefill's."""
    from qdlib import speculative
    from qdlib.drafters import FeatureDrafter
    from qdlib.target_engine import TargetEngine

    made, checked = [], []
    orig_verifier, orig_commit = speculative.verifier, FeatureDrafter.commit

    def spy_verifier(*args, **kw):
        made.append(orig_verifier(*args, **kw))
        return made[-1]

    monkeypatch.setattr(speculative, "verifier", spy_verifier)

    def commit(self, seq, features):
        eng = made[-1].engine
        fresh = TargetEngine(target, len(seq) + 1)
        _, h = fresh(seq[:-1])
        assert eng.length == len(seq) - 1
        torch.testing.assert_close(eng.k[:, :, :, : eng.length], fresh.k[:, :, :, : eng.length], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(features, h[-len(features):], rtol=1e-4, atol=1e-4)
        checked.append(len(seq))
        return orig_commit(self, seq, features)

    monkeypatch.setattr(FeatureDrafter, "commit", commit)
    return checked


def test_greedy_trees_equal_plain_decoding_and_caches_hold_the_verified_text(monkeypatch):
    target = tiny_qwen3(layers=6, seed=5)
    draft = build_feature_draft(target, 1)
    checked = _spy_caches(monkeypatch, target)
    g = torch.Generator().manual_seed(2)
    for i in range(3):
        ids = torch.randint(2, 256, (1, 1 + 4 * i), generator=g)
        ref, _ = generate_plain(target, ids, max_new_tokens=16, eos_token_id=-1, engine="transformers")
        for shape in SHAPES[1:3]:
            out, stats = speculative_generate(target, draft, ids, gamma=4, max_new_tokens=16, eos_token_id=-1,
                                              tree=shape)
            assert torch.equal(out, ref), (i, shape)
    assert len(checked) > 10


@pytest.mark.slow
def test_greedy_trees_equal_generate_on_200_prompt_tree_pairs(tiny):
    """40 prompts x 5 tree shapes on a random 28-layer target, and unfamiliar code with the fast draft."""
    target = tiny_qwen3(layers=28, seed=3)
    draft = build_feature_draft(target, 1)
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        ids = torch.randint(2, 256, (1, int(torch.randint(1, 12, (1,), generator=g))), generator=g)
        ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              pad_token_id=1, eos_token_id=None)
        for shape in SHAPES:
            out, _ = speculative_generate(target, draft, ids, gamma=int(torch.randint(1, 7, (1,), generator=g)),
                                          max_new_tokens=12, tree=shape, eos_token_id=-1)
            assert torch.equal(out, ref[:, : out.shape[1]]) and out.shape == ref.shape, (i, shape)


@pytest.mark.slow
def test_greedy_trees_with_the_fast_draft_on_unfamiliar_code(tiny):
    from qdlib import load_draft
    from qdlib.heldout_code import heldout_code_prompts

    teacher, tok = tiny
    fast = load_draft("fast")
    for p in heldout_code_prompts(tok, 6, 48):
        ids = torch.tensor([p])
        ref = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                               pad_token_id=tok.eos_token_id)
        for shape in SHAPES[2:4]:
            out, stats = speculative_generate(teacher, fast, ids, max_new_tokens=32, tree=shape)
            assert torch.equal(out, ref), shape
            assert stats.tokens_per_target_call > 1.5


def _tree_joint(target, draft, ids, V, n, T=1.0):
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V, dtype=torch.float64)
    for _ in range(n):
        out, _ = speculative_generate(target, draft, ids, gamma=2, max_new_tokens=2, temperature=T, generator=g,
                                      eos_token_id=-1, tree=TreeShape(budget=5, branch=3, width=3, min_prob=0.0))
        counts[out[0, -2], out[0, -1]] += 1
    return counts


def _chi2(counts, joint, n):
    exp, obs = (joint * n).flatten(), counts.flatten()
    big = exp >= 5
    e = torch.cat([exp[big], exp[~big].sum()[None]])
    o = torch.cat([obs[big], obs[~big].sum()[None]])
    dof = e.numel() - 1
    return ((o - e) ** 2 / e).sum().item(), dof + 4 * (2 * dof) ** 0.5  # statistic, about the 0.01% tail


@pytest.mark.slow
def test_sampling_with_trees_matches_the_target_distribution(monkeypatch):
    """The joint distribution of 2 sampled tokens equals the target's exact one; a broken rule is caught."""
    from qdlib import speculative

    V = 12
    target = tiny_qwen3(vocab=V, hidden=32, layers=4, seed=7, tie_word_embeddings=False)
    draft = build_feature_draft(target, 1)
    with torch.no_grad():
        target.lm_head.weight.mul_(8.0)  # sharpen the target
    ids = torch.tensor([[3, 5]])
    with torch.no_grad():
        p1 = process_logits(target(input_ids=ids).logits[0, -1], 1.0)
        joint = torch.stack([p1[a] * process_logits(target(input_ids=torch.tensor([[3, 5, a]])).logits[0, -1], 1.0)
                             for a in range(V)]).double()
    assert p1.max() < 0.9
    n = 2500
    chi2, critical = _chi2(_tree_joint(target, draft, ids, V, n), joint, n)
    assert chi2 < critical, f"chi-square {chi2:.1f}"
    monkeypatch.setattr(speculative, "accept_tree", _broken_threshold_tree)
    chi2, critical = _chi2(_tree_joint(target, draft, ids, V, n), joint, n)
    assert chi2 > critical, "the check did not catch a broken rule"


def _broken_threshold_tree(tokens, parents, logits, s):
    kids, path, cur = children_of(parents), [], -1
    while True:
        p = s.dist(logits[cur + 1])
        nxt = next((c for c in kids[cur] if p[tokens[c]] > 0.1), None)
        if nxt is None:
            return path, s.pick(p)
        path.append(nxt)
        cur = nxt


def test_pausing_and_lookup_branches_stay_exact():
    """Wrappers that change when and what is drafted never change the output."""
    from qdlib.combined_drafters import LookupBranches, Pausing
    from qdlib.lookup import NgramDrafter

    target = tiny_qwen3(layers=6, seed=5)
    draft = build_feature_draft(tiny_qwen3(layers=6, seed=6), 1)  # another model's: most proposals are rejected
    g = torch.Generator().manual_seed(4)
    for i in range(3):
        ids = torch.randint(2, 40, (1, 6 + 5 * i), generator=g)  # a small id range: the lookup finds repeats
        ref, _ = generate_plain(target, ids, max_new_tokens=24, eos_token_id=-1)
        paused = Pausing(draft, window=2, min_kept=1.0, pause=3)
        out, stats = speculative_generate(target, paused, ids, gamma=3, max_new_tokens=24, eos_token_id=-1,
                                          tree=SHAPES[1])
        assert torch.equal(out, ref) and paused.paused_rounds > 0
        merged = LookupBranches(draft, NgramDrafter([], max_n=2, include_context=True))
        out, _ = speculative_generate(target, merged, ids, gamma=3, max_new_tokens=24, eos_token_id=-1, tree=SHAPES[2])
        assert torch.equal(out, ref)
    assert merged.from_lookup > 0
