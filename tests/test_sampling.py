import math

import pytest
import torch

from qdlib import layer_importance, sample_layers
from qdlib.sampling import run_layers

from helpers import tiny_qwen3


def test_uniform_reference_lists():
    assert sample_layers(28, 6) == [0, 5, 11, 16, 22, 27]
    assert sample_layers(28, 7) == [0, 5, 9, 14, 18, 23, 27]
    assert sample_layers(28, 28) == list(range(28))
    assert sample_layers(28, 2) == [0, 27]


def test_uniform_formula_round_half_up():
    for L in (4, 12, 28, 36):
        for k in range(2, L + 1):
            expect = [math.floor(i * (L - 1) / (k - 1) + 0.5) for i in range(k)]
            if len(set(expect)) == k:  # where the formula itself gives k distinct values it must be used as is
                assert sample_layers(L, k) == expect, (L, k)


@pytest.mark.parametrize("strategy", ["uniform", "geometric", "logarithmic", "importance"])
def test_every_k_keeps_ends_distinct_sorted(strategy):
    scores = [float((7 * i) % 11) for i in range(28)]
    for k in range(2, 29):
        layers = sample_layers(28, k, strategy, scores=scores if strategy == "importance" else None)
        assert len(layers) == k and len(set(layers)) == k, (strategy, k, layers)
        assert layers == sorted(layers)
        assert layers[0] == 0 and layers[-1] == 27
        assert all(0 <= i < 28 for i in layers)


def test_geometric_crowds_towards_input_logarithmic_towards_output():
    g = sample_layers(28, 6, "geometric")
    lg = sample_layers(28, 6, "logarithmic")
    gaps_g = [b - a for a, b in zip(g, g[1:])]
    gaps_l = [b - a for a, b in zip(lg, lg[1:])]
    assert gaps_g == sorted(gaps_g) and gaps_g[0] < gaps_g[-1]
    assert gaps_l == sorted(gaps_l, reverse=True) and gaps_l[0] > gaps_l[-1]


def test_importance_keeps_highest_scores():
    scores = [0.0] * 28
    for i, s in {3: 5.0, 9: 4.0, 20: 3.0, 21: 0.5}.items():
        scores[i] = s
    assert sample_layers(28, 5, "importance", scores=scores) == [0, 3, 9, 20, 27]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((28, 1), {}, "k must be an integer >= 2"),
        ((28, 0), {}, "k must be an integer >= 2"),
        ((28, 29), {}, "k=29 is more than the teacher's 28 layers"),
        ((28, 6, "cubic"), {}, "unknown strategy 'cubic'; allowed: uniform, geometric, logarithmic, importance"),
        ((28, 6, "importance"), {}, "needs scores"),
        ((28, 6, "importance"), {"scores": [1.0] * 27}, "needs 28 scores .* got 27"),
        ((28, 6, "uniform"), {"scores": [1.0] * 28}, "only used by the 'importance' strategy"),
    ],
)
def test_bad_input_clear_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_layers(*args, **kwargs)


def test_run_layers_all_equals_model():
    m = tiny_qwen3()
    x = torch.randint(2, 256, (2, 12))
    torch.testing.assert_close(run_layers(m, x, range(28)), m(input_ids=x).logits)


@pytest.mark.slow
def test_layer_importance_scores_match_manual_skip():
    m = tiny_qwen3(vocab=256)

    class Tok:
        def __call__(self, text, return_tensors=None, truncation=None, max_length=None):
            ids = torch.tensor([[2 + (ord(c) % 250) for c in text[:max_length]]])
            return type("E", (), {"input_ids": ids})()

    texts = ["def f(x): return x", "import os\nprint(os.sep)"]
    scores = layer_importance(m, Tok(), texts)
    assert len(scores) == 28 and all(s >= 0 for s in scores)
    # recompute one layer's score by hand
    skip = 13
    keep = [i for i in range(28) if i != skip]
    tot, n = 0.0, 0
    for t in texts:
        x = Tok()(t, max_length=256).input_ids
        lp = torch.log_softmax(m(input_ids=x).logits, -1)
        lq = torch.log_softmax(run_layers(m, x, keep), -1)
        tot += (lp.exp() * (lp - lq)).sum().item()
        n += x.shape[1]
    assert scores[skip] == pytest.approx(tot / n, rel=1e-4, abs=1e-7)
    assert set(sample_layers(28, 6, "importance", scores=scores)) >= {0, 27}
