"""Drafting without a draft model: n-gram lookup in a datastore (notebook 06).

REST (He et al. 2024, "Retrieval-Based Speculative Decoding") proposes the
tokens that followed the current context's suffix somewhere in a datastore;
prompt-lookup decoding does the same with the prompt as the datastore. Both
need no second network, so they are the honest comparators for the knowledge
cache: if the draft's gain on knowledge questions came only from copying the
cached answers, a lookup would do as well.

    >>> d = NgramDrafter([[1, 2, 3, 4, 5]], max_n=3)
    >>> d.propose([9, 2, 3], 2)      # suffix (2, 3) was followed by 4, 5
    [4, 5]
    >>> d.propose([9, 9, 7], 2)      # no match: nothing to propose
    []

:func:`qdlib.speculative_generate` accepts such a drafter in place of a draft
model; its proposals are deterministic (q is one-hot), so the acceptance rule
still keeps the target's distribution exactly.
"""

from __future__ import annotations

from typing import Sequence


class NgramDrafter:
    """Propose the continuation of the longest context suffix (``max_n`` .. ``min_n`` tokens) found in a datastore.

    Args:
        sequences: token id lists (the datastore), e.g. the knowledge items' texts.
        max_n, min_n: the longest and shortest suffix tried.
        include_context: also search the sequence being generated (prompt-lookup style).
    Later occurrences win, so the most recent match is used.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], max_n: int = 4, min_n: int = 1,
                 include_context: bool = False):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.include_context = max_n, min_n, include_context
        self.sequences = [list(s) for s in sequences]
        self.index: dict[tuple, tuple[int, int]] = {}  # n-gram -> (sequence, position after it)
        for si, seq in enumerate(self.sequences):
            for n in range(min_n, max_n + 1):
                for end in range(n, len(seq)):  # an n-gram must be followed by at least one token
                    self.index[tuple(seq[end - n : end])] = (si, end)

    def __repr__(self) -> str:
        return f"NgramDrafter({len(self.sequences)} sequences, n={self.min_n}..{self.max_n})"

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest matching suffix of ``context`` ([] when none matches)."""
        context = list(context)
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            gram = tuple(context[-n:])
            if self.include_context:  # most recent earlier occurrence in the context itself
                for end in range(len(context) - 1, n - 1, -1):
                    if tuple(context[end - n : end]) == gram:
                        return context[end : end + k]
            hit = self.index.get(gram)
            if hit is not None:
                si, end = hit
                return self.sequences[si][end : end + k]
        return []
