"""Training data as a mixture: rows drawn from weighted token streams and from a set of fixed rows.

:class:`MixData` is deterministic in the step (a resumed run sees the same batches as an uninterrupted one):

    >>> mix = MixData({"a": torch.arange(100)}, {"a": 1.0}, torch.zeros(0, 5, dtype=torch.long), 0.0)
    >>> torch.equal(mix.batch(3, rows=2, seq_len=4), mix.batch(3, rows=2, seq_len=4)), mix.batch(3, 2, 4).shape
    (True, torch.Size([2, 5]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixData:
    """Token streams per source plus teacher continuations; ``batch(step)`` is deterministic in ``step``."""

    streams: dict
    weights: dict
    generated: torch.Tensor  # (G, L) teacher continuations
    generated_share: float
    seed: int = 0

    def batch(self, step: int, rows: int, seq_len: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        names = [s for s in self.streams if self.weights.get(s, 0) > 0]
        w = torch.tensor([float(self.weights[s]) for s in names])
        out = torch.empty(rows, seq_len + 1, dtype=torch.long)
        for r in range(rows):
            if len(self.generated) and torch.rand((), generator=g).item() < self.generated_share:
                row = self.generated[int(torch.randint(len(self.generated), (), generator=g))]
                out[r] = row[: seq_len + 1].long()
                continue
            s = self.streams[names[int(torch.multinomial(w, 1, generator=g))]]
            start = int(torch.randint(len(s) - seq_len - 1, (), generator=g))
            out[r] = s[start : start + seq_len + 1].long()
        return out  # (rows, T+1)
