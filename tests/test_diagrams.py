"""The course's diagrams: each layout holds what the mechanism says, and the figure shows its labels."""

import matplotlib

matplotlib.use("Agg")  # tests only: no display; the notebooks draw with the inline backend

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from qdlib import diagrams as d  # noqa: E402


def texts(fig):
    out = [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    return out


def row(layout, name):
    return [b for b in layout.boxes if b.row == name]


def test_architecture_colours_the_kept_layers_and_places_fusion_after_the_chosen_positions():
    layers = [0, 5, 11, 16, 22, 27]
    lay = d.architecture_layout(28, layers, fusion_after=[2, 5])
    teacher = row(lay, "teacher")[1:-1]
    assert [b.label for b in teacher] == [str(i) for i in range(28)]
    assert [int(b.label) for b in teacher if b.colour == d.KEPT] == layers
    draft = [b.label for b in row(lay, "draft")]
    assert draft == ["embed\n(shared)", "layer 0", "layer 5", "layer 11", "fusion\ntanh(g)", "layer 16", "layer 22",
                     "layer 27", "fusion\ntanh(g)", "norm, head\n(shared)"]
    copies = [a for a in lay.arrows if a.style == ":"]
    assert len(copies) == len(layers) + 2  # every kept layer, the embedding and the head come from the teacher
    # each copy arrow starts under teacher layer i and ends above the draft box "layer i"
    by_x = {round(b.x + b.w / 2, 6): b.label for b in lay.boxes}
    assert [by_x[round(a.start[0], 6)] for a in copies][1:-1] == [str(i) for i in layers]
    assert [by_x[round(a.end[0], 6)] for a in copies][1:-1] == [f"layer {i}" for i in layers]


@pytest.mark.parametrize("layers, fusion, match", [([5, 0], (), "increasing"), ([0, 28], (), "0..27"),
                                                   ([0, 5], (2,), r"\[2\] are not draft layer positions 0..1")])
def test_architecture_names_a_bad_argument(layers, fusion, match):
    with pytest.raises(ValueError, match=match):
        d.architecture_layout(28, layers, fusion)


def test_round_with_a_rejection_keeps_the_prefix_and_the_teachers_correction():
    lay = d.round_layout(["a", "b", "c", "d"], 2, "X")
    assert [b.colour for b in row(lay, "draft")] == [d.ACCEPTED, d.ACCEPTED, d.REJECTED, d.UNCHECKED]
    out = row(lay, "output")
    assert [b.label for b in out] == ["a", "b", "X"] and out[-1].colour == d.CORRECTION
    assert "ONE pass over 5 positions" in row(lay, "teacher")[0].label
    assert out[-1].x == row(lay, "draft")[2].x  # the correction takes the rejected token's place
    assert any("2 accepted + 1 correction = 3 tokens" in t for _, _, t in lay.notes)


def test_round_fully_accepted_ends_with_the_bonus_token():
    lay = d.round_layout(["a", "b", "c"], 3, "Z")
    assert all(b.colour == d.ACCEPTED for b in row(lay, "draft"))
    out = row(lay, "output")
    assert [b.label for b in out] == ["a", "b", "c", "Z"] and out[-1].colour == d.BONUS
    lay0 = d.round_layout(["a", "b"], 0, "Y")
    assert [b.colour for b in row(lay0, "draft")] == [d.REJECTED, d.UNCHECKED]
    assert [b.label for b in row(lay0, "output")] == ["Y"]
    with pytest.raises(ValueError, match="n_accepted=3 with 2 proposals"):
        d.round_layout(["a", "b"], 3, "Y")


def test_token_labels_show_whitespace():
    assert d.token_label("  x\n") == "··x\\n"
    assert d.token_label("abcdefghijkl", width=5) == "abcd…"


def test_cross_attention_line_widths_follow_the_weights_and_padding_gets_none():
    w = [[0.5, 0.25, 0.25, 0.0], [0.0, 1.0, 0.0, 0.0]]
    lay = d.cross_attention_layout(w, mask=[True, True, True, False])
    assert [b.label for b in row(lay, "memory")] == ["slot 0", "slot 1", "slot 2", "pad"]
    links = [a for a in lay.arrows if not a.head]
    assert len(links) == 4  # only the non-zero weights are drawn
    widths = sorted(a.width for a in links)
    assert widths[-1] > widths[-2] > widths[0] and widths[0] == pytest.approx(widths[1])  # 1.0 > 0.5 > 0.25 = 0.25
    assert "tanh(g)" in row(lay, "gate")[0].label
    with pytest.raises(ValueError, match="sum to 1"):
        d.cross_attention_layout([[0.5, 0.4]])
    with pytest.raises(ValueError, match="mask has 1 entries for 2 memory slots"):
        d.cross_attention_layout([[0.5, 0.5]], [True])


def test_feature_draft_reads_the_teacher_once_then_its_own_predictions():
    lay = d.feature_draft_layout(num_layers=2, steps=3)
    feats = row(lay, "feature")
    assert [b.label for b in feats] == ["teacher\nf[i-1]", "own\nf'[i]", "own\nf'[i+1]"]
    assert [b.colour for b in feats] == [d.TEACHER, d.OWN, d.OWN]
    assert [b.label for b in row(lay, "norm")] == ["norm -> f'[i]", "norm -> f'[i+1]", "norm -> f'[i+2]"]
    assert [b.label for b in row(lay, "token")] == ["x[i+1]", "x[i+2]", "x[i+3]"]
    assert {b.label for b in row(lay, "layers")} == {"decoder layer × 2"}
    assert sum(a.style == ":" for a in lay.arrows) == 2  # one feed-back per step after the first
    with pytest.raises(ValueError, match="steps=0"):
        d.feature_draft_layout(1, 0)


def test_figures_show_the_layouts_labels():
    cases = [(d.draw_draft_architecture(28, [0, 13, 27], [1]), ["layer 13", "fusion\ntanh(g)", "27", "embed"]),
             (d.draw_round(["a", "b"], 1, "Q"), ["Q", "teacher: ONE pass over 3 positions", "one speculative round"]),
             (d.draw_cross_attention([[0.5, 0.5]]), ["h + tanh(g) · attn", "slot 1", "h[0]"]),
             (d.draw_feature_draft(1, 2), ["teacher\nf[i-1]", "own\nf'[i]", "teacher's head", "fc: 2H -> H"])]
    for fig, labels in cases:
        shown = texts(fig)
        assert all(label in shown for label in labels), (labels, shown)
