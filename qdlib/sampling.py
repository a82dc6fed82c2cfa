"""Layer sampling: which of the teacher's decoder layers a draft keeps (notebook 01).

    >>> sample_layers(28, 6)
    [0, 5, 11, 16, 22, 27]
    >>> sample_layers(28, 7)
    [0, 5, 9, 14, 18, 23, 27]
    >>> sample_layers(28, 6, "geometric")
    [0, 2, 5, 10, 17, 27]
    >>> sample_layers(28, 6, "logarithmic")
    [0, 12, 18, 22, 25, 27]

Every strategy returns ``k`` distinct, sorted indices that include the first
(0) and the last (``num_layers - 1``) layer: the first layer turns embeddings
into contextual states every later layer expects, and the last one produces
the states the output head was trained on.

``layer_importance`` measures, on a few calibration texts, how much the
teacher's prediction changes when one layer is skipped; ``"importance"``
sampling keeps the layers that matter most.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import divergence
from .errors import ConfigError
from .settings.names import STRATEGIES

GEOMETRIC_RATIO = 1.5  # each gap 1.5x the previous one
LOG_BASE = 10.0  # logarithmic positions follow log10(1 + 9 t)


def _check(num_layers: int, k: int) -> None:
    if not isinstance(num_layers, int) or num_layers < 2:
        raise ConfigError(f"num_layers must be an integer >= 2, got {num_layers!r}")
    if not isinstance(k, int) or k < 2:
        raise ConfigError(f"k must be an integer >= 2 (the first and last layer are always kept), got {k!r}")
    if k > num_layers:
        raise ConfigError(f"k={k} is more than the teacher's {num_layers} layers; allowed: 2 <= k <= {num_layers}")


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _distinct(positions: Sequence[float], num_layers: int) -> list[int]:
    """Round real positions and push collisions apart so all k indices differ.

    A forward pass makes the indices strictly increasing; a backward pass pulls
    any that ran past the end back down. First and last stay 0 and L-1.
    """
    k = len(positions)
    idx = [_round_half_up(p) for p in positions]
    idx[0], idx[-1] = 0, num_layers - 1
    for i in range(1, k):
        idx[i] = max(idx[i], idx[i - 1] + 1)
    idx[-1] = num_layers - 1
    for i in range(k - 2, -1, -1):
        idx[i] = min(idx[i], idx[i + 1] - 1)
    return idx


def uniform_positions(num_layers: int, k: int) -> list[float]:
    """Evenly spaced: position_i = i * (L - 1) / (k - 1)."""
    return [i * (num_layers - 1) / (k - 1) for i in range(k)]


def geometric_positions(num_layers: int, k: int, ratio: float = GEOMETRIC_RATIO) -> list[float]:
    """Gaps that grow by ``ratio``: position_i = (L-1) (r^i - 1) / (r^(k-1) - 1).

    Crowds towards the **input** end: the kept layers are close together at
    the start and far apart near the output. Early layers build the token and
    context features every later layer relies on, and the logit lens shows the
    prediction changing fastest there, so someone who thinks the draft's
    errors come from a poor early representation would pick this.
    """
    return [(num_layers - 1) * (ratio**i - 1) / (ratio ** (k - 1) - 1) for i in range(k)]


def logarithmic_positions(num_layers: int, k: int, base: float = LOG_BASE) -> list[float]:
    """position_i = (L-1) log_b(1 + (b - 1) i / (k - 1)), b = 10.

    A concave curve, so the gaps shrink as i grows: crowds towards the
    **output** end. The last layers turn the residual stream into the
    distribution the output head reads, and layer-pruning studies find the
    middle of a deep model the most redundant; keeping the final stretch
    nearly intact keeps the draft's output distribution close to the
    teacher's.
    """
    return [(num_layers - 1) * math.log(1 + (base - 1) * i / (k - 1), base) for i in range(k)]


def sample_layers(num_layers: int, k: int, strategy: str = "uniform", *, scores: Sequence[float] | None = None) -> list[int]:
    """Return ``k`` sorted, distinct layer indices that include 0 and ``num_layers - 1``.

    Args:
        num_layers: the teacher's depth (28 for Qwen3-0.6B and the bundled teacher).
        k: how many layers the draft keeps, 2 <= k <= num_layers.
        strategy: ``"uniform"``, ``"geometric"``, ``"logarithmic"`` or ``"importance"``.
        scores: for ``"importance"``, one score per layer (higher = more important),
            e.g. from :func:`layer_importance`.

    >>> sample_layers(28, 2)
    [0, 27]
    >>> sample_layers(5, 3, "importance", scores=[9, 1, 5, 3, 9])
    [0, 2, 4]
    """
    _check(num_layers, k)
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if strategy != "importance" and scores is not None:
        raise ConfigError(f"scores are only used by the 'importance' strategy, not {strategy!r}")
    if strategy == "uniform":
        return _distinct(uniform_positions(num_layers, k), num_layers)
    if strategy == "geometric":
        return _distinct(geometric_positions(num_layers, k), num_layers)
    if strategy == "logarithmic":
        return _distinct(logarithmic_positions(num_layers, k), num_layers)
    # importance
    if scores is None:
        raise ConfigError("strategy 'importance' needs scores=[one per layer]; compute them with qdlib.layer_importance")
    scores = [float(s) for s in scores]
    if len(scores) != num_layers:
        raise ConfigError(f"importance needs {num_layers} scores (one per layer), got {len(scores)}")
    if any(math.isnan(s) for s in scores):
        raise ConfigError("importance scores contain NaN")
    middle = sorted(range(1, num_layers - 1), key=lambda i: (-scores[i], i))[: k - 2]
    return sorted([0, num_layers - 1] + middle)


def first_k_layers(num_layers: int, k: int) -> list[int]:
    """The layers of the early-exit baseline :data:`EARLY_EXIT` (as LayerSkip): ``[0, 1, ..., k-1]``.

    >>> first_k_layers(28, 3)
    [0, 1, 2]
    """
    if not 1 <= k <= num_layers:
        raise ValueError(f"k={k} must be in 1..{num_layers}")
    return list(range(k))


# --------------------------------------------------------------------------- running a subset of layers


def decoder_of(model):
    """The decoder stack (``model.model`` for a causal LM) with embed_tokens, layers, norm, rotary_emb."""
    inner = getattr(model, "model", model)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, attr):
            raise TypeError(f"{type(model).__name__} has no decoder with {attr!r}; expected a Qwen3-style causal LM")
    return inner


@torch.no_grad()
def run_layers(model, input_ids: torch.Tensor, layers: Sequence[int], *, attention_mask=None,
               return_hidden: bool = False):
    """Run a causal LM with only ``layers`` of its decoder stack, no KV cache.

    Returns logits ``(B, T, V)``; with ``return_hidden`` also the list of
    hidden states after the embeddings and after each run layer (before the
    final norm). ``run_layers(m, x, range(L))`` equals ``m(x).logits``; an
    untrained draft built from ``layers`` computes exactly ``run_layers(m, x, layers)``.
    """
    from transformers.masking_utils import create_causal_mask

    dec = decoder_of(model)
    h = dec.embed_tokens(input_ids)  # (B, T, D)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)
    mask = create_causal_mask(config=dec.config, inputs_embeds=h, attention_mask=attention_mask,
                              cache=None, position_ids=pos)
    rope = dec.rotary_emb(h, pos)
    hidden = [h]
    for i in layers:
        h = dec.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        hidden.append(h)
    logits = model.lm_head(dec.norm(h))  # (B, T, V)
    return (logits, hidden) if return_hidden else logits


@torch.no_grad()
def layer_importance(teacher, tokenizer, texts: Sequence[str], *, max_tokens: int = 256) -> list[float]:
    """How much each teacher layer matters: KL(full model || model with that layer skipped).

    For every layer the teacher is run on ``texts`` (each cut to ``max_tokens``)
    with that one layer left out, and the mean per-token KL divergence of its
    next-token distribution from the full model's is the layer's score (in
    nats; higher = more important). Costs one forward pass per layer.
    """
    if not texts:
        raise ConfigError("layer_importance needs at least one calibration text")
    L = teacher.config.num_hidden_layers
    device = next(teacher.parameters()).device
    batches = [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens).input_ids.to(device)
               for t in texts]
    full = [torch.log_softmax(run_layers(teacher, x, range(L)).float(), -1) for x in batches]
    scores = []
    for skip in range(L):
        keep = [i for i in range(L) if i != skip]
        kl, n = 0.0, 0
        for x, lp in zip(batches, full):
            lq = torch.log_softmax(run_layers(teacher, x, keep).float(), -1)
            kl += divergence.kl(lp, lq).sum().item()
            n += x.shape[1]
        scores.append(kl / n)
    return scores
