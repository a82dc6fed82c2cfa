"""Drafters made of other drafters: a lookup with a draft behind it (:class:`HybridDrafter`), a draft's proposal
with free branches from a lookup merged into its tree (:class:`LookupBranches`), and a draft that pauses itself
where it does not pay (:class:`Pausing`). Each is a :class:`~qdlib.drafters.Drafter` like any other.

    >>> from qdlib.lookup import NgramDrafter
    >>> class Three:  # a stand-in draft: always proposes [9, 9, 9]
    ...     def propose(self, context, k): return [9, 9, 9][:k]
    >>> d = HybridDrafter(NgramDrafter([[1, 2, 3]], max_n=2), Three()).configure(Settings(), vocab_size=10)
    >>> d.begin([5, 1, 2], None); d.propose([5, 1, 2], 2).tokens, d.propose([5, 6], 2).tokens
    ([3], [9, 9])
"""

from __future__ import annotations

from .decoding import Settings
from .drafters import Drafter, LookupDrafter, Proposal, as_drafter
from .trees import chain_parents, merge_chain


class HybridDrafter(Drafter):
    """A model-free lookup first and a draft model when the lookup finds nothing (REST's datastore with a neural
    fallback).

    ``lookup`` has ``propose(context, k)`` (e.g. an :class:`qdlib.NgramDrafter` over the knowledge cache's own
    tokens); a round drafts from it when it proposes at least ``min_tokens`` tokens, else from ``fallback`` (a draft
    model or feature-fed draft). Each round's proposals come from one source that depends only on the context, and
    carry that source's q, so the acceptance rule keeps the target's distribution. ``from_lookup`` counts the
    rounds the lookup drafted.

        >>> from qdlib.lookup import NgramDrafter
        >>> class Echo:  # a stand-in fallback: always proposes token 0
        ...     def propose(self, context, k): return [0] * k
        >>> h = HybridDrafter(NgramDrafter([[5, 6, 7, 8]], max_n=2), Echo()).configure(Settings(), vocab_size=10)
        >>> h.begin([1, 5, 6], None); h.propose([1, 5, 6], 3).tokens, h.propose([1, 2], 2).tokens, h.from_lookup
        ([7, 8], [0, 0], 1)
    """

    def __init__(self, lookup, fallback, *, min_tokens: int = 1):
        super().__init__(Settings())
        if not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens={min_tokens!r} must be an integer >= 1")
        self.lookup_source, self.fallback_source, self.min_tokens = lookup, fallback, min_tokens
        self.needs_features = getattr(fallback, "needs_target_features", False)
        self.from_lookup = 0
        self._parts = ()

    def configure(self, settings, **context):
        self.s = settings
        self.lookup = LookupDrafter(self.lookup_source, settings, context["vocab_size"])
        self.fallback = as_drafter(self.fallback_source, settings, **context)
        self._parts = (self.lookup, self.fallback)
        self.needs_features, self.feature_layers = self.fallback.needs_features, self.fallback.feature_layers
        return self

    @property
    def calls(self):
        return sum(p.calls for p in self._parts)

    @calls.setter
    def calls(self, value):  # the base class starts the count at 0; the parts keep their own
        pass

    def begin(self, seq, features):
        self.from_lookup = 0
        for part in self._parts:
            part.begin(seq, features)

    def propose(self, seq, k):
        prop = self.lookup.propose(seq, k)
        if len(prop.tokens) >= self.min_tokens:
            self.from_lookup += 1
            return prop
        return self.fallback.propose(seq, k)

    def commit(self, seq, features):
        for part in self._parts:
            part.commit(seq, features)


class LookupBranches(Drafter):
    """A drafter's proposal plus a branch that costs nothing: the continuation a lookup finds (prompt lookup over
    the text so far, an n-gram store), merged into one token tree (shared prefixes become shared nodes).

    The merged proposal is a tree verified with the multi-candidate rule (:func:`qdlib.trees.accept_tree`), so
    it stays exact when greedy and keeps the target's distribution when sampling, whatever the lookup finds.
    When sampling, a drafter's chain that carries its q is passed on unmerged: the chain's rule accepts more.
    ``extra`` caps the nodes the lookup may add.

        >>> from qdlib.lookup import NgramDrafter
        >>> class Two:  # a stand-in drafter: always proposes the chain [1, 2]
        ...     def propose(self, context, k): return [1, 2][:k]
        >>> d = LookupBranches(Two(), NgramDrafter([], max_n=2, include_context=True)).configure(Settings(), vocab_size=10)
        >>> d.begin([1, 5, 6, 1, 5], None); d.propose([1, 5, 6, 1, 5], 3)
        Proposal(tokens=[1, 2, 6, 1, 5], qs=None, parents=[-1, 0, -1, 2, 3])
    """

    def __init__(self, drafter, lookup, *, extra: int = 4):
        super().__init__(Settings())
        if not isinstance(extra, int) or extra < 1:
            raise ValueError(f"extra={extra!r} must be an integer >= 1 (nodes the lookup may add)")
        self.source, self.lookup_source, self.extra = drafter, lookup, extra
        self.config = getattr(drafter, "config", None)  # the drafter's tuned settings (gamma, tree) carry over
        self.needs_features = getattr(drafter, "needs_target_features", getattr(drafter, "needs_features", False))
        self._parts = ()
        self.from_lookup = 0

    def configure(self, settings, **context):
        self.s = settings
        self.drafter = as_drafter(self.source, settings, **context)
        self.lookup = LookupDrafter(self.lookup_source, settings, context["vocab_size"])
        self._parts = (self.drafter, self.lookup)
        self.needs_features, self.feature_layers = self.drafter.needs_features, self.drafter.feature_layers
        return self

    # the same two-part bookkeeping as the hybrid drafter
    calls, begin, commit = HybridDrafter.calls, HybridDrafter.begin, HybridDrafter.commit

    def propose(self, seq, k):
        prop = self.drafter.propose(seq, k)
        if not self.s.greedy and prop.qs is not None:  # a sampled chain keeps its q-based rule: no merge
            return prop
        chain = self.lookup.propose(seq, k).tokens
        parents = prop.parents if prop.parents is not None else chain_parents(len(prop.tokens))
        tokens, parents = merge_chain(prop.tokens, parents, chain, limit=self.extra)
        self.from_lookup += len(tokens) > len(prop.tokens)
        return Proposal(tokens, None, parents)


class Pausing(Drafter):
    """Speculation that stops paying pauses by itself: a wrapper that proposes nothing (a plain target step) for
    ``pause`` rounds whenever the last ``window`` rounds kept fewer than ``min_kept`` draft tokens per round on
    average, then tries again. Only *when* it drafts changes, never what is accepted, so it stays lossless.

        >>> class Wrong:  # a stand-in drafter whose proposals are never kept
        ...     def propose(self, context, k): return [0] * k
        >>> d = Pausing(Wrong(), window=2, pause=3).configure(Settings(), vocab_size=10)
        >>> d.begin([1, 2], None)
        >>> sizes = []
        >>> for step in range(7):
        ...     seq = [1, 2] + [5] * step       # each round the target keeps none and adds one token
        ...     sizes.append(len(d.propose(seq, 2).tokens)); d.commit(seq + [5], None)
        >>> sizes                               # two unpaid rounds, three paused, then a new try
        [2, 2, 0, 0, 0, 2, 2]
    """

    def __init__(self, drafter, *, window: int = 4, min_kept: float = 0.5, pause: int = 8):
        super().__init__(Settings())
        for name, v in (("window", window), ("pause", pause)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if min_kept < 0:
            raise ValueError(f"min_kept={min_kept!r} must be >= 0 (draft tokens kept per round)")
        self.source, self.window, self.min_kept, self.pause = drafter, window, min_kept, pause
        self.config = getattr(drafter, "config", None)
        self.needs_features = getattr(drafter, "needs_target_features", getattr(drafter, "needs_features", False))
        self._parts = ()

    def configure(self, settings, **context):
        self.s = settings
        self.drafter = as_drafter(self.source, settings, **context)
        self._parts = (self.drafter,)
        self.needs_features, self.feature_layers = self.drafter.needs_features, self.drafter.feature_layers
        return self

    calls = HybridDrafter.calls

    def begin(self, seq, features):
        self.kept, self.paused, self.paused_rounds, self.last = [], 0, 0, None
        self.drafter.begin(seq, features)

    def propose(self, seq, k):
        if self.paused > 0:
            self.paused -= 1
            self.paused_rounds += 1
            self.last = None
            return Proposal([], None if self.s.greedy else [])
        prop = self.drafter.propose(seq, k)
        self.last = (len(seq), prop)
        return prop

    def commit(self, seq, features):
        self.drafter.commit(seq, features)
        if self.last is None:
            return
        n_before, prop = self.last
        self.kept.append(len(seq) - n_before - 1)  # draft tokens kept this round (the target adds one)
        recent = self.kept[-self.window :]
        if len(recent) == self.window and sum(recent) / self.window < self.min_kept:
            self.paused, self.kept = self.pause, []
