"""The notebooks' explorers: each redraws its picture from a tested function and stores its starting state."""

import base64

import pytest

from qdlib.metrics import expected_speedup
from qdlib.viz import (describe_sampling, describe_speedup, layer_explorer, plot_speedup, plot_verify_split,
                       speedup_explorer)

WIDGET = "application/vnd.jupyter.widget-view+json"


def sliders(box):
    return [s for row in box.children[:2] for s in row.children]


def test_plot_speedup_marks_the_chosen_gamma():
    fig = plot_speedup(0.8, 0.2, 3, 1.1)
    curve, marker = fig.axes[0].lines[:2]
    assert list(curve.get_xdata()) == list(range(1, 17))
    assert curve.get_ydata()[2] == pytest.approx(expected_speedup(0.8, 3, 0.2, 1.1))
    assert marker.get_xdata()[0] == 3 and marker.get_ydata()[0] == pytest.approx(expected_speedup(0.8, 3, 0.2, 1.1))


def test_speedup_explorer_starts_exactly_where_told_and_redraws():
    box = speedup_explorer(alpha=0.86, c=0.3, gamma=4, verify_cost=1.19)
    assert [s.value for s in sliders(box)] == [0.86, 0.3, 4, 1.19]
    picture, caption = box.children[2], box.children[3]
    first = picture.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    assert describe_speedup(0.86, 0.3, 4, 1.19) in caption.value
    sliders(box)[0].value = 0.5  # alpha
    assert picture.value != first, "moving a slider must redraw the plot"
    assert describe_speedup(0.5, 0.3, 4, 1.19) in caption.value


def test_speedup_explorer_refuses_a_value_its_slider_would_clamp():
    with pytest.raises(ValueError, match=r"alpha=1.5 is outside \[0.0, 0.99\]"):
        speedup_explorer(alpha=1.5)


def test_explorers_store_their_starting_state_not_a_repr():
    for box, line in ((speedup_explorer(alpha=0.7, c=0.2, gamma=3, verify_cost=1.0), describe_speedup(0.7, 0.2, 3, 1.0)),
                      (layer_explorer(28), describe_sampling(28, 6, "uniform"))):
        bundle = box._repr_mimebundle_()
        assert WIDGET in bundle, "the live widget is still what a running notebook shows"
        assert base64.b64decode(bundle["image/png"])[:4] == b"\x89PNG"
        assert bundle["text/plain"].endswith(line) and "children=" not in bundle["text/plain"]


def test_layer_explorer_redraws_and_reports_errors_in_words():
    box = layer_explorer(28, scores=None)
    strategy, k = box.children[0].children
    picture, text = box.children[1], box.children[2]
    first = picture.value
    k.value = 8
    assert picture.value != first and describe_sampling(28, 8, "uniform") in text.value
    box_with_scores = layer_explorer(28, scores=list(range(28)))
    assert "importance" in box_with_scores.children[0].children[0].options
    assert "importance" not in strategy.options


def test_verify_split_plot_stacks_step_arithmetic_and_overhead_to_the_measured_v():
    rows = [{"gamma": 1, "v": 1.3, "v_arithmetic": 0.1, "v_overhead": 0.2},
            {"gamma": 6, "v": 1.5, "v_arithmetic": 0.4, "v_overhead": 0.1}]
    fig = plot_verify_split({"transformers": {"step_ms": 26.0, "rows": rows}, "qdlib": {"step_ms": 14.0, "rows": rows}})
    assert [ax.get_title() for ax in fig.axes] == ["transformers", "qdlib"]
    ax = fig.axes[1]
    tops = {}  # bar x -> height reached by the stack
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2)
        tops[x] = max(tops.get(x, 0), patch.get_y() + patch.get_height())
    assert tops == pytest.approx({0: 1.3, 1: 1.5})  # 1 + arithmetic + overhead = v(g)
    assert any("14.0 ms" in label for label in ax.get_legend_handles_labels()[1])
