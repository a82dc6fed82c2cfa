"""Token trees: several candidate continuations verified in one target pass (SpecInfer, EAGLE-2), notebook 07.

A tree is two lists: ``tokens[i]`` and ``parents[i]`` (the index of node ``i``'s parent, ``-1`` for a child of the
root; a parent always comes before its children). The root is the last verified token, which the target scores
anyway. A chain of ``g`` proposals is the tree with ``parents = [-1, 0, 1, ..., g - 2]``.

The target reads the root and every node in one pass. Node ``i`` sits at position ``prefix + depth(i)`` and may
attend to the cached prefix, the root, its ancestors and itself: :func:`tree_mask` builds that mask (row and
column 0 are the root). Then :func:`accept_tree` walks down from the root, keeping the longest path the target
agrees with.

    >>> tokens, parents = [7, 8, 9, 4], [-1, -1, 0, 2]      # root -> 7 -> 9 -> 4, and root -> 8
    >>> tree_depths(parents)
    [1, 1, 2, 3]
    >>> tree_mask(parents).int().tolist()
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    >>> logits = torch.full((5, 10), -9.0)
    >>> for row, tok in enumerate([8, 0, 5, 0, 0]): logits[row, tok] = 9.0   # the target's argmax after each node
    >>> accept_tree(tokens, parents, logits, Settings())    # root -> 8 kept (node 1), then the target says 5
    ([1], 5)

Greedy acceptance keeps a path only where every token equals the target's argmax, so the output is the target's
greedy output whatever the tree. Sampling uses SpecInfer's multi-candidate rule for candidates chosen without the
target (here with point-mass proposals): the children of a node are tried in order, child ``x`` is kept with
probability ``p(x)``, and after each rejection ``p`` loses ``x`` and is renormalised; when every child is rejected
the next token is drawn from what is left of ``p``. Each step outputs ``x`` with probability exactly ``p(x)``, so
the output follows the target's distribution (``tests/test_trees.py`` tests it, and breaks it on purpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoding import Settings


def check_tree(tokens: list[int], parents: list[int]) -> None:
    """Raise ValueError unless ``parents`` describes a tree over ``tokens`` (parents first, siblings distinct)."""
    if len(tokens) != len(parents):
        raise ValueError(f"a tree needs one parent per token: {len(tokens)} tokens, {len(parents)} parents")
    seen = set()
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i} has parent {p}: a parent must be -1 (the root) or an earlier node")
        if (p, tokens[i]) in seen:
            raise ValueError(f"node {i} repeats token {tokens[i]} under parent {p}: siblings must differ")
        seen.add((p, tokens[i]))


def chain_parents(n: int) -> list[int]:
    """The parents of a chain of ``n`` proposals: ``[-1, 0, 1, ..., n - 2]``."""
    return list(range(-1, n - 1))


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of each node (a child of the root has depth 1)."""
    depths = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def tree_mask(parents: list[int], device=None) -> torch.Tensor:
    """``(N + 1, N + 1)`` bool: row ``r`` may attend to column ``c`` (index 0 is the root, node ``i`` is ``i + 1``)."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i + 1] = mask[p + 1]
        mask[i + 1, i + 1] = True
    return mask.to(device) if device is not None else mask


def children_of(parents: list[int]) -> dict[int, list[int]]:
    """Node -> its children in order (``-1`` for the root)."""
    kids: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
        kids.setdefault(i, [])
    return kids


def merge_chain(tokens: list[int], parents: list[int], chain: list[int], limit: int | None = None):
    """Add ``chain`` (a continuation of the root) to the tree, sharing the nodes it already has.

    Returns new ``(tokens, parents)``; at most ``limit`` new nodes are added (None: no limit).

    >>> merge_chain([7, 9], [-1, 0], [7, 3, 3])
    ([7, 9, 3, 3], [-1, 0, 0, 2])
    """
    tokens, parents = list(tokens), list(parents)
    kids = children_of(parents)
    cur, added = -1, 0
    for tok in chain:
        nxt = next((c for c in kids[cur] if tokens[c] == tok), None)
        if nxt is None:
            if limit is not None and added >= limit:
                break
            tokens.append(int(tok))
            parents.append(cur)
            nxt = len(tokens) - 1
            kids[cur].append(nxt)
            kids[nxt] = []
            added += 1
        cur = nxt
    return tokens, parents


def path_to(parents: list[int], node: int) -> list[int]:
    """The nodes from the root's child down to ``node`` (inclusive)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def accept_tree(tokens: list[int], parents: list[int], target_logits: torch.Tensor, s: Settings):
    """``(accepted path as node indices, the target's next token)``.

    ``target_logits`` ``(N + 1, V)``: row 0 follows the root, row ``i + 1`` follows node ``i``.
    """
    kids = children_of(parents)
    if s.greedy:
        top = target_logits.argmax(-1).tolist()
        path, cur = [], -1
        while True:
            want = top[cur + 1]
            nxt = next((c for c in kids[cur] if tokens[c] == want), None)
            if nxt is None:
                return path, want
            path.append(nxt)
            cur = nxt
    path, cur = [], -1
    while True:
        p = s.dist(target_logits[cur + 1]).clone()
        nxt = None
        for c in kids[cur]:
            u = torch.rand(1, generator=s.generator).item()
            if u < p[tokens[c]].item():
                nxt = c
                break
            p[tokens[c]] = 0.0
            mass = p.sum()
            if mass <= 0:  # only when p(x) rounded to 1 and u landed above it: x is the token
                nxt = c
                break
            p = p / mass
        if nxt is None:
            return path, s.pick(p)
        path.append(nxt)
        cur = nxt


@dataclass(frozen=True)
class TreeShape:
    """How a drafter grows its tree each round (EAGLE-2's expand-then-keep, simplified).

    Each level, every frontier node offers its ``branch`` most likely children (only its best one where the
    draft's top probability is at least ``sure``); the ``width`` candidates with the highest path probability
    (the product of the draft's probabilities from the root) become the next level, until the tree holds
    ``budget`` nodes, the depth reaches the round's length, or no candidate's path probability reaches
    ``min_prob`` (an unsure draft stops early; the first level always keeps one node).
    """

    budget: int = 10
    branch: int = 2
    width: int = 3
    sure: float = 0.8
    min_prob: float = 0.05

    def __post_init__(self):
        for name in ("budget", "branch", "width"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TreeShape.{name}={v!r} must be an integer >= 1")
        for name in ("sure", "min_prob"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"TreeShape.{name}={v!r} must be in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict | None):
        """A shape from a draft's config (None or an empty dict: no tree)."""
        if not d:
            return None
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tree settings {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)
