"""Diagrams of the course's mechanisms, drawn by code (matplotlib only, no model needed).

Each diagram is a pure *layout* (boxes, arrows, notes: what is drawn, with which label and colour),
tested for its content, and one ``draw_*`` function that hands the layout to :func:`draw`:

    >>> [b.label for b in round_layout(["a", "b", "c"], 1, "X").boxes if b.row == "output"]
    ['a', 'X']

    draw_draft_architecture(28, [0, 5, 11, 16, 22, 27], fusion_after=[2, 5])   # notebook 01
    draw_cross_attention(weights, mask)                                        # notebook 03
    draw_round(proposals, n_accepted, next_token)                              # notebook 05
    draw_feature_draft(num_layers=2, steps=3)                                  # notebook 07

The round's colours are those of the token-by-token trace (``qdlib.viz.render_trace_html``): green kept,
red rejected, blue the teacher's correction, gold the bonus token.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

KEPT, DROPPED, SHARED, FUSION = "#4c72b0", "#e6e6e6", "#8172b2", "#dd8452"
ACCEPTED, REJECTED, CORRECTION, BONUS, UNCHECKED = "#55a868", "#c44e52", "#4c72b0", "#ccb974", "#e6e6e6"
TEACHER, DRAFT, MEMORY, OWN = "#64b5cd", "#f2f2f2", "#937860", "#dd8452"


class Box(NamedTuple):
    x: float
    y: float
    w: float
    h: float
    label: str
    colour: str
    row: str = ""  # which part of the diagram it belongs to (what tests and notebooks select by)


class Arrow(NamedTuple):
    start: tuple[float, float]
    end: tuple[float, float]
    width: float = 1.0
    style: str = "-"  # "-" drawn, ":" a copy or a feed-back
    head: bool = True


class Layout(NamedTuple):
    boxes: list[Box]
    arrows: list[Arrow]
    notes: list[tuple[float, float, str]]  # (x, y, text), left-aligned


def _top(b: Box) -> tuple[float, float]:
    return b.x + b.w / 2, b.y + b.h


def _bottom(b: Box) -> tuple[float, float]:
    return b.x + b.w / 2, b.y


def _chain(boxes: Sequence[Box]) -> list[Arrow]:
    """Arrows from each box's right edge to the next box's left edge."""
    return [Arrow((a.x + a.w, a.y + a.h / 2), (b.x, b.y + b.h / 2)) for a, b in zip(boxes, boxes[1:])]


def token_label(text: str, width: int = 9) -> str:
    """A token as a box label: whitespace made visible, long tokens cut.

    >>> token_label("    return x")
    '····retu…'
    >>> token_label("\\n")
    '\\\\n'
    """
    s = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
    return s if len(s) <= width else s[: width - 1] + "…"


def architecture_layout(num_layers: int, layers: Sequence[int], fusion_after: Sequence[int] = ()) -> Layout:
    """The teacher's layers in a row (kept ones coloured), and below it the draft built from them.

    ``fusion_after`` are draft layer positions (0..k-1) followed by a gated cross-attention block.
    """
    layers = list(layers)
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers={layers!r}: need distinct increasing indices in 0..{num_layers - 1}, "
                         f"e.g. qdlib.sample_layers({num_layers}, 6)")
    bad = [p for p in fusion_after if not 0 <= p < len(layers)]
    if bad:
        raise ValueError(f"fusion_after={list(fusion_after)!r}: {bad} are not draft layer positions 0..{len(layers) - 1}")
    teacher = [Box(-3.2, 3, 2.6, 1, "embed", SHARED, "teacher")]
    teacher += [Box(i, 3, 0.85, 1, str(i), KEPT if i in layers else DROPPED, "teacher") for i in range(num_layers)]
    teacher += [Box(num_layers + 0.4, 3, 2.6, 1, "norm,\nhead", SHARED, "teacher")]
    parts = [("embed\n(shared)", SHARED)]
    for j, i in enumerate(layers):
        parts.append((f"layer {i}", KEPT))
        if j in fusion_after:
            parts.append(("fusion\ntanh(g)", FUSION))
    parts.append(("norm, head\n(shared)", SHARED))
    step = (num_layers + 6.0) / len(parts)
    draft = [Box(-3.2 + n * step, 0, step * 0.85, 1.2, label, colour, "draft") for n, (label, colour) in enumerate(parts)]
    sources = [teacher[0]] + [teacher[1 + i] for i in layers] + [teacher[-1]]
    targets = [b for b in draft if b.colour != FUSION]
    copies = [Arrow(_bottom(s), _top(t), 0.8, ":") for s, t in zip(sources, targets)]
    notes = [(-3.2, 4.5, f"teacher: {num_layers} layers, {len(layers)} kept (coloured)"),
             (-3.2, -0.6, f"draft: {len(layers)} layers copied from the teacher, renumbered 0..{len(layers) - 1}"
                          + (f"; gated fusion after draft layers {list(fusion_after)}" if fusion_after else ""))]
    return Layout(teacher + draft, copies + _chain(draft), notes)


def round_layout(proposals: Sequence[str], n_accepted: int, next_token: str) -> Layout:
    """One speculative round: γ proposals, one teacher pass over γ+1 positions, the tokens the round keeps.

    ``next_token`` is the teacher's own token after the accepted prefix: its correction at the first
    rejected position, or the bonus token when all γ proposals were accepted.
    """
    gamma = len(proposals)
    if not 0 <= n_accepted <= gamma:
        raise ValueError(f"n_accepted={n_accepted} with {gamma} proposals: it must lie in 0..{gamma}")
    fate = [ACCEPTED] * n_accepted + [REJECTED] * (n_accepted < gamma) + [UNCHECKED] * (gamma - n_accepted - 1)
    boxes = [Box(1.7 * j, 4, 1.5, 0.8, token_label(t), c, "draft") for j, (t, c) in enumerate(zip(proposals, fate))]
    teacher = Box(-0.1, 2, 1.7 * (gamma + 1) - 0.1, 0.8, f"teacher: ONE pass over {gamma + 1} positions", TEACHER,
                  "teacher")
    kept = [Box(1.7 * j, 0, 1.5, 0.8, token_label(t), ACCEPTED, "output") for j, t in enumerate(proposals[:n_accepted])]
    kind, colour = ("bonus", BONUS) if n_accepted == gamma else ("correction", CORRECTION)
    kept.append(Box(1.7 * n_accepted, 0, 1.5, 0.8, token_label(next_token), colour, "output"))
    arrows = [Arrow(_bottom(b), (b.x + b.w / 2, teacher.y + teacher.h)) for b in boxes]
    arrows += [Arrow((b.x + b.w / 2, teacher.y), _top(b)) for b in kept]
    x = 1.7 * (gamma + 1) + 0.2
    notes = [(x, 4.4, f"draft proposes γ = {gamma} (γ draft steps)"), (x, 2.4, "verifies all proposals at once"),
             (x, 0.4, f"kept: {n_accepted} accepted + 1 {kind} = {n_accepted + 1} token{'s' * (n_accepted > 0)}"),
             (0, -0.8, "green accepted, red rejected, grey discarded unchecked; blue the teacher's correction, gold the bonus")]
    return Layout(boxes + [teacher] + kept, arrows, notes)


def cross_attention_layout(weights: Sequence[Sequence[float]], mask: Sequence[bool] | None = None) -> Layout:
    """Draft positions (queries) attending over memory slots (keys, values); line width = attention weight.

    ``weights[t][s]`` is position t's weight on slot s (each row sums to 1); ``mask[s]`` False marks padding.
    """
    rows = [list(map(float, r)) for r in weights]
    n_slots = len(rows[0]) if rows else 0
    if not rows or any(len(r) != n_slots for r in rows) or any(abs(sum(r) - 1) > 1e-3 or min(r) < 0 for r in rows):
        raise ValueError("weights must be a non-empty (positions, slots) table of non-negative rows that sum to 1 "
                         "(a softmax over the slots, e.g. weights[0].mean(0).tolist() of (B, H, T, S) weights)")
    mask = [True] * n_slots if mask is None else list(mask)
    if len(mask) != n_slots:
        raise ValueError(f"mask has {len(mask)} entries for {n_slots} memory slots")
    span = max(len(rows), n_slots) * 1.3
    mem_step, pos_step = span / n_slots, span / len(rows)
    memory = [Box(s * mem_step, 4, mem_step * 0.8, 0.8, f"slot {s}" if mask[s] else "pad", MEMORY if mask[s] else DROPPED,
                  "memory") for s in range(n_slots)]
    draft = [Box(t * pos_step, 0, pos_step * 0.8, 0.8, f"h[{t}]", KEPT, "draft") for t in range(len(rows))]
    links = [Arrow(_top(draft[t]), _bottom(memory[s]), 0.3 + 6 * w, "-", False)
             for t, r in enumerate(rows) for s, w in enumerate(r) if w > 0]
    gate = Box(span + 0.8, 0, 5.2, 0.8, "h + tanh(g) · attn", FUSION, "gate")
    out = _chain([draft[-1], gate])
    notes = [(span + 0.8, 4.3, "keys, values: W_k, W_v of the memory\n(projected once per memory)"),
             (span + 0.8, 2.0, "queries: W_q of RMSNorm(h)\nline width = attention weight"),
             (span + 0.8, -0.7, "g = 0 at the start: tanh(0) = 0,\nthe draft is unchanged")]
    return Layout(memory + draft + [gate], links + out, notes)


def _step(j: int) -> str:
    return "i" if j == 0 else f"i+{j}"


def feature_draft_layout(num_layers: int = 1, steps: int = 2) -> Layout:
    """The feature-fed (EAGLE) draft over ``steps`` drafting steps, one column each.

    Step 0 reads the teacher's feature f[i-1]; every later step reads the draft's own predicted feature
    from the step before (the teacher has not run on the new tokens yet).
    """
    if steps < 1 or num_layers < 1:
        raise ValueError(f"steps={steps}, num_layers={num_layers}: both must be at least 1")
    boxes, arrows, w = [], [], 5.0
    for j in range(steps):
        x = j * (w + 1.6)
        feat = ("teacher\nf[i-1]", TEACHER) if j == 0 else (f"own\nf'[{_step(j - 1)}]", OWN)
        column = [Box(x, -0.2, w / 2 - 0.1, 1.0, feat[0], feat[1], "feature"),
                  Box(x + w / 2 + 0.1, -0.2, w / 2 - 0.1, 1.0, f"embed\nx[{_step(j)}]", SHARED, "embed"),
                  Box(x, 1.5, w, 0.8, "fc: 2H -> H", DRAFT, "fc"),
                  Box(x, 3.0, w, 0.8, f"decoder layer × {num_layers}", KEPT, "layers"),
                  Box(x, 4.5, w, 0.8, f"norm -> f'[{_step(j)}]", DRAFT, "norm"),
                  Box(x, 6.0, w, 0.8, "teacher's head", SHARED, "head"),
                  Box(x + w / 4, 7.5, w / 2, 0.8, f"x[{_step(j + 1)}]", ACCEPTED, "token")]
        arrows += [Arrow(_top(column[0]), (x + w / 4, 1.5)), Arrow(_top(column[1]), (x + 3 * w / 4, 1.5))]
        arrows += [Arrow(_top(a), _bottom(b)) for a, b in zip(column[2:], column[3:])]
        if j:  # the previous step's predicted feature, fed back
            prev_norm = boxes[-3]
            arrows.append(Arrow((prev_norm.x + w, prev_norm.y + 0.4), (x, 0.4), 1.2, ":"))
        boxes += column
    notes = [(0, -0.8, "step 1 reads the teacher's feature (free: the verification pass computes it); "
                       "later steps feed back the draft's own prediction")]
    return Layout(boxes, arrows, notes)


def _ink(colour: str) -> str:
    """Black or white text, whichever reads better on ``colour`` (#rrggbb)."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


def draw(layout: Layout, title: str = "", width: float = 10.0):
    """Draw a layout: rounded boxes with their labels, arrows (dotted: copies, feed-backs), notes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    xs = [v for b in layout.boxes for v in (b.x, b.x + b.w)] + [x + 0.18 * len(t.split("\n")[0]) for x, _, t in layout.notes]
    ys = [v for b in layout.boxes for v in (b.y, b.y + b.h)] + [y for _, y, _ in layout.notes]
    (x0, x1), (y0, y1) = (min(xs) - 0.3, max(xs) + 0.3), (min(ys) - 0.6, max(ys) + 0.6)
    fig, ax = plt.subplots(figsize=(width, max(1.5, round(width * (y1 - y0) / (x1 - x0), 1))))  # whole pixels
    for b in layout.boxes:
        ax.add_patch(FancyBboxPatch((b.x, b.y), b.w, b.h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor=b.colour, edgecolor="#444444", linewidth=0.7))
        ax.text(b.x + b.w / 2, b.y + b.h / 2, b.label, ha="center", va="center", fontsize=8, color=_ink(b.colour))
    for a in layout.arrows:
        ax.add_patch(FancyArrowPatch(a.start, a.end, arrowstyle="-|>" if a.head else "-", mutation_scale=9,
                                     linewidth=a.width, linestyle=a.style, color="#555555", shrinkA=1, shrinkB=1))
    for x, y, text in layout.notes:
        ax.text(x, y, text, ha="left", va="center", fontsize=8.5, color="#222222")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def draw_draft_architecture(num_layers: int, layers: Sequence[int], fusion_after: Sequence[int] = ()):
    """The layer-sampled draft: which teacher layers it keeps, where its fusion blocks sit, what it shares."""
    return draw(architecture_layout(num_layers, layers, fusion_after),
                f"a draft of {len(layers)} of the teacher's {num_layers} layers", width=11)


def draw_round(proposals: Sequence[str], n_accepted: int, next_token: str):
    """One speculative round (see :func:`round_layout`)."""
    return draw(round_layout(proposals, n_accepted, next_token), "one speculative round", width=9)


def draw_cross_attention(weights: Sequence[Sequence[float]], mask: Sequence[bool] | None = None):
    """Gated cross-attention of draft positions over a memory (see :func:`cross_attention_layout`)."""
    return draw(cross_attention_layout(weights, mask), "gated cross-attention over a memory", width=10)


def draw_feature_draft(num_layers: int = 1, steps: int = 2):
    """The feature-fed draft drafting ``steps`` tokens (see :func:`feature_draft_layout`)."""
    return draw(feature_draft_layout(num_layers, steps), "the feature-fed (EAGLE) draft, drafting", width=10)
