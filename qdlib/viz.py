"""Plots and widgets shared by the notebooks; each widget is backed by a tested function.

    >>> layer_strip(8, [0, 3, 7])
    '■□□■□□□■'

Plots return the matplotlib ``Figure`` (one final figure, no live redraws).
"""

from __future__ import annotations

from typing import Sequence

from .metrics import expected_speedup, expected_tokens_per_call, strategy_layers
from .sampling import EARLY_EXIT

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


def layer_explorer(num_layers: int = 28, scores=None):
    """An ipywidgets explorer (strategy, k) that shows :func:`describe_sampling`."""
    import ipywidgets as w

    strategies = ["uniform", "geometric", "logarithmic", EARLY_EXIT] + (["importance"] if scores is not None else [])
    out = w.Output()
    strat = w.Dropdown(options=strategies, value="uniform", description="strategy")
    k = w.IntSlider(value=6, min=2, max=num_layers, description="k")

    def show(*_):
        out.clear_output(wait=True)
        with out:
            print(describe_sampling(num_layers, k.value, strat.value, scores))

    strat.observe(show, "value")
    k.observe(show, "value")
    show()
    return w.VBox([w.HBox([strat, k]), out])


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


def speedup_explorer(alpha: float = 0.8, c: float = 0.15, gamma: int = 4, verify_cost: float = 1.1):
    """Sliders for alpha, c, gamma and the verification cost that show :func:`describe_speedup`."""
    import ipywidgets as w

    out = w.HTML()
    sliders = {"alpha": w.FloatSlider(value=alpha, min=0.05, max=0.95, step=0.05, description="alpha"),
               "c": w.FloatSlider(value=c, min=0.02, max=1.0, step=0.02, description="c"),
               "gamma": w.IntSlider(value=gamma, min=1, max=12, description="gamma"),
               "verify_cost": w.FloatSlider(value=verify_cost, min=1.0, max=2.0, step=0.05, description="verify")}

    def show(*_):
        out.value = f"<pre>{describe_speedup(**{k: s.value for k, s in sliders.items()})}</pre>"

    for s in sliders.values():
        s.observe(show, "value")
    show()
    return w.VBox([w.HBox(list(sliders.values())[:2]), w.HBox(list(sliders.values())[2:]), out])
