"""A draft that reads the teacher: the feature-fed draft (EAGLE, Li et al. 2024), notebook 07.

A layer-sampled draft re-reads the whole context with its own layers. The
feature-fed draft instead takes what the teacher has already computed: at
position ``i`` it receives the teacher's last hidden state ``f[i-1]`` (the
vector the teacher's head turned into token ``x[i]``) together with the
embedding of ``x[i]`` itself, and predicts the teacher's next hidden state
``f[i]``; the teacher's own head turns that into a distribution for ``x[i+1]``::

    z[i]  = fc([f[i-1] ; embed(x[i])])            (B, T, 2H) -> (B, T, H)
    z[i]  = decoder_layer(z[<= i])                one or two Qwen3 layers, causal
    f'[i] = norm(z[i])                            the predicted teacher feature
    q[i]  = softmax(head(f'[i]))                  the teacher's head, frozen

While drafting, the draft has no teacher feature for the tokens it has just
proposed, so it feeds its own prediction ``f'`` instead; after the teacher's
verification pass the true features replace them (:class:`FeatureDrafter` in
:mod:`qdlib.speculative` does this bookkeeping).

The head may be *trimmed* to the most frequent tokens (FR-Spec): the draft then
scores only ``draft_vocab`` rows; the teacher still verifies over the whole
vocabulary, so the output is unchanged (greedy: identical; sampling: the draft's
q is zero outside the subset, which the acceptance rule handles).

    >>> fast = build_feature_draft(teacher)              # one layer, copied from the teacher's last
    >>> f = teacher_features(teacher, input_ids)         # (1, T, H): what the teacher's head reads
    >>> pred, logits = fast(f[:, :-1], input_ids[:, 1:])  # position i reads (f[i-1], x[i])
    >>> tuple(pred.shape) == tuple(f[:, 1:].shape), logits.shape[-1] == teacher.config.vocab_size
    (True, True)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .errors import ConfigError, DamagedFileError, MissingFileError
from .io import atomic_dir, how_to_restore, load_safetensors, read_json, write_json_atomic
from .target_engine import LeanStack, weights_key

FORMAT = "qd_feature_draft"
HEAD_TOKENS = "head_tokens.json"  # optional: the token ids a full-vocabulary head is trimmed to when loaded


@dataclass
class FeatureDraftConfig:
    """Shape of a feature-fed draft; ``teacher`` is the teacher's Qwen3 config as a dict."""

    teacher: dict
    num_layers: int = 1
    init_layers: tuple = ()  # teacher layers the draft's layers were copied from (empty: random)
    draft_vocab: int | None = None  # rows of the (trimmed) head; None = the whole vocabulary
    gamma: int | None = None  # tuned drafting settings carried with the draft (None: the caller's default)
    confidence_threshold: float | None = None
    tree: dict | None = None  # a qdlib.trees.TreeShape as a dict: the draft grows token trees (None: chains)
    pause: dict | None = None  # qdlib.combined_drafters.Pausing's settings: pause speculation where it stops paying

    def get_text_config(self, *args, **kwargs):  # what transformers' generate() asks an assistant's config first
        _not_an_assistant()

    def qwen3(self) -> Qwen3Config:
        return Qwen3Config(**{k: v for k, v in self.teacher.items() if k not in ("architectures", "transformers_version")})


def _not_an_assistant():
    raise TypeError("a feature-fed draft cannot serve as transformers' assistant_model: it reads the teacher's "
                    "hidden states, which generate() does not pass to an assistant. Use "
                    "qdlib.speculative_generate(teacher, draft, input_ids) instead.")


class KVBuffer:
    """A preallocated key/value cache for the draft's layers; ``crop(n)`` is a rollback to ``n`` positions."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (num_layers, 1, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, 1, kvh, S, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def crop(self, n: int) -> None:
        self.length = min(self.length, n)


class FeatureDraft(nn.Module):
    """Feature-fed draft: ``forward(features, input_ids)`` -> ``(predicted features, logits)``."""

    needs_target_features = True  # qdlib.speculative feeds it the teacher's verified hidden states

    def __init__(self, config: FeatureDraftConfig):
        super().__init__()
        self.config = config
        qc = config.qwen3()
        H = qc.hidden_size
        self.embed = nn.Embedding(qc.vocab_size, H)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(qc, i) for i in range(config.num_layers))
        self.norm = Qwen3RMSNorm(H, eps=qc.rms_norm_eps)
        self.rotary = Qwen3RotaryEmbedding(qc)
        Vd = config.draft_vocab or qc.vocab_size
        self.head = nn.Linear(H, Vd, bias=False)
        self.register_buffer("vocab_ids", torch.arange(Vd), persistent=True)  # draft row -> token id
        self.n_heads, self.n_kv, self.head_dim = qc.num_attention_heads, qc.num_key_value_heads, qc.head_dim
        self.vocab_size = qc.vocab_size
        self.max_len = qc.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    # ------------------------------------------------------------------ the layer, written out
    def _attend(self, layer, x, cos, sin, kv: KVBuffer | None, li: int, mask: torch.Tensor | None = None):
        """Self-attention of one Qwen3 layer over ``x`` ``(B, T, H)``, with an optional cache (batch 1)."""
        at = layer.self_attn
        B, T, _ = x.shape
        q = at.q_norm(at.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = at.k_norm(at.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, kvh, T, hd)
        v = at.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hd)
        else:
            s = kv.length
            kv.k[li, :, :, s : s + T] = k
            kv.v[li, :, :, s : s + T] = v
            K, Vv = kv.k[li, :, :, : s + T], kv.v[li, :, :, : s + T]  # (1, kvh, s+T, hd)
            if mask is None and T > 1:  # new token t may see cached positions and new tokens up to itself
                mask = torch.ones(T, s + T, dtype=torch.bool, device=x.device).tril(diagonal=s)  # (T, s+T)
            y = F.scaled_dot_product_attention(q, K, Vv, attn_mask=mask, enable_gqa=True)
        return at.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H)

    def hidden(self, features: torch.Tensor, input_ids: torch.Tensor, kv: KVBuffer | None = None,
               positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted teacher features ``(B, T, H)`` from teacher features ``(B, T, H)`` and tokens ``(B, T)``.

        ``features[:, t]`` must be the teacher's feature at the position *before* ``input_ids[:, t]``.
        With ``kv`` (batch 1) the new positions follow the cached ones and are appended to the cache;
        ``positions`` ``(T,)`` and ``mask`` ``(T, cached + T)`` bool (which cached and new entries each new
        token sees) override the causal chain, as drafting a token tree needs.
        """
        start = kv.length if kv is not None else 0
        T = input_ids.shape[1]
        x = self.fc(torch.cat([features.to(self.fc.weight.dtype), self.embed(input_ids)], dim=-1))  # (B, T, H)
        pos = (torch.arange(start, start + T, device=x.device) if positions is None else positions)[None]  # (1, T)
        if kv is not None and not torch.is_grad_enabled():  # drafting: the lean forward, same numbers
            if mask is None and T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            h = self._lean_stack()(x[0], kv.k, kv.v, start, pos[0], mask)  # (T, H)
            kv.length = start + T
            return F.rms_norm(h, h.shape[-1:], self.norm.weight, self.norm.variance_epsilon)[None]
        cos, sin = self.rotary(x, pos)  # (1, T, hd) each
        for li, layer in enumerate(self.layers):
            x = x + self._attend(layer, layer.input_layernorm(x), cos, sin, kv, li, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if kv is not None:
            kv.length = start + T
        return self.norm(x)

    def _lean_stack(self) -> LeanStack:
        """The layers' fused copy for drafting (:class:`qdlib.target_engine.LeanStack`) and the head's transposed
        copy, rebuilt when a weight changed (:func:`qdlib.target_engine.weights_key`)."""
        key = weights_key(self)
        if getattr(self, "_lean", None) is None or self._lean[0] != key:
            stack = LeanStack(self.layers, self.config.qwen3(), self.rotary.inv_freq)
            stack.head = self.head.weight.detach().T.contiguous()  # (H, Vd): x @ head streams it row by row
            self._lean = (key, stack)
        return self._lean[1]

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, kv: KVBuffer | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """``(predicted features (B, T, H), logits over the draft vocabulary (B, T, Vd))``."""
        f = self.hidden(features, input_ids, kv, positions, mask)
        if kv is not None and not torch.is_grad_enabled():  # hidden() has just checked the lean copy is current
            return f, f @ self._lean[1].head
        return f, self.head(f)

    def new_cache(self, max_len: int | None = None) -> KVBuffer:
        p = self.fc.weight
        return KVBuffer(len(self.layers), self.n_kv, self.head_dim, max_len or self.max_len, p.dtype, p.device)

    def full_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Scatter draft-vocabulary logits ``(..., Vd)`` into the full vocabulary ``(..., V)`` (-inf elsewhere)."""
        if self.head.out_features == self.vocab_size:
            return draft_logits
        out = draft_logits.new_full((*draft_logits.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy(-1, self.vocab_ids, draft_logits)

    @property
    def generation_config(self):
        _not_an_assistant()

    # ------------------------------------------------------------------ trainable parameters
    def trainable_parameters(self):
        """Everything but the embedding and the head, which stay the teacher's."""
        return [p for n, p in self.named_parameters() if not n.startswith(("embed.", "head."))]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


# ---------------------------------------------------------------------------------------------- building


def teacher_features(teacher, input_ids: torch.Tensor, **kw):
    """The teacher's last hidden states (after its final norm: what its head reads) ``(B, T, H)``."""
    return teacher.model(input_ids=input_ids, **kw).last_hidden_state


def build_feature_draft(teacher, num_layers: int = 1, *, init_from_teacher: bool = True,
                        draft_vocab: int | None = None, token_counts: torch.Tensor | None = None) -> FeatureDraft:
    """A feature-fed draft for ``teacher``: its embedding, head and final norm copied (and frozen, but the norm).

    ``init_from_teacher`` copies the teacher's last ``num_layers`` decoder layers into the draft's layers;
    ``fc`` starts as a pass-through ``z = f + e`` of the feature plus the token embedding.
    ``draft_vocab`` trims the head to the ``draft_vocab`` most frequent tokens of ``token_counts`` ``(V,)``.
    """
    qc = teacher.config
    if not isinstance(num_layers, int) or not 1 <= num_layers <= qc.num_hidden_layers:
        raise ConfigError(f"num_layers={num_layers!r} must be an integer in 1..{qc.num_hidden_layers}")
    if draft_vocab is not None:
        if not isinstance(draft_vocab, int) or not 1 <= draft_vocab <= qc.vocab_size:
            raise ConfigError(f"draft_vocab={draft_vocab!r} must be an integer in 1..{qc.vocab_size} (or None)")
        if token_counts is None or token_counts.shape != (qc.vocab_size,):
            raise ConfigError(f"draft_vocab needs token_counts, a ({qc.vocab_size},) tensor of token frequencies")
    first = qc.num_hidden_layers - num_layers
    cfg = FeatureDraftConfig(teacher=qc.to_dict(), num_layers=num_layers, draft_vocab=draft_vocab,
                             init_layers=tuple(range(first, qc.num_hidden_layers)) if init_from_teacher else ())
    draft = FeatureDraft(cfg)
    t = teacher.model
    with torch.no_grad():
        draft.embed.weight.copy_(t.embed_tokens.weight)
        head = teacher.get_output_embeddings().weight  # (V, H)
        if draft_vocab is not None:
            ids = torch.argsort(token_counts.double(), descending=True, stable=True)[:draft_vocab].sort().values
            draft.vocab_ids.copy_(ids)
            head = head[ids]
        draft.head.weight.copy_(head)
        draft.norm.weight.copy_(t.norm.weight)
        H = qc.hidden_size
        draft.fc.weight.copy_(torch.cat([torch.eye(H), torch.eye(H)], dim=1))  # z = f + e
        if init_from_teacher:
            for i, layer in enumerate(draft.layers):
                layer.load_state_dict(t.layers[first + i].state_dict())
    for p in (*draft.embed.parameters(), *draft.head.parameters()):
        p.requires_grad_(False)
    return draft.to(device=teacher.device, dtype=next(teacher.parameters()).dtype)


def frequent_tokens(token_counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ids of the ``n`` most frequent tokens of ``token_counts`` ``(V,)``, ascending (ties: the lower id)."""
    return torch.argsort(token_counts.double(), descending=True, stable=True)[:n].sort().values


def trim_to(draft: FeatureDraft, ids) -> FeatureDraft:
    """A copy of the full-vocabulary ``draft`` whose head scores only the token ids ``ids`` (FR-Spec)."""
    V = draft.vocab_size
    if draft.head.out_features != V:
        raise ValueError("this draft's head is already trimmed; trim the full-vocabulary draft")
    ids = torch.as_tensor(ids, dtype=torch.long).sort().values
    if ids.numel() == 0 or ids.unique().numel() != ids.numel() or int(ids[0]) < 0 or int(ids[-1]) >= V:
        raise ConfigError(f"the head's token ids must be distinct ids in 0..{V - 1} (got {ids.numel()} ids)")
    cfg = FeatureDraftConfig(**{**asdict(draft.config), "draft_vocab": int(ids.numel())})
    new = FeatureDraft(cfg).to(device=draft.device, dtype=draft.fc.weight.dtype)
    state = {k: v for k, v in draft.state_dict().items() if not k.startswith(("head.", "vocab_ids"))}
    new.load_state_dict(state, strict=False)
    with torch.no_grad():
        new.head.weight.copy_(draft.head.weight[ids.to(draft.device)])
        new.vocab_ids.copy_(ids)
    for p, q in zip(new.parameters(), draft.parameters()):
        p.requires_grad_(q.requires_grad)
    return new.train(draft.training)


def trim_vocab(draft: FeatureDraft, token_counts: torch.Tensor, draft_vocab: int) -> FeatureDraft:
    """A copy of ``draft`` whose head scores only the ``draft_vocab`` most frequent tokens (FR-Spec)."""
    V = draft.vocab_size
    if not isinstance(draft_vocab, int) or not 1 <= draft_vocab <= V:
        raise ConfigError(f"draft_vocab={draft_vocab!r} must be an integer in 1..{V}")
    return trim_to(draft, frequent_tokens(token_counts, draft_vocab))


# ---------------------------------------------------------------------------------------------- files


def save_feature_draft(draft: FeatureDraft, path: str | os.PathLike, dtype=torch.bfloat16,
                       extra: dict | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (bf16 by default) and ``extra`` JSON files (name -> object)
    into the folder ``path``, atomically: the folder is either the old one or the complete new one."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path) as tmp:
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
                 for k, v in draft.state_dict().items() if not k.startswith("rotary.")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        write_json_atomic(tmp / "config.json", {"format": FORMAT, **asdict(draft.config)})
        for name, obj in (extra or {}).items():
            write_json_atomic(tmp / name, obj)
    return path


def is_feature_draft_folder(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save_feature_draft`."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("format") == FORMAT


def load_feature_draft(path: str | os.PathLike, device=None, dtype=torch.float32, *, trim_head: bool = True
                       ) -> FeatureDraft:
    """Load a draft written by :func:`save_feature_draft` (safetensors only: nothing is unpickled).

    A folder may also hold ``head_tokens.json`` (``{"ids": [...]}``): the head is then trimmed to those tokens
    (:func:`trim_to`), the same weights scoring fewer tokens, with no second copy of the weights;
    ``trim_head=False`` loads the full head.

    A missing folder raises :class:`~qdlib.errors.MissingFileError`; a damaged file, one that is not this format, or
    weights that do not fit it raise :class:`~qdlib.errors.DamagedFileError`, naming the file.
    """
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise MissingFileError(f"{path} is not a feature-draft folder (no config.json)")
    fix = "export it again (qdlib.feature_train.export_fast_draft, or save_feature_draft)"
    raw = read_json(cfg_path, what="feature-draft config", fix=fix)
    if raw.pop("format", None) != FORMAT:
        raise DamagedFileError(f"{cfg_path} is not a {FORMAT} config; {how_to_restore(cfg_path, fix)}")
    raw["init_layers"] = tuple(raw.get("init_layers", ()))
    draft = FeatureDraft(FeatureDraftConfig(**raw))
    state = load_safetensors(path / "model.safetensors", what="feature-draft weights", fix=fix)
    draft.load_state_dict(state, strict=False)
    missing = set(draft.state_dict()) - set(state) - {k for k in draft.state_dict() if k.startswith("rotary.")}
    if missing:
        raise DamagedFileError(f"{path}/model.safetensors lacks {sorted(missing)}; "
                               f"{how_to_restore(path / 'model.safetensors', fix)}")
    for p in draft.parameters():
        p.requires_grad_(False)
    draft = draft.to(device=device or "cpu", dtype=dtype).eval()
    if trim_head and (path / HEAD_TOKENS).is_file():  # the head trimmed at load to the ids the folder lists
        ids = read_json(path / HEAD_TOKENS, what="the draft head's token ids", fix=fix).get("ids")
        if not isinstance(ids, list) or draft.head.out_features != draft.vocab_size:
            raise DamagedFileError(f"{path / HEAD_TOKENS} must hold {{'ids': [...]}} for a full-vocabulary draft; "
                                   f"{how_to_restore(path / HEAD_TOKENS, fix)}")
        draft = trim_to(draft, ids).eval()
    return draft
