"""costs, metrics, viz and exercises: small pure functions with known answers."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from qdlib import costs, sample_layers
from qdlib.decoding import count_positions
from qdlib.exercises import check
from qdlib.metrics import (compare_strategies, distribution_metrics, expected_tokens_per_call, format_table,
                           layer_similarity, logit_lens, text_windows)
from qdlib.viz import describe_sampling, layer_strip

from helpers import QWEN3_06B, tiny_qwen3


def test_costs_match_reference_figures_and_real_param_count():
    cfg = Qwen3Config(**QWEN3_06B)
    assert costs.layer_macs(cfg) == 15_728_640
    assert costs.head_macs(cfg) == 1024 * 151936
    assert costs.draft_cost_ratio(cfg, 6) == pytest.approx(0.42, abs=0.005)
    assert costs.draft_cost_ratio(cfg, 6, vocab=32_000) == pytest.approx(0.21, abs=0.01)
    with torch.device("meta"):
        m = Qwen3ForCausalLM(cfg)
    assert sum(r["params"] for r in costs.cost_table(cfg)) == costs.count_params(m)
    small = tiny_qwen3()
    assert sum(r["params"] for r in costs.cost_table(small.config)) == costs.count_params(small)


def test_distribution_metrics_known_values():
    p = torch.tensor([0.5, 0.3, 0.2]).log()[None, None]
    q = torch.tensor([0.2, 0.3, 0.5]).log()[None, None]
    m = distribution_metrics(p, q)
    assert m["alpha"] == pytest.approx(0.2 + 0.3 + 0.2)
    assert m["agreement"] == 0.0
    kl = sum(a * (torch.tensor(a).log() - torch.tensor(b).log()).item() for a, b in [(0.5, 0.2), (0.3, 0.3), (0.2, 0.5)])
    assert m["kl"] == pytest.approx(kl, rel=1e-5)
    mask = torch.tensor([[True, False]])
    both = torch.cat([p, q], 1)
    assert distribution_metrics(both, both.flip(1), mask)["alpha"] == pytest.approx(0.7, rel=1e-5)


def test_expected_tokens_per_call():
    assert expected_tokens_per_call(0.5, 1) == pytest.approx(1.5)
    assert expected_tokens_per_call(0.8, 4) == pytest.approx(sum(0.8**i for i in range(5)))


def test_compare_strategies_and_layer_views():
    m = tiny_qwen3()
    x = torch.randint(2, 256, (4, 24))
    rows = compare_strategies(m, x, ks=(28,), strategies=("uniform",))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[0]["agreement"] == 1.0  # all layers = teacher
    rows = compare_strategies(m, x, ks=(4, 6), strategies=("uniform", "first-k"))
    assert [(r["strategy"], r["k"]) for r in rows] == [("uniform", 4), ("first-k", 4), ("uniform", 6), ("first-k", 6)]
    assert rows[1]["layers"] == [0, 1, 2, 3]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["strategy", "k", "KL", "agree", "alpha", "layers"] and len(table) == 2 + len(rows)
    assert table[3].split()[:2] == ["first-k", "4"] and table[3].endswith("[0, 1, 2, 3]")
    assert len(layer_similarity(m, x)) == 28
    lens = logit_lens(m, x)
    assert len(lens) == 28 and lens[-1] == pytest.approx(0.0, abs=1e-5)


def test_text_windows_shape_and_error():
    class Tok:
        eos_token_id = 0

        def __call__(self, t, add_special_tokens=False):
            return {"input_ids": [2 + (ord(c) % 50) for c in t]}

    w = text_windows(Tok(), ["a" * 100, "b" * 100], seq_len=32, n=5)
    assert w.shape == (5, 32)
    with pytest.raises(ValueError, match="fewer than one window"):
        text_windows(Tok(), ["abc"], seq_len=32)


def test_layer_strip_and_explorer_text():
    assert layer_strip(5, [0, 4]) == "■□□□■"
    text = describe_sampling(28, 6, "uniform")
    assert "[0, 5, 11, 16, 22, 27]" in text and layer_strip(28, sample_layers(28, 6)) in text
    assert describe_sampling(28, 6, "importance").startswith("error: strategy 'importance' needs scores")
    assert "[0, 1, 2, 3, 4, 5]" in describe_sampling(28, 6, "first-k")


def test_exercise_check_messages(capsys):
    def todo():
        raise NotImplementedError()

    assert not check("ex", todo, expected=1)
    assert "not attempted" in capsys.readouterr().out
    assert not check("ex", lambda: 2, expected=1)
    assert "too large" in capsys.readouterr().out
    # a wrong answer never shows the expected value, whatever its type
    secret = 0.123456
    for got, expected, words in ((0.5, secret, "too large"), ("x", secret, "a str where a number"),
                                 ([secret], [secret, 7], "1 items, it should have 2"),
                                 ((1, 2, secret), (1, 2, 0.0), "differs at position 2"),
                                 (torch.zeros(2, 3), torch.full((2, 3), secret), "6 of 6 entries are wrong"),
                                 (torch.zeros(3), torch.full((2, 3), secret), "shape (3,)"),
                                 ({"a": 1}, {"a": secret}, "differ at keys ['a']"), ({"b": 1}, {"a": 1}, "other keys")):
        assert not check("ex", lambda: got, expected=expected)
        out = capsys.readouterr().out
        assert words in out and "0.123" not in out and "7" not in out, out
    assert not check("ex", lambda: None, expected=1)
    assert "returned None" in capsys.readouterr().out
    assert not check("ex", lambda: 1 / 0, expected=1)
    assert "ZeroDivisionError" in capsys.readouterr().out
    assert check("ex", lambda: torch.tensor([1.0, 2.0]), expected=torch.tensor([1.0, 2.0]))


def test_speedup_explorer_follows_its_sliders():
    from qdlib.metrics import expected_speedup
    from qdlib.viz import describe_speedup, speedup_explorer

    assert describe_speedup(0.8, 0.1, 4).endswith(f"{expected_speedup(0.8, 4, 0.1):.2f}x")
    box = speedup_explorer(alpha=0.5, c=0.2, gamma=3, verify_cost=1.0)
    out = box.children[-1]
    assert describe_speedup(0.5, 0.2, 3, 1.0) in out.value
    box.children[1].children[0].value = 6  # gamma slider
    assert describe_speedup(0.5, 0.2, 6, 1.0) in out.value


def test_count_positions_sees_the_cache_and_removes_its_hook():
    model = tiny_qwen3(layers=2)
    ids = torch.tensor([[5, 6, 7, 8]])
    runs = {}
    with torch.no_grad():
        for cached in (False, True):
            with count_positions(model) as seen:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                               do_sample=False, use_cache=cached, pad_token_id=1)
            runs[cached] = seen
    assert runs[False].calls == [4, 5, 6] and runs[True].calls == [4, 1, 1]  # no cache: the whole sequence again
    assert runs[True].total == 6
    with pytest.raises(RuntimeError), count_positions(model) as seen:
        raise RuntimeError("a failing block")
    model(ids)
    assert seen.calls == [] and not model.get_input_embeddings()._forward_hooks  # the hook is gone either way
