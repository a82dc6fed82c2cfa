"""What a draft's cross-attention reads: a static knowledge cache (the seed's), or a **live memory** (GliDe-like).

The seed's memory (:mod:`qdlib.knowledge`) holds the teacher's states of a few question-and-answer items, fixed
before decoding starts; it carries nothing about the text being written, and the draft gained nothing from it
(notebook 04). A live memory holds the teacher's hidden states of the **verified text**: every token the teacher
has already checked. They cost nothing extra: the teacher computes them in the verification pass it runs anyway.

- During a drafting round the memory is fixed. The draft's proposal at depth ``j`` (``j = 1`` the first) reads
  the states up to the last verified token, ``j`` positions behind it: a lag of ``j``.
- After verification the accepted tokens' states are appended (:meth:`LiveMemory.append`); the rejected tokens'
  states were never added, and :meth:`LiveMemory.crop` cuts the memory back if a caller rolls back further.
- Training shows the draft the same view (:func:`draw_lags`): position ``p`` (input ``x[p]``, predicting
  ``x[p+1]``) reads the states of positions ``<= p - lag`` with ``lag`` drawn in ``1..gamma``, never the state of
  ``p`` itself, from which the teacher's own prediction of ``x[p+1]`` is made (:func:`qdlib.fusion.lag_mask`).

Which teacher layers are read is the draft's ``knowledge_enhancement.memory_layers`` (teacher indices; the last
layer is the final-norm output the head reads, the others are RMS-normalised without a learned scale, so all
have the same scale); several layers are concatenated, so ``memory_size`` is the hidden size times their number.

    >>> import torch
    >>> mem = LiveMemory(layers=[27])
    >>> mem.reset(torch.zeros(3, 192)); mem.append(torch.ones(2, 192)); len(mem)
    5
    >>> mem.crop(4); len(mem), mem.states.shape
    (4, torch.Size([1, 4, 192]))

The modes of a draft (:meth:`qdlib.DraftForCausalLM.set_knowledge`): a :class:`~qdlib.knowledge.KnowledgeCache`
(static), ``"live"`` or a :class:`LiveMemory` (live), ``None`` (no memory: the ablation).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .fusion import Memory, lag_mask



class LiveMemory:
    """The teacher's states of the verified text at ``layers`` (None: the layers the draft is configured with).

    ``states`` is ``(B, M, D)``: ``B`` sequences (1 while decoding; a training batch) of ``M`` verified positions,
    ``D`` = hidden size x number of layers. Attached to a draft with ``draft.set_knowledge(LiveMemory(...))`` it
    says which layers the draft reads (a drafter keeps its own :meth:`fresh` copy per generation); passed to the
    draft's forward as ``memory=`` it is what the fusion blocks read. While decoding, the keys and values each
    fusion block projects from the states are kept and extended with each appended row (:meth:`project`).
    """

    is_live = True

    def __init__(self, layers: Sequence[int] | None = None, states: torch.Tensor | None = None):
        if layers is not None:
            layers = list(layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers) \
                    or len(set(layers)) != len(layers):
                raise ConfigError(f"LiveMemory layers={layers!r} must be distinct teacher layer indices (integers >= 0)")
        self.layers = tuple(layers) if layers is not None else None
        self.states = None
        self._proj, self._proj_len, self._proj_key = {}, 0, None
        if states is not None:
            self.states = states if states.dim() == 3 else states[None]  # (B, M, D)

    def __repr__(self) -> str:
        shape = None if self.states is None else tuple(self.states.shape)
        return f"LiveMemory(layers={list(self.layers) if self.layers else None}, states={shape})"

    def __len__(self) -> int:
        return 0 if self.states is None else self.states.shape[1]

    def fresh(self) -> "LiveMemory":
        """An empty memory that reads the same layers (a new generation starts from one)."""
        return LiveMemory(self.layers)

    def reset(self, states: torch.Tensor | None) -> None:
        """Start over from the states ``(M, D)`` of the prompt's verified positions (None: nothing verified yet)."""
        self.states = None if states is None or len(states) == 0 else states[None]  # (1, M, D)
        self._proj, self._proj_len = {}, 0

    def append(self, states: torch.Tensor | None) -> None:
        """Add the states ``(n, D)`` of newly verified positions (after a round: the accepted tokens')."""
        if states is None or len(states) == 0:
            return
        new = states[None].to(self.states.device) if self.states is not None else states[None]  # (1, n, D)
        self.states = new if self.states is None else torch.cat([self.states, new], 1)  # (1, M + n, D)

    def crop(self, n: int) -> None:
        """Keep the first ``n`` positions (a rollback)."""
        if self.states is not None and n < len(self):
            self.states = self.states[:, :n] if n > 0 else None
            self._proj = {k: Memory(m.keys[:, :, :n], m.values[:, :, :n], None) for k, m in self._proj.items()}
            self._proj_len = min(self._proj_len, n)

    def project(self, fusion: torch.nn.ModuleDict, reuse: bool) -> dict[str, Memory]:
        """Keys and values for every fusion block. ``reuse`` (inference): project only rows added since the last
        call, while the blocks' weights are unchanged; otherwise project everything (training)."""
        if not reuse:
            return {i: f.attn.project_states(self.states) for i, f in fusion.items()}
        key = (id(fusion), tuple(f.attn.k_proj.weight._version for f in fusion.values()),
               tuple(f.attn.v_proj.weight._version for f in fusion.values()), self.states.device)
        if key != self._proj_key:
            self._proj, self._proj_len, self._proj_key = {}, 0, key
        M = len(self)
        if M > self._proj_len:
            new = {i: f.attn.project_states(self.states[:, self._proj_len :]) for i, f in fusion.items()}
            self._proj = {i: m if i not in self._proj else
                          Memory(torch.cat([self._proj[i].keys, m.keys], 2), torch.cat([self._proj[i].values, m.values], 2),
                                 None) for i, m in new.items()}  # (1, H, M, hd) each
            self._proj_len = M
        return self._proj


def is_live(memory) -> bool:
    """True for a live memory (what :meth:`qdlib.DraftForCausalLM.set_knowledge` attaches for ``"live"``)."""
    return getattr(memory, "is_live", False)


def memory_layers(kb: dict, teacher_layers: int) -> list[int]:
    """The teacher layers a live memory reads: ``kb["memory_layers"]``, null meaning the last one; checked.

    >>> memory_layers({"memory_layers": None}, 28), memory_layers({"memory_layers": [13, 27]}, 28)
    ([27], [13, 27])
    """
    layers = kb.get("memory_layers")
    layers = [teacher_layers - 1] if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < teacher_layers]
    if bad:
        raise ConfigError(f"knowledge_enhancement.memory_layers={layers!r}: {bad} are not layers of the teacher; "
                          f"allowed: indices in 0..{teacher_layers - 1} (null: the last)")
    return layers


def resolve(config, knowledge):
    """The memory to attach to a draft with ``config``, validated: ``knowledge`` a static cache, ``"live"`` (the
    configured layers), a :class:`LiveMemory`, or None. Raises :class:`~qdlib.errors.ConfigError` naming the problem."""
    if knowledge is None:
        return None
    kb = config.knowledge_enhancement
    if not kb["enabled"]:
        raise ConfigError("this draft has knowledge_enhancement.enabled=False; build it with "
                          "knowledge_enhancement={'enabled': True} to attach a memory")
    if isinstance(knowledge, str):
        if knowledge != "live":
            raise ConfigError(f"set_knowledge({knowledge!r}): allowed are a KnowledgeCache (static memory), 'live' or "
                              f"a qdlib.memories.LiveMemory (the teacher's states of the verified text), or None (detach)")
        knowledge = LiveMemory()
    if is_live(knowledge):
        layers = memory_layers({"memory_layers": knowledge.layers or kb.get("memory_layers")}, config.teacher_num_layers)
        width = config.hidden_size * len(layers)
        if width != kb["memory_size"]:
            raise ConfigError(f"a live memory of teacher layers {layers} is {width} wide, this draft's fusion blocks "
                              f"read {kb['memory_size']} (knowledge_enhancement.memory_size): read "
                              f"{kb['memory_size'] // config.hidden_size} layer(s), or build the draft for {len(layers)}")
        return LiveMemory(layers, knowledge.states)
    return _checked_cache(config, knowledge)


def _checked_cache(config, cache):
    """A static cache of the right width, made for this draft's teacher (when both carry a fingerprint)."""
    kb = config.knowledge_enhancement
    if not hasattr(cache, "states") or not hasattr(cache, "mask"):
        raise ConfigError(f"set_knowledge got a {type(cache).__name__}; allowed are a KnowledgeCache (states and mask), "
                          f"'live', a qdlib.memories.LiveMemory, or None")
    width = cache.states.shape[-1]
    if width != kb["memory_size"]:
        raise ConfigError(f"knowledge cache states have width {width}, this draft expects "
                          f"{kb['memory_size']} (the teacher's hidden size); rebuild the cache with its teacher")
    mine = getattr(config, "teacher_fingerprint", None)
    theirs = getattr(cache, "fingerprint", None)
    if mine and theirs and mine != theirs:
        raise ConfigError(f"knowledge cache was built for teacher fingerprint {theirs}, this draft comes from "
                          f"{mine}; rebuild it with `qd build-cache` for this draft's teacher")
    return cache


def fusion_inputs(memory: LiveMemory, fusion, position_ids: torch.Tensor, lags, first: int | None, reuse: bool):
    """What the fusion blocks read from a live memory for queries at ``position_ids``: ``(memories, mask)``.

    ``lags``: an int (1 while decoding) or ``(B, T)``. ``first``: the smallest query position when known without
    looking at the tensor; when every query may read every slot (a drafting round) the mask is None.
    """
    if memory is None or len(memory) == 0:
        return {}, None
    M = len(memory)
    mems = memory.project(fusion, reuse)
    if isinstance(lags, int) and first is not None and first - lags >= M - 1:
        return mems, None  # every query reads all of the verified text
    return mems, lag_mask(position_ids, lags, M)  # (B, T, M)


# ----------------------------------------------------------------------------- the teacher's side


def layer_states(hidden_states: Sequence[torch.Tensor], layers: Sequence[int], eps: float) -> torch.Tensor:
    """The memory states from transformers' ``output_hidden_states`` (the embeddings, then each layer's output,
    the last one after the final norm): layer ``i`` is entry ``i + 1``, RMS-normalised unless it is the last;
    several layers are concatenated on the last axis. ``(..., T, H * len(layers))``."""
    last = len(hidden_states) - 2
    parts = [hidden_states[i + 1] if i == last else F.rms_norm(hidden_states[i + 1], (hidden_states[i + 1].shape[-1],),
                                                                 None, eps) for i in layers]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


@torch.no_grad()
def teacher_states(teacher, ids: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher forward over ``ids`` ``(B, T)``: its logits ``(B, T, V)`` and the memory states ``(B, T, D)``
    at ``layers``; the KL targets and the live memory of a training batch come from the same pass."""
    out = teacher(input_ids=ids, use_cache=False, output_hidden_states=True)
    return out.logits, layer_states(out.hidden_states, layers, teacher.config.rms_norm_eps)


def draw_lags(shape: tuple[int, int], max_lag: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each training position's lag, uniform in ``1..max_lag`` (the depths a drafting round reaches).

    >>> lags = draw_lags((2, 1000), 4, torch.Generator().manual_seed(0))
    >>> lags.min().item(), lags.max().item(), lags.shape
    (1, 4, torch.Size([2, 1000]))
    """
    if not isinstance(max_lag, int) or max_lag < 1:
        raise ConfigError(f"max_lag={max_lag!r} must be an integer >= 1 (the deepest drafting round)")
    return torch.randint(1, max_lag + 1, shape, generator=generator)
