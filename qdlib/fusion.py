"""Cross-attention to a knowledge cache, mixed in through a gate (notebook 03).

Pure ``nn.Module`` code, no I/O. A draft layer's hidden states (queries)
attend to the teacher states stored in a knowledge cache (keys and values);
a learned tanh gate, initialised at 0, adds the result to the residual stream:

    h <- h + tanh(g) * CrossAttn(RMSNorm(h), cache)

At initialisation ``tanh(0) = 0``, so a draft with fusion computes exactly
what the plain draft computes (Flamingo's gated cross-attention starts the
same way).

The memory is a static knowledge cache (one for every row), or a live memory
(one per sequence: the teacher's states of that sequence's verified text,
:mod:`qdlib.memories`). A live memory is read through a per-query mask,
:func:`lag_mask`: the query at position p reads the states of positions
``<= p - lag`` only, as drafting does (lag 1 at the first proposal of a round,
j at depth j).

    >>> import torch
    >>> fuse = GatedFusion(hidden_size=8, memory_size=6, cache_dim=8, num_heads=2)
    >>> h = torch.randn(1, 3, 8)
    >>> memory = fuse.attn.project_memory(torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool))
    >>> torch.equal(fuse(h, memory), h)
    True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .settings.names import GATES


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 as Qwen3 does.

    qdlib's one RMSNorm: the fusion layers use it, and the draft puts it in place of every
    ``Qwen3RMSNorm`` of its decoder layers (same weight, same formula, one fused operator on float32).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused operator
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Memory(NamedTuple):
    """Projected keys and values of a memory, ready to be attended to.

    A static knowledge cache is one memory shared by every row (``1`` below); a live memory has one row per
    sequence (``B``), each holding the teacher's states of that sequence's text.
    """

    keys: torch.Tensor  # (1 or B, H, M, hd): all items' tokens, flattened into one memory of M slots
    values: torch.Tensor  # (1 or B, H, M, hd)
    mask: torch.Tensor | None  # (1, 1, 1, M) bool, True where a slot holds a real token; None: every slot does


class KnowledgeCrossAttention(nn.Module):
    """Multi-head cross-attention from draft states to cached teacher states.

    Queries come from the draft's hidden states (width ``hidden_size``); keys
    and values from the cache (width ``memory_size``), both projected to
    ``cache_dim`` split over ``num_heads`` heads. Queries and keys get a
    per-head RMSNorm, as Qwen3's q/k-norm; padding slots are masked out.
    """

    def __init__(self, hidden_size: int, memory_size: int, cache_dim: int, num_heads: int, eps: float = 1e-6,
                 recency: bool = False):
        super().__init__()
        if cache_dim % num_heads:
            raise ValueError(f"cache_dim={cache_dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = cache_dim // num_heads
        self.q_proj = nn.Linear(hidden_size, cache_dim, bias=False)
        self.k_proj = nn.Linear(memory_size, cache_dim, bias=False)
        self.v_proj = nn.Linear(memory_size, cache_dim, bias=False)
        self.o_proj = nn.Linear(cache_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        # A live memory's slot s is the text's position s, but its keys carry no position: alone they cannot tell
        # the newest state from one a thousand tokens back. A learned recency bias per head (ALiBi's form, the slopes
        # learned from a geometric start) lets a head find the newest states: score - slope_h * (p - s).
        self.log_slope = nn.Parameter(recency_log_slopes(num_heads)) if recency else None

    def project_memory(self, states: torch.Tensor, mask: torch.Tensor) -> Memory:
        """Project cached states ``(N, M_i, memory_size)`` with mask ``(N, M_i)`` once.

        All N items are flattened into one memory of ``N * M_i`` slots, so a
        query can attend across items.
        """
        N, Mi, _ = states.shape
        kv_in = states.reshape(1, N * Mi, -1).to(self.k_proj.weight.dtype)  # (1, M, Dm)
        k = self.k_proj(kv_in).view(1, N * Mi, self.num_heads, self.head_dim)  # (1, M, H, hd)
        v = self.v_proj(kv_in).view(1, N * Mi, self.num_heads, self.head_dim)  # (1, M, H, hd)
        k = self.k_norm(k).transpose(1, 2)  # (1, H, M, hd)
        v = v.transpose(1, 2)  # (1, H, M, hd)
        return Memory(k, v, mask.reshape(1, 1, 1, N * Mi).bool())

    def project_states(self, states: torch.Tensor) -> Memory:
        """Project one memory per sequence, ``(B, M, memory_size)`` (a live memory: no padding, no mask)."""
        B, M, _ = states.shape
        kv_in = states.to(self.k_proj.weight.dtype)  # (B, M, Dm)
        k = self.k_proj(kv_in).view(B, M, self.num_heads, self.head_dim)  # (B, M, H, hd)
        v = self.v_proj(kv_in).view(B, M, self.num_heads, self.head_dim)  # (B, M, H, hd)
        return Memory(self.k_norm(k).transpose(1, 2), v.transpose(1, 2), None)  # (B, H, M, hd) each

    def forward(self, h: torch.Tensor, memory: Memory, mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, return_weights: bool = False):
        """Attend from ``h`` ``(B, T, D)`` to ``memory``; ``mask`` ``(B, T, M)`` (optional) says which slots each
        query may read (:func:`lag_mask`). A query that may read no slot gets an update of exactly 0.
        ``positions`` ``(B or 1, T)``: the queries' positions in the text, which a recency bias needs (slot ``s``
        of a live memory is position ``s``)."""
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, hd)
        q = self.q_norm(q).transpose(1, 2)  # (B, H, T, hd)
        k = memory.keys.expand(B, -1, -1, -1)  # (B, H, M, hd)
        v = memory.values.expand(B, -1, -1, -1)  # (B, H, M, hd)
        allowed, seen = memory.mask, None
        if mask is not None:
            seen = mask.any(-1)  # (B, T): rows with at least one readable slot
            rows = mask | ~seen[..., None]  # (B, T, M): an empty row reads everything, and its result is zeroed below
            allowed = rows[:, None] if allowed is None else allowed & rows[:, None]  # (B, 1, T, M)
        bias = None
        if self.log_slope is not None:
            if positions is None:
                raise ValueError("this cross-attention has a recency bias: pass positions= (the queries' positions)")
            bias = recency_bias(self.log_slope, positions, k.shape[2]).to(q.dtype)  # (B or 1, H, T, M)
            if allowed is not None:
                bias = bias.masked_fill(~allowed, float("-inf"))
        if return_weights:
            scores = q @ k.transpose(-1, -2) / self.head_dim**0.5  # (B, H, T, M)
            if bias is not None:
                scores = scores + bias
            weights = scores.softmax(-1) if allowed is None else masked_softmax(scores, allowed)  # (B, H, T, M)
            out = weights @ v  # (B, H, T, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed if bias is None else bias)  # (B, H, T, hd)
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)
        if seen is not None:
            out = torch.where(seen[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))  # (B, T, D)
            if return_weights:
                weights = weights * seen[:, None, :, None]
        return (out, weights) if return_weights else out


class GatedFusion(nn.Module):
    """``h + tanh(gate) * cross_attn(norm(h), memory)`` with the gate starting at exactly 0.

    ``gate="channel"`` learns one gate per hidden channel, ``"scalar"`` one in all. ``gate_init`` sets
    tanh(gate) at the start instead: at 0 (the default) only the gate receives gradient (notebook 03); a small
    value such as 0.1 lets the cross-attention learn from the first step, at the price of no longer starting as
    exactly the plain draft.

    >>> f = GatedFusion(8, 6, 8, 2, gate_init=0.1)
    >>> round(torch.tanh(f.gate[0]).item(), 6)
    0.1
    """

    def __init__(self, hidden_size: int, memory_size: int, cache_dim: int, num_heads: int,
                 gate: str = "channel", eps: float = 1e-6, *, gate_init: float = 0.0, recency: bool = False):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown fusion_gate {gate!r}; allowed: {', '.join(GATES)}")
        if not 0.0 <= gate_init < 1.0:
            raise ValueError(f"gate_init={gate_init} must be in [0, 1) (it is tanh of the gate)")
        self.norm = RMSNorm(hidden_size, eps)
        self.attn = KnowledgeCrossAttention(hidden_size, memory_size, cache_dim, num_heads, eps, recency)
        self.gate_init = gate_init
        self.gate = nn.Parameter(torch.zeros(hidden_size if gate == "channel" else 1))
        self.reset_gate()

    @torch.no_grad()
    def reset_gate(self) -> None:
        self.gate.fill_(math.atanh(self.gate_init))

    def forward(self, h: torch.Tensor, memory: Memory, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return gated_residual(h, self.attn(self.norm(h), memory, mask, positions=positions), self.gate)  # (B, T, D)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``mask`` is True; masked entries get weight exactly 0.

    >>> masked_softmax(torch.tensor([1.0, 5.0, 1.0]), torch.tensor([True, False, True])).tolist()
    [0.5, 0.0, 0.5]
    """
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def recency_log_slopes(num_heads: int) -> torch.Tensor:
    """Where a learned recency bias starts: slopes ``2**(-8 h / H)`` for heads ``h = 0..H-1``, ALiBi's geometric
    sequence (Press et al., 2022) shifted so that head 0 starts at slope 1 and favours the newest state strongly.

    >>> recency_log_slopes(2).exp().tolist()
    [1.0, 0.0625]
    """
    return -(torch.arange(num_heads, dtype=torch.float32) * 8 / num_heads) * math.log(2)


def recency_bias(log_slope: torch.Tensor, positions: torch.Tensor, slots: int) -> torch.Tensor:
    """``-slope_h * (p - s)`` for a query at position ``p`` and the memory slot (position) ``s``: ``(B, H, T, slots)``
    from ``positions`` ``(B, T)`` or ``(T,)``. The newest slot a query may read gets the largest score.

    >>> recency_bias(torch.zeros(1), torch.tensor([2]), 3)[0, 0, 0].tolist()
    [-2.0, -1.0, -0.0]
    """
    pos = positions if positions.dim() == 2 else positions[None]  # (B, T)
    dist = (pos[..., None] - torch.arange(slots, device=pos.device)).float()  # (B, T, slots)
    return -log_slope.float().exp()[None, :, None, None] * dist[:, None]  # (B, H, T, slots)


def gated_residual(h: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``h + tanh(gate) * update``: exactly ``h`` while the gate is 0 (notebook 03)."""
    return h + torch.tanh(gate).to(h.dtype) * update


def lag_mask(positions: torch.Tensor, lags: torch.Tensor | int, slots: int) -> torch.Tensor:
    """Which memory slots each query may read: slot ``s`` (the teacher's state of position ``s``) is visible to the
    query at position ``p`` iff ``s <= p - lag``. ``positions`` ``(T,)`` or ``(B, T)``, ``lags`` an int or ``(B, T)``;
    returns ``(B, T, slots)`` bool.

    Drafting reads the verified text with lag 1 at the first proposal and lag j at depth j; training draws each
    position's lag in 1..gamma so the draft learns every depth (:mod:`qdlib.memories`). Lag 0 would read the state
    the teacher's own prediction of the next token comes from.

    >>> lag_mask(torch.arange(4), 1, 3)[0].int().tolist()
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    >>> lag_mask(torch.arange(4), torch.tensor([[1, 1, 3, 2]]), 3)[0].int().tolist()
    [[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]]
    """
    pos = positions if positions.dim() == 2 else positions[None]  # (B or 1, T)
    lags = torch.as_tensor(lags, device=pos.device)
    last = pos - lags  # (B, T): the newest slot each query may read
    return torch.arange(slots, device=pos.device) <= last[..., None]  # (B, T, slots)
