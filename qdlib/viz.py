"""Plots and widgets shared by the notebooks; each widget is backed by a tested function.

    >>> layer_strip(8, [0, 3, 7])
    '■□□■□□□■'

Plots return the matplotlib ``Figure``. Each explorer redraws a picture as its controls move, and stores a
snapshot of its starting state next to the live widget (:func:`snapshot_box`), so a notebook opened without
running it shows that picture rather than a widget's text repr.
"""

from __future__ import annotations

from typing import Sequence

from .metrics import expected_speedup, expected_tokens_per_call, strategy_layers
from .settings.names import EARLY_EXIT

KEPT, DROPPED = "■", "□"


def layer_strip(num_layers: int, layers: Sequence[int]) -> str:
    """One character per teacher layer: ■ kept, □ dropped."""
    keep = set(layers)
    return "".join(KEPT if i in keep else DROPPED for i in range(num_layers))


def describe_sampling(num_layers: int, k: int, strategy: str, scores=None) -> str:
    """The text the layer explorer shows: the strip and the kept indices, or the error."""
    try:
        layers = strategy_layers(num_layers, k, strategy, scores)
    except ValueError as exc:
        return f"error: {exc}"
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    return f"{strategy:>11} k={k:<2} {layer_strip(num_layers, layers)}  {layers}  gaps {gaps}"


def snapshot_box(children, snapshot: dict, text: str):
    """A ``VBox`` of ``children`` that also stores ``snapshot`` (e.g. ``{"image/png": ...}``) and ``text``.

    A notebook frontend that can run widgets shows the live controls; one that cannot (a notebook opened
    without running it, where JupyterLab renders only safe output types, or a static viewer) shows the
    snapshot of the widget's starting state instead of a ``VBox(children=(...`` repr.
    """
    import ipywidgets as w

    class _SnapshotBox(w.VBox):
        def _repr_mimebundle_(self, **kwargs):
            data = super()._repr_mimebundle_(**kwargs)
            data.update(self.snapshot)
            data["text/plain"] = self.snapshot_text
            return data

    box = _SnapshotBox(children)
    box.snapshot, box.snapshot_text = dict(snapshot), text
    return box


def png_bytes(fig, close: bool = True) -> bytes:
    """The figure as PNG bytes (closed afterwards by default, so the inline backend does not show it again)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return buf.getvalue()


def _png_snapshot(png: bytes) -> dict:
    import base64

    return {"image/png": base64.b64encode(png).decode("ascii")}


LIVE_NOTE = "(run the notebook to move the controls; this is the starting state)"


def layer_explorer(num_layers: int = 28, scores=None, k: int = 6, strategy: str = "uniform"):
    """An ipywidgets explorer (strategy, k) that draws the kept layers and shows :func:`describe_sampling`."""
    import ipywidgets as w


    strategies = ["uniform", "geometric", "logarithmic", EARLY_EXIT] + (["importance"] if scores is not None else [])
    strat = w.Dropdown(options=strategies, value=strategy, description="strategy")
    k_slider = w.IntSlider(value=k, min=2, max=num_layers, description="k")
    picture, text = w.Image(format="png"), w.HTML()

    def show(*_):
        line = describe_sampling(num_layers, k_slider.value, strat.value, scores)
        text.value = f"<pre>{line}</pre>"
        if not line.startswith("error:"):
            layers = strategy_layers(num_layers, k_slider.value, strat.value, scores)
            picture.value = png_bytes(plot_strips(num_layers, {f"{strat.value}, k={k_slider.value}": layers}))

    strat.observe(show, "value")
    k_slider.observe(show, "value")
    show()
    return snapshot_box([w.HBox([strat, k_slider]), picture, text], _png_snapshot(picture.value),
                         f"layer explorer {LIVE_NOTE}: {describe_sampling(num_layers, k, strategy, scores)}")


def plot_strips(num_layers: int, rows: dict[str, Sequence[int]], title: str = ""):
    """Draw one strip of ``num_layers`` cells per named layer list (kept cells filled)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 0.9))
    for r, (name, layers) in enumerate(rows.items()):
        y = len(rows) - 1 - r
        for i in range(num_layers):
            ax.add_patch(Rectangle((i, y + 0.1), 0.9, 0.8, facecolor="tab:blue" if i in layers else "#eeeeee",
                                   edgecolor="white"))
        ax.text(-0.5, y + 0.5, name, ha="right", va="center")
    ax.set_xlim(-0.2, num_layers)
    ax.set_ylim(0, len(rows))
    ax.set_yticks([])
    ax.set_xticks(range(0, num_layers, 3))
    ax.set_xlabel("teacher layer index")
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_per_layer(values: dict[str, Sequence[float]], ylabel: dict[str, str] | None = None, title: str = ""):
    """One panel per named per-layer series (e.g. cosine similarity, logit-lens KL)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(5 * len(values), 3.2))
    axes = [axes] if len(values) == 1 else list(axes)
    for ax, (name, ys) in zip(axes, values.items()):
        ax.plot(range(len(ys)), ys, "o-", ms=3)
        ax.set_xlabel("teacher layer")
        ax.set_ylabel((ylabel or {}).get(name, name))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_bars(labels: Sequence[str], series: dict[str, Sequence[float]], ylabel: str = "", title: str = ""):
    """Grouped bar chart: one group per label, one bar per series."""
    import matplotlib.pyplot as plt

    n = len(series)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) * n), 3.5))
    for j, (name, ys) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=0)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if n > 1:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_verify_split(split: dict[str, dict], title: str = ""):
    """Where a verification pass's cost goes (:func:`qdlib.timing.verify_split`, one entry per forward): for each
    forward, a stacked bar per g of v(g) = 1 (one step) + arithmetic + overhead, in teacher steps of that forward,
    with the step's milliseconds in the legend. A negative part (noise, or a part that shrinks) is drawn below 1."""
    import matplotlib.pyplot as plt

    engines = list(split)
    fig, axes = plt.subplots(1, len(engines), figsize=(4.6 * len(engines), 3.6), sharey=True, squeeze=False)
    for ax, engine in zip(axes[0], engines):
        sp = split[engine]
        gs = [r["gamma"] for r in sp["rows"]]
        xs = list(range(len(gs)))
        ar = [r["v_arithmetic"] for r in sp["rows"]]
        ov = [r["v_overhead"] for r in sp["rows"]]
        ax.bar(xs, [1.0] * len(xs), color="#bbbbbb", label=f"one step ({sp['step_ms']:.1f} ms)")
        ax.bar(xs, ar, bottom=[1.0] * len(xs), color="#4c72b0", label="+ arithmetic (matmuls)")
        ax.bar(xs, ov, bottom=[1.0 + a for a in ar], color="#dd8452", label="+ overhead (everything else)")
        ax.plot(xs, [r["v"] for r in sp["rows"]], "k.", label="measured v(g)")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(g) for g in gs])
        ax.set_xlabel("g: draft tokens verified (the pass scores g + 1)")
        ax.set_title(engine)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("v(g), in teacher steps")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


TRACE_COLOURS = {"accepted": "#c8f7c5", "rejected": "#f7c5c5", "correction": "#c5d8f7", "bonus": "#f7e9a8"}


def trace_tokens(trace) -> list[tuple[int, str]]:
    """Flatten a speculative trace into ``(token_id, kind)`` pairs in reading order.

    kind is ``"accepted"`` (a draft token the target kept), ``"rejected"`` (a
    draft token the target threw away; not part of the output), ``"correction"``
    (the target's token after a rejection) or ``"bonus"`` (the target's extra
    token after all proposals were accepted).

    >>> trace_tokens([([5, 6, 7], 1, 9), ([3], 1, 4), ([8], 1, None)])
    [(5, 'accepted'), (6, 'rejected'), (7, 'rejected'), (9, 'correction'), (3, 'accepted'), (4, 'bonus'), (8, 'accepted')]
    """
    out = []
    for proposals, n, nxt in trace:
        out += [(t, "accepted") for t in proposals[:n]]
        out += [(t, "rejected") for t in proposals[n:]]
        if nxt is not None:  # None: the round was cut short by end-of-text or the token budget
            out.append((nxt, "bonus" if n == len(proposals) else "correction"))
    return out


def render_trace_html(tokenizer, trace) -> str:
    """HTML for a speculative generation: accepted, rejected, correction and bonus tokens coloured."""
    import html

    spans = []
    for tok, kind in trace_tokens(trace):
        text = html.escape(tokenizer.decode([tok])).replace("\n", "↵<br>")
        style = f"background:{TRACE_COLOURS[kind]}" + (";text-decoration:line-through" if kind == "rejected" else "")
        spans.append(f'<span title="{kind}" style="{style}">{text}</span>')
    legend = " ".join(f'<span style="background:{c}">{k}</span>' for k, c in TRACE_COLOURS.items())
    return (f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">{"".join(spans)}</div>'
            f'<div style="font-size:small">{legend}</div>')


ANSI = {"accepted": "\033[42;30m", "rejected": "\033[41;30m\033[9m", "correction": "\033[44;37m", "bonus": "\033[43;30m"}


def render_trace_ansi(tokenizer, trace, show_rejected: bool = True) -> str:
    """The same view for a terminal, with ANSI colours."""
    parts = []
    for tok, kind in trace_tokens(trace):
        if kind == "rejected" and not show_rejected:
            continue
        parts.append(f"{ANSI[kind]}{tokenizer.decode([tok])}\033[0m")
    return "".join(parts)


def describe_speedup(alpha: float, c: float, gamma: int, verify_cost: float = 1.0) -> str:
    """Tokens per target call and the predicted speed-up for one setting (notebook 06).

    >>> describe_speedup(0.8, 0.1, 4)
    'alpha 0.80, c 0.10, gamma 4, verify 1.00: 3.36 tokens/call, predicted speed-up 2.40x'
    """
    return (f"alpha {alpha:.2f}, c {c:.2f}, gamma {gamma}, verify {verify_cost:.2f}: "
            f"{expected_tokens_per_call(alpha, gamma):.2f} tokens/call, "
            f"predicted speed-up {expected_speedup(alpha, gamma, c, verify_cost):.2f}x")


def plot_speedup(alpha: float, c: float, gamma: int, verify_cost: float = 1.0, max_gamma: int = 16):
    """Predicted speed-up over plain decoding against gamma, for one alpha, c and verification cost.

    The chosen ``gamma`` is marked; the dotted line is 1x (no gain). Returns the figure.
    """
    import matplotlib.pyplot as plt


    gammas = list(range(1, max(max_gamma, gamma) + 1))
    ys = [expected_speedup(alpha, g, c, verify_cost) for g in gammas]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(gammas, ys, "o-", ms=3, color="tab:blue", label="predicted speed-up")
    ax.plot([gamma], [expected_speedup(alpha, gamma, c, verify_cost)], "o", ms=9, color="tab:orange",
            label=f"gamma = {gamma}")
    ax.axhline(1.0, ls=":", color="grey")
    ax.set_xlabel("gamma (draft tokens per round)")
    ax.set_ylabel("speed-up over plain decoding")
    ax.set_ylim(0, max(2.0, max(ys) * 1.15))
    ax.set_title(f"alpha {alpha:.2f}, c {c:.2f}, verify {verify_cost:.2f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def speedup_explorer(alpha: float = 0.8, c: float = 0.15, gamma: int = 4, verify_cost: float = 1.1):
    """Sliders for alpha, c, gamma and the verification cost that redraw :func:`plot_speedup`.

    The sliders start at exactly the values given and show them as :func:`describe_speedup` prints them
    (two decimals); pass values rounded to two decimals so a slider never snaps away from its start.
    """
    import ipywidgets as w

    start = {"alpha": alpha, "c": c, "gamma": gamma, "verify_cost": verify_cost}
    sliders = {"alpha": w.FloatSlider(min=0.0, max=0.99, step=0.01, readout_format=".2f", description="alpha"),
               "c": w.FloatSlider(min=0.0, max=1.0, step=0.01, readout_format=".2f", description="c"),
               "gamma": w.IntSlider(min=1, max=16, description="gamma"),
               "verify_cost": w.FloatSlider(min=1.0, max=2.0, step=0.01, readout_format=".2f", description="verify")}
    for name, s in sliders.items():
        if not s.min <= start[name] <= s.max:  # a slider would silently clamp it
            raise ValueError(f"speedup_explorer: {name}={start[name]!r} is outside [{s.min}, {s.max}]")
        s.value = start[name]
    picture, out = w.Image(format="png"), w.HTML()

    def show(*_):
        values = {k: s.value for k, s in sliders.items()}
        picture.value = png_bytes(plot_speedup(**values))
        out.value = f"<pre>{describe_speedup(**values)}</pre>"

    for s in sliders.values():
        s.observe(show, "value")
    show()
    return snapshot_box([w.HBox(list(sliders.values())[:2]), w.HBox(list(sliders.values())[2:]), picture, out],
                         _png_snapshot(picture.value),
                         f"speed-up explorer {LIVE_NOTE}: {describe_speedup(alpha, c, gamma, verify_cost)}")
