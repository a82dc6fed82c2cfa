"""The draft model: a few of the teacher's layers as a real transformers model (notebook 01).

    >>> from qdlib import load_teacher, sample_layers, build_draft
    >>> teacher, tok = load_teacher()
    >>> draft = build_draft(teacher, sample_layers(28, 6))
    >>> draft.config.kept_layers
    [0, 5, 11, 16, 22, 27]
    >>> draft.save_pretrained("my_draft")
    >>> ids = tok("def add(a, b):", return_tensors="pt").input_ids
    >>> plain = teacher.generate(ids, do_sample=False, max_new_tokens=8)
    >>> assisted = teacher.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=8)
    >>> assisted.tolist() == plain.tolist()     # the draft proposes, the teacher decides
    True

``DraftForCausalLM`` is a ``PreTrainedModel`` with its own config class
(``DraftConfig``, model type ``"qd_draft"``, registered with the Auto
classes): it saves and loads with ``save_pretrained`` / ``from_pretrained``
(safetensors), generates, and can be the ``assistant_model`` of the
teacher's ``generate``. Its config records the teacher it came from and the
kept layer indices. Kept layers are renumbered 0..k-1, so each has its own
KV-cache slot.

The optional knowledge path (notebooks 02-03) adds gated cross-attention after
chosen draft layers; it is configured by the ``knowledge_enhancement`` block and
starts exactly closed. What it reads (:mod:`qdlib.memories`) is a static
knowledge cache, or a live memory: the teacher's states of the verified text.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel, Qwen3Config
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3RMSNorm

from .errors import ConfigError
from .fusion import GatedFusion, Memory, RMSNorm
from .knowledge import teacher_fingerprint
from .memories import fusion_inputs, is_live, resolve
from .settings.distill import knowledge_block


def _own_norms(module: nn.Module) -> None:
    """Replace every ``Qwen3RMSNorm`` inside ``module`` by qdlib's one :class:`~qdlib.fusion.RMSNorm`.

    Same parameter (``weight``, kept as it is), same formula; on float32 it is one fused
    ``torch.nn.functional.rms_norm`` operator instead of six, which matters on a CPU where a
    small draft's step time is mostly per-operator overhead (notebook 06 profiles it).
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Qwen3RMSNorm:
                norm = RMSNorm(child.weight.shape[0], child.variance_epsilon)
                norm.weight = child.weight
                setattr(parent, name, norm)


class DraftConfig(Qwen3Config):
    """A Qwen3 config for the k kept layers, plus where they came from.

    Extra fields: ``kept_layers`` (teacher indices, in draft order),
    ``teacher_num_layers``, ``teacher_name_or_path``, ``teacher_fingerprint``
    (see :func:`qdlib.knowledge.teacher_fingerprint`) and the
    ``knowledge_enhancement`` block (see :data:`qdlib.settings.distill.KNOWLEDGE_DEFAULTS`).
    """

    model_type = "qd_draft"
    kept_layers: list[int] | None = None
    teacher_num_layers: int | None = None
    teacher_name_or_path: str | None = None
    teacher_fingerprint: str | None = None
    knowledge_enhancement: dict | None = None


class DraftForCausalLM(PreTrainedModel, GenerationMixin):
    """k decoder layers copied from a teacher, its embeddings, final norm and head.

    Forward has the signature of ``Qwen3ForCausalLM.forward``; when a knowledge
    cache is attached with :meth:`set_knowledge` and the config enables it,
    gated cross-attention follows the layers in ``after_layers``.
    """

    config_class = DraftConfig
    base_model_prefix = "model"
    _no_split_modules = ["Qwen3DecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DraftConfig):
        super().__init__(config)
        self.model = Qwen3Model(config)
        _own_norms(self.model)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        kb = knowledge_block(config.knowledge_enhancement, config.hidden_size, config.num_hidden_layers)
        config.knowledge_enhancement = kb
        self.fusion = nn.ModuleDict()
        if kb["enabled"]:
            for i in kb["after_layers"]:
                self.fusion[str(i)] = GatedFusion(config.hidden_size, kb["memory_size"], kb["cache_dim"],
                                                  kb["num_heads"], kb["fusion_gate"], config.rms_norm_eps,
                                                  gate_init=kb["gate_init"], recency=kb["recency"])
        self._knowledge = None  # run-time state: the attached KnowledgeCache or LiveMemory (never saved)
        self._memory = {}  # layer position -> projected Memory, valid for _memory_key
        self._memory_key = None
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GatedFusion):
            module.reset_gate()  # exactly closed unless gate_init opens it slightly
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    # -------------------------------------------------------------- knowledge

    @property
    def knowledge(self):
        """The attached memory: a knowledge cache, a :class:`~qdlib.memories.LiveMemory`, or None."""
        return self._knowledge

    @property
    def feature_layers(self) -> tuple[int, ...] | None:
        """The teacher layers whose states this draft reads while decoding (a live memory), else None.

        A decoding loop hands such a draft the teacher's states of every verified token
        (:class:`qdlib.drafters.LiveMemoryDrafter`)."""
        return self._knowledge.layers if is_live(self._knowledge) else None

    def set_knowledge(self, knowledge) -> "DraftForCausalLM":
        """Attach a memory (run-time state, not saved): a knowledge cache (static), ``"live"`` or a
        :class:`~qdlib.memories.LiveMemory` (the teacher's states of the verified text), or None (detach all).

        A cache must offer ``states`` ``(N, M, memory_size)`` and ``mask`` ``(N, M)``; a cache with another width,
        or (when both carry one) a teacher fingerprint other than this draft's, is refused; so is a live memory
        whose layers make another width (:func:`qdlib.memories.resolve`).
        """
        self._knowledge = resolve(self.config, knowledge)
        self._memory, self._memory_key = {}, None
        return self

    def fusion_hooks(self, memory=None) -> dict | None:
        """The fusion blocks as hooks of the lean forward (:class:`qdlib.target_engine.TargetEngine`'s ``hooks``):
        ``{layer: f(h (T, H), positions (T,)) -> h}`` reading the attached memory (a static cache, or ``memory``, a
        :class:`~qdlib.memories.LiveMemory`, at lag 1 as a drafting round does); None when nothing is read."""
        if not len(self.fusion) or self._knowledge is None:
            return None
        call = {}  # the memories of the current engine call, read once for all its fusion blocks

        def hook(i: str):
            def fuse(h, positions):
                if call.get("positions") is not positions:  # one engine call hands every hook the same positions
                    call.update(positions=positions, read=self._memories(memory, 1, positions[None], int(positions[0])))
                mems, mask = call["read"]
                return h if not mems else self.fusion[i](h[None], mems[i], mask, positions[None])[0]  # (T, H)
            return fuse

        return {int(i): hook(i) for i in self.fusion}

    def _memories(self, memory, lags, position_ids, first) -> tuple[dict[str, Memory], torch.Tensor | None]:
        """Keys/values per fusion layer and the queries' mask (None: every query reads every slot).

        A static cache is projected once per attached cache in inference. A live memory is ``memory`` (the
        forward's argument) or else the attached one, read with ``lags`` (:func:`qdlib.memories.fusion_inputs`)."""
        reuse = not (self.training or torch.is_grad_enabled())
        if not len(self.fusion) or self._knowledge is None:
            if memory is not None:
                raise ConfigError("memory= was given but this draft has no live memory attached; call "
                                  "draft.set_knowledge('live') first")
            return {}, None
        if is_live(self._knowledge):
            return fusion_inputs(memory if memory is not None else self._knowledge, self.fusion, position_ids,
                                 lags, first, reuse)
        if memory is not None:
            raise ConfigError("memory= was given but this draft reads a static knowledge cache; call "
                              "draft.set_knowledge('live') to read a live memory")
        key = (id(self._knowledge), tuple(f.attn.k_proj.weight._version for f in self.fusion.values()),
               self.device, self.dtype)
        if reuse and key == self._memory_key:
            return self._memory, None
        states = self._knowledge.states.to(self.device)
        mask = self._knowledge.mask.to(self.device)
        mem = {i: f.attn.project_memory(states, mask) for i, f in self.fusion.items()}
        if reuse:
            self._memory, self._memory_key = mem, key
        return mem, None

    # -------------------------------------------------------------- HF plumbing

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        memory=None,
        memory_lags: int | torch.Tensor = 1,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``Qwen3ForCausalLM.forward``'s arguments, plus, for a draft with a live memory attached: ``memory`` (a
        :class:`~qdlib.memories.LiveMemory` whose states ``(B, M, D)`` are positions ``0..M-1`` of the text) and
        ``memory_lags`` (an int, or ``(B, T)``: position ``p`` reads the states of positions ``<= p - lag``)."""
        cache = cache if cache is not None else past_key_values
        dec = self.model
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        h = dec.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        first = None  # the first query position, when known without reading a tensor
        if position_ids is None:
            first = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(h.shape[1], device=h.device) + first).unsqueeze(0)  # (1, T)
        if isinstance(attention_mask, dict):
            masks = attention_mask  # already prepared by generate
        else:
            mk = dict(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=cache,
                      position_ids=position_ids)
            masks = {"full_attention": create_causal_mask(**mk)}
            if "sliding_attention" in self.config.layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mk)
        rope = dec.rotary_emb(h, position_ids)
        memories, fmask = self._memories(memory, memory_lags, position_ids, first)
        hidden_states = [h] if output_hidden_states else None
        for i, layer in enumerate(dec.layers):
            h = layer(h, attention_mask=masks[self.config.layer_types[i]], position_embeddings=rope,
                      position_ids=position_ids, cache=cache, use_cache=use_cache)
            if str(i) in memories:
                h = self.fusion[str(i)](h, memories[str(i)], fmask, position_ids)  # (B, T, D)
            if output_hidden_states:
                hidden_states.append(h)
        h = dec.norm(h)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None,
                                      hidden_states=tuple(hidden_states) if hidden_states else None)


AutoConfig.register("qd_draft", DraftConfig, exist_ok=True)
AutoModelForCausalLM.register(DraftConfig, DraftForCausalLM, exist_ok=True)


def validate_layers(layers: Sequence[int], num_layers: int, *, keep_ends: bool = True) -> list[int]:
    """Check an explicit list of teacher layer indices; return it as a list of ints.

    >>> validate_layers([0, 5, 27], 28)
    [0, 5, 27]
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty; give at least one teacher layer index")
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise ValueError(f"layer indices must be integers, got {bad}")
    out = [i for i in layers if not 0 <= i < num_layers]
    if out:
        raise ValueError(f"layer indices {out} are out of range; the teacher has layers 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        dup = sorted({i for i in layers if layers.count(i) > 1})
        raise ValueError(f"duplicate layer indices {dup} in {layers}")
    if layers != sorted(layers):
        raise ValueError(f"layer indices {layers} are not sorted; the draft keeps the teacher's order, e.g. {sorted(layers)}")
    if keep_ends and (layers[0] != 0 or layers[-1] != num_layers - 1):
        raise ValueError(f"layers {layers} must include the first (0) and the last ({num_layers - 1}) layer; "
                         f"pass keep_ends=False for an early-exit draft such as the first k layers")
    return layers


def _draft_config(teacher, layers: list[int], knowledge_enhancement: dict | None) -> DraftConfig:
    """The teacher's config with only ``layers`` kept, the provenance, and the knowledge block filled in."""
    tcfg = teacher.config
    L = tcfg.num_hidden_layers
    base = tcfg.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype",
                "torch_dtype", "layer_types", "num_hidden_layers", "max_window_layers"):
        base.pop(key, None)
    layer_types = getattr(tcfg, "layer_types", None) or ["full_attention"] * L
    cfg = DraftConfig(
        **base,
        num_hidden_layers=len(layers),
        layer_types=[layer_types[i] for i in layers],
        max_window_layers=len(layers),
        kept_layers=layers,
        teacher_num_layers=L,
        teacher_name_or_path=getattr(tcfg, "_name_or_path", None) or None,
        teacher_fingerprint=teacher_fingerprint(teacher),
        knowledge_enhancement=knowledge_block(knowledge_enhancement, tcfg.hidden_size, len(layers)),
    )
    cfg._attn_implementation = tcfg._attn_implementation
    return cfg


def build_draft(teacher, layers: Sequence[int], *, keep_ends: bool = True, knowledge_enhancement: dict | None = None,
                freeze_shared: bool = False) -> DraftForCausalLM:
    """Build a draft from the teacher's layers ``layers`` (indices into its decoder stack).

    The chosen decoder layers, the token embeddings, the final norm and the
    output head are **copied** (the draft's weights are new tensors, not views
    of the teacher's), so training the draft never changes the teacher.
    ``freeze_shared=True`` sets ``requires_grad=False`` on the copied
    embeddings, final norm and head. The draft takes the teacher's dtype and
    device and is returned in eval mode.

    Args:
        teacher: a Qwen3-style causal LM (not the ``(model, tokenizer)`` tuple).
        layers: sorted, distinct indices; they must include the first and last
            layer unless ``keep_ends=False`` (used on purpose by the early-exit
            baseline, which keeps the first k layers).
        knowledge_enhancement: the knowledge block (see :data:`qdlib.settings.distill.KNOWLEDGE_DEFAULTS`);
            missing keys take the defaults.
    """
    if isinstance(teacher, tuple):
        raise TypeError("build_draft wants the teacher model, not the (model, tokenizer) tuple from load_teacher")
    layers = validate_layers(layers, teacher.config.num_hidden_layers, keep_ends=keep_ends)
    cfg = _draft_config(teacher, layers, knowledge_enhancement)
    with torch.device("meta"):
        draft = DraftForCausalLM(cfg)
    src = teacher.model
    state = {
        "model.embed_tokens.weight": src.embed_tokens.weight,
        "model.norm.weight": src.norm.weight,
        "lm_head.weight": teacher.lm_head.weight,
    }
    for j, i in enumerate(layers):
        for name, t in src.layers[i].state_dict().items():
            state[f"model.layers.{j}.{name}"] = t
    device, dtype = teacher.device, teacher.dtype
    draft = draft.to_empty(device=device)
    fusion_init = None
    if len(draft.fusion):
        # fusion weights are new: initialise them on a real device, gate at exactly 0
        with torch.device("cpu"):
            fresh = DraftForCausalLM(copy.deepcopy(cfg))
        fusion_init = {f"fusion.{k}": v for k, v in fresh.fusion.state_dict().items()}
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name in state:
                p.copy_(state[name])
            elif fusion_init is not None and name in fusion_init:
                p.copy_(fusion_init[name])
            else:
                raise RuntimeError(f"build_draft: no source for draft parameter {name}")
        # non-persistent buffers (rotary inverse frequencies) are rebuilt from the config
        rot = type(src.rotary_emb)(config=cfg).to(device)
        draft.model.rotary_emb = rot
    draft.tie_weights()
    draft.to(dtype)
    if freeze_shared:
        for p in (draft.model.embed_tokens.weight, draft.model.norm.weight, draft.lm_head.weight):
            p.requires_grad_(False)
    draft.eval()
    return draft
