"""Drafters: everything that proposes tokens for speculative decoding, behind one small interface.

A drafter owns its own state (a KV cache, the teacher features it has read) and
answers three calls from the decoding loop in :mod:`qdlib.speculative`:

- ``begin(seq, features)``: a new generation starts from the prompt ``seq``;
- ``propose(seq, k) -> Proposal``: up to ``k`` tokens to follow ``seq`` (and, when
  sampling, the distribution each was drawn from);
- ``commit(seq, features)``: the target verified a round and ``seq`` is now final;
  roll back whatever was built on rejected proposals.

``features`` are the teacher's hidden states of the positions it has just
processed (the prompt's, then the verified ones): its last layer's, or those of
the drafter's ``feature_layers`` (concatenated). Only drafters with
``needs_features = True`` receive them, so the others cost nothing extra.
(transformers' ``CandidateGenerator`` plays the same role for ``generate``.)

    >>> from qdlib.lookup import NgramDrafter
    >>> d = as_drafter(NgramDrafter([[1, 2, 3, 4]], max_n=2), Settings())
    >>> d.begin([7, 2], None); d.propose([7, 2], 2).tokens
    [3, 4]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .decoding import Settings
from .target_engine import TargetEngine, supports
from .timing import feature_step_time, step_time
from .trees import TreeShape


class Proposal(NamedTuple):
    tokens: list[int]
    qs: list[torch.Tensor] | None  # the draft's distribution for each token (sampling, chains only), else None
    parents: list[int] | None = None  # a token tree (:mod:`qdlib.trees`): each token's parent; None: a chain


class Drafter:
    """The interface; subclasses override what they need. ``calls`` counts draft forward passes.

    ``needs_features``: the loop passes the teacher's states to ``begin`` and ``commit``; ``feature_layers``:
    which teacher layers (None: the last one's final-norm output, what the head reads)."""

    needs_features = False
    feature_layers: tuple[int, ...] | None = None
    _parts: tuple = ()  # the drafters a wrapper combines (hybrid, lookup branches, pausing)

    def __init__(self, settings: Settings):
        self.s = settings
        self.calls = 0

    def check(self, target) -> None:
        """Raise ``ValueError`` naming the mismatch when this drafter cannot draft for ``target`` (another
        vocabulary, other special tokens, features of another width); a wrapper checks what it wraps."""
        for part in self._parts:
            part.check(target)

    def step_cost(self, context: int = 96) -> float:
        """Median seconds of one drafting call after ``context`` tokens, on the path decoding uses (0: no model);
        over a teacher step this is the draft's c. A wrapper costs what its dearest part does."""
        return max((part.step_cost(context) for part in self._parts), default=0.0)

    def begin(self, seq: list[int], features: torch.Tensor | None) -> None:
        pass

    def propose(self, seq: list[int], k: int) -> Proposal:
        raise NotImplementedError

    def commit(self, seq: list[int], features: torch.Tensor | None) -> None:
        pass

    def configure(self, settings: Settings, **context) -> "Drafter":
        """Take the decoding loop's settings (``context``: what :func:`as_drafter` knows of the target)."""
        self.s = settings  # propose with the same rule the loop accepts with
        return self


def rollback(cache, keep: int) -> None:
    """Cut a transformers KV cache back to its first ``keep`` positions (transformers 5: crop takes a negative count)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def _confident(logits: torch.Tensor, q: torch.Tensor, s: Settings, threshold: float | None) -> bool:
    if threshold is None:
        return True
    conf = (torch.softmax(logits.float(), -1) if s.greedy else q).max().item()
    return conf >= threshold


class ModelDrafter(Drafter):
    """A causal LM (a layer-sampled draft, any small model): its own KV cache, prefill, confidence stop, rollback.

    Its cache always holds ``seq[:-1]`` or less; each proposal feeds what the cache lacks, then one token at a time.
    Given ``max_len`` (the decoding loop's longest sequence), a Qwen3 model or a layer-sampled draft of one runs on
    qdlib's lean forward (:class:`~qdlib.target_engine.TargetEngine`, the teacher's own), else on transformers'.
    """

    def __init__(self, model, settings: Settings, confidence_threshold: float | None = None,
                 max_len: int | None = None):
        super().__init__(settings)
        self.model, self.threshold, self.max_len = model, confidence_threshold, max_len
        self.device = model.device

    def begin(self, seq, features):
        from transformers import DynamicCache

        lean = self.max_len is not None and supports(self.model) is None
        self.engine = TargetEngine(self.model, self.max_len) if lean else None
        self.cache = None if lean else DynamicCache(config=self.model.config)
        if len(seq) > 1:
            self._forward(seq[:-1])
            self.calls += 1

    def check(self, target) -> None:
        tv, dv = target.config.vocab_size, self.model.config.vocab_size
        if tv != dv:
            raise ValueError(f"draft vocabulary ({dv}) differs from the target's ({tv}); the draft must use the "
                             f"target's tokenizer")
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            a, b = getattr(target.config, key, None), getattr(self.model.config, key, None)
            if a is not None and b is not None and a != b:
                raise ValueError(f"draft {key}={b} differs from the target's {a}: the tokenizers do not match")

    def step_cost(self, context: int = 96) -> float:
        return step_time(self.model, context)

    def _hooks(self):
        """A draft's fusion blocks reading its attached memory, for the lean forward (None: a plain stack)."""
        hooks = getattr(self.model, "fusion_hooks", None)  # a DraftForCausalLM; any other causal LM has none
        return hooks() if hooks is not None else None

    @property
    def length(self) -> int:
        """Positions in the draft's own KV cache."""
        return self.engine.length if self.engine is not None else self.cache.get_seq_length()

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens`` after the cache; the last position's logits ``(V,)``."""
        if self.engine is not None:
            return self.engine(tokens, keep=1, hooks=self._hooks())[0][-1]
        return self.model(input_ids=torch.tensor([tokens], device=self.device), cache=self.cache, use_cache=True,
                          logits_to_keep=1).logits[0, -1]

    def propose(self, seq, k):
        feed = seq[self.length:]
        tokens, qs = [], []
        for j in range(k):
            logits = self._forward(feed)  # (V,)
            self.calls += 1
            q = self.s.dist(logits)
            tokens.append(self.s.pick(q))
            qs.append(q)
            feed = tokens[-1:]
            if j < k - 1 and not _confident(logits, q, self.s, self.threshold):
                break
        return Proposal(tokens, None if self.s.greedy else qs)

    def commit(self, seq, features):
        if self.engine is not None:
            self.engine.crop(len(seq) - 1)
        else:
            rollback(self.cache, len(seq) - 1)


class LiveMemoryDrafter(ModelDrafter):
    """A draft model with a live memory (:mod:`qdlib.memories`): the teacher's states of the verified text.

    ``memory`` holds the states of ``seq[:-1]``, everything the target has verified; it is fixed while the draft
    proposes (its proposal at depth j reads it with lag j) and grows by the accepted tokens' states, which the
    target computed in its verification pass, after every round. The draft's own KV cache is incremental and rolled
    back past rejected tokens as :class:`ModelDrafter`'s.
    """

    needs_features = True

    def __init__(self, model, settings: Settings, confidence_threshold: float | None = None,
                 max_len: int | None = None):
        super().__init__(model, settings, confidence_threshold, max_len)
        self.feature_layers = model.feature_layers
        self.memory = model.knowledge.fresh()

    def begin(self, seq, features):
        self.memory = self.model.knowledge.fresh()  # says which layers; holds this generation's states
        self.memory.reset(None if features is None else features.to(self.device))  # the prompt's, but its last token
        super().begin(seq, features)

    def _hooks(self):
        return self.model.fusion_hooks(self.memory)  # the fusion blocks read this generation's memory at lag 1

    def check(self, target) -> None:
        super().check(target)
        if target.config.hidden_size != self.model.config.hidden_size:
            raise ValueError(f"the draft's live memory reads states {self.model.config.hidden_size} wide per layer, "
                             f"the target's are {target.config.hidden_size}: use the draft with the teacher it came from")

    def step_cost(self, context: int = 96) -> float:  # the fusion blocks read a memory of ``context`` states
        width = self.model.config.knowledge_enhancement["memory_size"]
        states = torch.randn(context, width, generator=torch.Generator().manual_seed(0)).to(self.device)
        memory = self.model.knowledge.fresh()
        memory.reset(states)
        return step_time(self.model, context, memory=memory)

    def _forward(self, tokens):
        if self.engine is not None:
            return super()._forward(tokens)
        return self.model(input_ids=torch.tensor([tokens], device=self.device), cache=self.cache, use_cache=True,
                          logits_to_keep=1, memory=self.memory).logits[0, -1]

    def commit(self, seq, features):
        self.memory.append(None if features is None else features.to(self.device))  # now the states of seq[:-1]
        super().commit(seq, features)


class LookupDrafter(Drafter):
    """A model-free drafter (``propose(context, k) -> list``, e.g. :class:`qdlib.NgramDrafter`).

    Its proposals are deterministic, so q is one-hot and the same acceptance rule keeps the target's
    distribution; a round with no proposal is a plain target step.
    """

    def __init__(self, lookup, settings: Settings, vocab_size: int):
        super().__init__(settings)
        self.lookup, self.V = lookup, vocab_size

    def propose(self, seq, k):
        tokens = [int(x) for x in self.lookup.propose(seq, k)][:k]
        self.calls += 1
        qs = None if self.s.greedy else [torch.nn.functional.one_hot(torch.tensor(x), self.V).float() for x in tokens]
        return Proposal(tokens, qs)


class FeatureDrafter(Drafter):
    """A feature-fed draft (:class:`qdlib.feature_draft.FeatureDraft`) reading the teacher's verified features.

    Draft position ``i`` reads ``(f[i-1], x[i])``. Positions whose feature the teacher has computed are fed
    once, all together, at the start of a round; the proposals after them read the draft's own predicted
    features, and are dropped from its cache right after drafting (the teacher's true features replace
    them in the next round).
    """

    needs_features = True

    def __init__(self, draft, settings: Settings, confidence_threshold: float | None = None, max_len: int | None = None,
                 tree: TreeShape | None = None):
        super().__init__(settings)
        self.draft, self.threshold, self.max_len, self.tree = draft, confidence_threshold, max_len, tree

    def check(self, target) -> None:
        tv, dv, th, dh = target.config.vocab_size, self.draft.vocab_size, target.config.hidden_size, \
            self.draft.fc.in_features // 2
        if (tv, th) != (dv, dh):
            raise ValueError(f"the feature-fed draft was built for vocabulary {dv} and hidden size {dh}, the target "
                             f"has {tv} and {th}: build or load the draft for this teacher")

    def step_cost(self, context: int = 96) -> float:
        return feature_step_time(self.draft, context)

    def begin(self, seq, features):
        self.kv = self.draft.new_cache(self.max_len)
        H = self.draft.fc.in_features // 2
        self.feats = features if features is not None else torch.zeros(0, H, device=self.draft.device)  # (L-1, H)

    def _pick(self, logits: torch.Tensor):
        """(token id, q over the full vocabulary or None, confident?) from draft-vocabulary logits ``(Vd,)``."""
        if self.s.greedy:
            conf = self.threshold is None or torch.softmax(logits.float(), -1).max().item() >= self.threshold
            return int(self.draft.vocab_ids[logits.argmax()]), None, conf
        q = self.s.dist(self.draft.full_logits(logits))
        return self.s.pick(q), q, self.threshold is None or q.max().item() >= self.threshold

    def propose(self, seq, k):
        done = self.kv.length  # draft positions 1..done read true features
        if len(seq) - 1 <= done:  # nothing new to read (a one-token prompt): let the target step alone
            return Proposal([], None if self.s.greedy else [])
        dev = self.draft.device
        f_in = self.feats[done : len(seq) - 1][None].to(dev)  # (1, n, H): f[i-1] for positions done+1 .. L-1
        pred, logits = self.draft(f_in, torch.tensor([seq[done + 1 :]], device=dev), self.kv)
        self.calls += 1
        if self.tree is not None:
            return self._grow_tree(pred[0, -1], logits[0, -1], k)
        true_len = self.kv.length
        tokens, qs = [], []
        for j in range(k):
            x, q, confident = self._pick(logits[0, -1])
            tokens.append(x)
            qs.append(q)
            if j == k - 1 or not confident:
                break
            pred, logits = self.draft(pred[:, -1:], torch.tensor([[x]], device=dev), self.kv)  # own feature
            self.calls += 1
        self.kv.crop(true_len)
        return Proposal(tokens, None if self.s.greedy else qs)

    def commit(self, seq, features):
        self.feats = torch.cat([self.feats, features.to(self.feats.device)])  # now f[0 .. len(seq)-2]

    def _grow_tree(self, root_pred: torch.Tensor, root_logits: torch.Tensor, k: int) -> Proposal:
        """A token tree of depth <= ``k`` grown level by level (:class:`qdlib.trees.TreeShape`), one draft call a level.

        A node reads its parent's predicted feature and its own token, at position ``prefix + depth - 1``, and
        attends to the verified prefix, its ancestors and itself; the drafted entries leave the cache afterwards.
        """
        shape, true_len, dev = self.tree, self.kv.length, self.draft.device
        tokens, parents, slot, node_pred = [], [], {}, {}  # slot: node -> its row in the draft's cache
        frontier = [(-1, root_logits, root_pred, 0.0)]  # (node, logits, predicted feature, log path probability)
        for depth in range(1, k + 1):
            level = _best_children(frontier, shape, self.draft.vocab_ids, room=shape.budget - len(tokens),
                                   keep_one=depth == 1)
            if not level:
                break
            for _, parent, tok in level:
                tokens.append(tok)
                parents.append(parent)
            if depth == k or len(tokens) >= shape.budget:
                break
            new = list(range(len(tokens) - len(level), len(tokens)))
            mask = torch.zeros(len(new), self.kv.length + len(new), dtype=torch.bool, device=dev)
            mask[:, :true_len] = True
            feats_in = []
            for r, node in enumerate(new):
                mask[r, self.kv.length + r] = True
                p = parents[node]
                feats_in.append(root_pred if p < 0 else node_pred[p])
                while p >= 0:
                    mask[r, slot[p]] = True
                    p = parents[p]
            for r, node in enumerate(new):
                slot[node] = self.kv.length + r
            pos = torch.full((len(new),), true_len + depth - 1, device=dev)
            pred, logits = self.draft(torch.stack(feats_in)[None], torch.tensor([[tokens[i] for i in new]], device=dev),
                                      self.kv, positions=pos, mask=mask)
            self.calls += 1
            node_pred.update({n: pred[0, r] for r, n in enumerate(new)})
            frontier = [(n, logits[0, r], pred[0, r], level[r][0]) for r, n in enumerate(new)]
        self.kv.crop(true_len)
        return Proposal(tokens, None, parents)


def _best_children(frontier, shape, vocab_ids, room: int, keep_one: bool) -> list:
    """The next level: ``(log path probability, parent, token)`` of the best children of ``frontier``."""
    cands = []
    for node, logits, _, logp in frontier:
        lp = torch.log_softmax(logits.float(), -1)
        top = lp.topk(min(shape.branch, lp.shape[-1]))
        vals, idx = top.values.tolist(), top.indices.tolist()
        n = 1 if math.exp(vals[0]) >= shape.sure else len(vals)
        cands += [(logp + v, node, int(vocab_ids[i])) for v, i in zip(vals[:n], idx[:n])]
    cands.sort(key=lambda c: -c[0])
    cands = cands[: min(shape.width, room)]
    kept = [c for c in cands if math.exp(c[0]) >= shape.min_prob]
    return kept or (cands[:1] if keep_one else [])


def as_drafter(draft, settings: Settings, *, confidence_threshold: float | None = None, vocab_size: int | None = None,
               max_len: int | None = None, tree: TreeShape | None = None) -> Drafter:
    """The right :class:`Drafter` for ``draft``: a drafter is returned as it is, a feature-fed draft, a causal LM
    (one that declares ``feature_layers``, a draft with a live memory attached, reads the teacher's states of the
    verified text), or a model-free object with ``propose(context, k)``. ``tree``: grow token trees (feature-fed
    drafts only)."""
    if isinstance(draft, Drafter):
        return draft.configure(settings, confidence_threshold=confidence_threshold, vocab_size=vocab_size,
                               max_len=max_len, tree=tree)
    if getattr(draft, "needs_target_features", False):
        return FeatureDrafter(draft, settings, confidence_threshold, max_len, tree)
    if tree is not None:
        raise ValueError(f"tree={tree!r}: token trees are grown by feature-fed drafts (qdlib.load_draft('fast')); "
                         f"a {type(draft).__name__} drafts chains (tree=None)")
    if isinstance(draft, torch.nn.Module):
        drafter = LiveMemoryDrafter if getattr(draft, "feature_layers", None) else ModelDrafter
        return drafter(draft, settings, confidence_threshold, max_len)
    if callable(getattr(draft, "propose", None)):
        return LookupDrafter(draft, settings, vocab_size)
    raise TypeError(f"draft must be a causal LM, a feature-fed draft, a Drafter, or an object with a "
                    f"propose(context, k) method (e.g. qdlib.NgramDrafter), got {type(draft).__name__}")
