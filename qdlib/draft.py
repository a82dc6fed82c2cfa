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
import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel, Qwen3Config
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3RMSNorm

from . import paths
from .errors import ConfigError, QdError
from .feature_draft import is_feature_draft_folder, load_feature_draft
from .fusion import GATES, GatedFusion, Memory, RMSNorm
from .io import atomic_dir, check_model_folder, write_json_atomic
from .knowledge import load_knowledge_cache, teacher_fingerprint
from .memories import MEMORY_KINDS, fusion_inputs, is_live, resolve
from .models import default_teacher_name, is_bundled, quiet_loading, resolve_device, resolve_dtype
from .schema import Boolean, Choice, Integer, IntList, Number, OrNull, field_problems, raise_problems, setting, unknown_key_problems

@dataclasses.dataclass
class KnowledgeConfig:
    """The ``knowledge_enhancement`` block: one schema for ``build_draft``, the YAML configs and ``--set``."""

    enabled: bool = setting(False, Boolean(), "add the knowledge path at all")
    cache_dim: int | None = setting(None, OrNull(Integer(1)),
                                    "width of the cross-attention; null: half the hidden size (512 for Qwen3-0.6B)")
    num_heads: int | None = setting(None, OrNull(Integer(1)),
                                    "cross-attention heads; null: cache_dim // 64 (8 for Qwen3-0.6B), at least 1")
    fusion_gate: str = setting("channel", Choice(*GATES), "channel (one tanh gate per hidden channel) or scalar")
    after_layers: list[int] | None = setting(None, OrNull(IntList(1, "draft layer positions")),
                                             "draft layer positions (0..k-1) followed by fusion; null: the middle and the last")
    memory_size: int | None = setting(None, OrNull(Integer(1)), "width of the cached states; null: the teacher's hidden size")
    gate_init: float = setting(0.0, Number(0.0, 1.0, high_open=True),
                               "tanh(gate) at the start: 0 (default) makes the draft exactly the plain draft; a small "
                               "value such as 0.1 lets the cross-attention receive gradient from the first step")
    memory: str = setting("static", Choice(*MEMORY_KINDS),
                          "what the fusion blocks read: static (a knowledge cache of items) or live (the teacher's "
                          "states of the verified text, qdlib.memories)")
    memory_layers: list[int] | None = setting(None, OrNull(IntList(1, "teacher layer indices")),
                                              "teacher layers a live memory reads (concatenated); null: the last "
                                              "(the final-norm output the head reads)")
    recency: bool | None = setting(None, OrNull(Boolean()),
                                   "a learned recency bias per cross-attention head (a live memory's slots are "
                                   "positions of the text); null: on for a live memory, off for a static one")


KNOWLEDGE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KnowledgeConfig)}  # the block's defaults, by name


def knowledge_block(block: dict | None, hidden_size: int, num_layers: int) -> dict:
    """Fill a ``knowledge_enhancement`` block with defaults and validate it (:class:`KnowledgeConfig`).

    >>> knowledge_block({"enabled": True}, 1024, 6)["cache_dim"]
    512
    >>> knowledge_block({"enabled": True}, 1024, 6)["after_layers"]
    [2, 5]
    """
    block = dict(block or {})
    raise_problems(unknown_key_problems(KnowledgeConfig, "knowledge_enhancement", block))
    cfg = KnowledgeConfig(**block)
    raise_problems(field_problems(cfg, "knowledge_enhancement"))
    out = dataclasses.asdict(cfg)
    if out["cache_dim"] is None:
        out["cache_dim"] = max(64, hidden_size // 2)
    if out["num_heads"] is None:
        out["num_heads"] = max(1, out["cache_dim"] // 64)
    layers = out["memory_layers"]
    if layers is not None and len(set(layers)) != len(layers):
        raise ConfigError(f"knowledge_enhancement.memory_layers={layers!r} must be distinct teacher layer indices")
    if out["memory_size"] is None:
        out["memory_size"] = hidden_size * (len(layers) if out["memory"] == "live" and layers else 1)
    if out["recency"] is None:
        out["recency"] = out["memory"] == "live"
    elif out["recency"] and out["memory"] != "live":
        raise ConfigError("knowledge_enhancement.recency=True needs memory: live (a static cache's slots are items' "
                          "tokens, not positions of the text); allowed with memory: static are false or null")
    if out["cache_dim"] % out["num_heads"]:
        raise ConfigError(f"knowledge_enhancement.cache_dim={out['cache_dim']} is not divisible by "
                          f"num_heads={out['num_heads']}")
    if out["after_layers"] is None:
        out["after_layers"] = sorted({(num_layers - 1) // 2, num_layers - 1})
    after = list(out["after_layers"])
    if not after or any(not isinstance(i, int) or not 0 <= i < num_layers for i in after) or len(set(after)) != len(after):
        raise ConfigError(f"knowledge_enhancement.after_layers={after!r} must be distinct draft layer positions in "
                          f"0..{num_layers - 1}")
    out["after_layers"] = sorted(after)
    return out


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
    ``knowledge_enhancement`` block (see :data:`KNOWLEDGE_DEFAULTS`).
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
        knowledge_enhancement: the knowledge block (see :data:`KNOWLEDGE_DEFAULTS`);
            missing keys take the defaults.
    """
    if isinstance(teacher, tuple):
        raise TypeError("build_draft wants the teacher model, not the (model, tokenizer) tuple from load_teacher")
    tcfg = teacher.config
    L = tcfg.num_hidden_layers
    layers = validate_layers(layers, L, keep_ends=keep_ends)
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


# ----------------------------------------------------------------------------- loading a trained draft


class DraftLoadError(QdError, RuntimeError):
    """No draft could be loaded (missing folder, or no reference draft for this teacher)."""


def load_draft(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None, dtype=None, *,
               progress: bool = False):
    """The draft model alone, in eval mode (float32 on CPU), with its knowledge cache attached.

    No name gives the course's reference draft (``outputs/reference_draft``) when the
    default teacher is the bundled one; a folder written by ``qd distill --export`` (or
    any ``save_pretrained`` folder of a :class:`qdlib.DraftForCausalLM`) loads that draft.
    A ``knowledge_cache/`` subfolder is attached with ``set_knowledge``, so
    ``draft(input_ids=...)``, ``generate``, ``assistant_model=draft`` and
    ``speculative_generate(teacher, draft, ids)`` all work as they are. Loading is quiet
    unless ``progress=True``.

    ``"fast"`` gives the course's fast draft (``outputs/fast_draft``), a feature-fed draft
    (:mod:`qdlib.feature_draft`) that reads the teacher's hidden states: it works with
    ``speculative_generate(teacher, draft, ids)`` (with its own tuned gamma), not as an
    ``assistant_model``. Any folder written by :func:`qdlib.feature_draft.save_feature_draft` loads the same way.
    """
    if name_or_path == "fast":
        if not is_bundled(default_teacher_name()):
            raise DraftLoadError("the fast draft was trained for the bundled teacher; with QD_MODEL set, train one "
                                 "for your teacher (qdlib.feature_train) and pass its folder")
        name_or_path = paths.FAST_DRAFT_DIR
    if name_or_path is None:
        teacher = default_teacher_name()
        if not is_bundled(teacher):
            raise DraftLoadError(
                f"no reference draft exists for the teacher {teacher!r} (QD_MODEL): the course ships one only for the "
                f"bundled teacher. Distil one with `qd distill --config qwen3 --export <folder>` and pass that folder "
                f"to load_draft, or unset QD_MODEL")
        name_or_path = paths.DRAFT_DIR
    folder = Path(name_or_path)
    if not (folder / "config.json").is_file():
        raise DraftLoadError(f"{folder} is not a draft folder (no config.json); expected the output of "
                             f"`qd distill --export` or DraftForCausalLM.save_pretrained")
    check_model_folder(folder, what="draft", error=DraftLoadError, fix="export it again (`qd distill --export "
                       "FOLDER`, or qdlib.feature_train.export_fast_draft for a feature-fed draft)")
    dev = resolve_device(device)
    if is_feature_draft_folder(folder):
        return load_feature_draft(folder, device=dev, dtype=resolve_dtype(dtype, dev) or torch.float32)
    with quiet_loading(progress):  # no "Loading weights" bar unless asked
        draft = DraftForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, dev) or torch.float32).to(dev).eval()
    kb = draft.config.knowledge_enhancement
    if kb.get("enabled") and kb.get("memory") == "live":
        draft.set_knowledge("live")  # trained to read the teacher's states of the verified text
    elif (folder / "knowledge_cache").is_dir() and kb.get("enabled"):
        draft.set_knowledge(load_knowledge_cache(folder / "knowledge_cache"))
    return draft


PROVENANCE_KEYS = ("kept_layers", "teacher_num_layers", "teacher_name_or_path", "teacher_fingerprint")
QD_ONLY_KEYS = (*PROVENANCE_KEYS,
                "knowledge_enhancement", "architectures", "model_type", "auto_map", "transformers_version")


def export_qwen3(draft: DraftForCausalLM, out_dir: str | os.PathLike, tokenizer=None) -> dict:
    """Write ``draft`` as a plain ``Qwen3ForCausalLM`` folder that any Qwen3 runtime loads (transformers' Auto
    classes, and serving engines such as vLLM or SGLang as a draft model), with ``tokenizer`` beside it.

    A layer-sampled draft without a knowledge path *is* a plain Qwen3 of k layers: same weights, same logits. A
    draft with fusion blocks is exported without them, which equals the draft with its cache detached; the note
    returned (and kept in ``qd_provenance.json`` with the kept layers and the teacher's fingerprint) says so and how
    open its gates were. The folder is written atomically. Returns the provenance record.
    """
    from transformers import Qwen3ForCausalLM

    cfg = {k: v for k, v in draft.config.to_dict().items() if k not in QD_ONLY_KEYS}
    qwen = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(draft.dtype)
    state = {k: v for k, v in draft.state_dict().items() if not k.startswith("fusion.")}
    missing, unexpected = qwen.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not qwen.config.tie_word_embeddings]
    if missing or unexpected:  # pragma: no cover - the two layouts agree by construction; say so if they drift
        raise QdError(f"the draft's weights do not map onto Qwen3 (missing {missing}, unexpected {unexpected})")
    qwen.tie_weights()
    note = "a plain Qwen3: the same logits as the draft"
    if len(draft.fusion):
        gate = max(torch.tanh(f.gate).abs().max().item() for f in draft.fusion.values())
        note = (f"the knowledge path is dropped ({len(draft.fusion)} fusion blocks, largest |tanh(gate)| {gate:.4f}): "
                f"the export equals the draft with its cache detached")
    record = {k: draft.config.to_dict().get(k) for k in PROVENANCE_KEYS} | {"note": note}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        qwen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "qd_provenance.json", record)
    return record
