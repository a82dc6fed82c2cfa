"""The teacher's forward pass for decoding, written out lean: fewer operations per token, a preallocated KV cache,
and any attention mask over the new tokens (a chain, or a token tree).

At this teacher's size (13.6M parameters) one decoding step is almost all per-operation overhead, not arithmetic
(``qdlib.timing.verify_split`` measures the split). transformers' Qwen3 forward runs about 40 small operations per
layer and builds a causal mask on every multi-token call; this engine reads the same weights and runs

    x  = rms_norm(h);  q, k, v = x @ W_qkv          one matmul for the three projections
    q, k = rms_norm(q, k) * w_qk;  rope(q, k)       both head norms and both rotations at once
    K[:, s:s+T], V[:, s:s+T] = k, v                 written into a preallocated buffer (no concatenation)
    h += o(attention(q, K[:, :s+T], V[:, :s+T], mask))
    h += down(silu(gate) * up),  gate, up = rms_norm(h) @ W_gate_up

so a step costs fewer operations, and scoring ``T`` tokens costs little more than scoring one. The fused weights
are stored transposed, ``(in, out)``: at one or two rows a step is bound by reading the weights from memory, and
``x @ W`` reads them row after row, which this machine's BLAS does about twice as fast as ``F.linear``'s
``x @ W.T`` on a weight that is not in the cache (a teacher step measured about 20% faster in an A/B run). Positions and the
mask are arguments, which is what verifying a token **tree** needs (each node attends to the cached prefix, its
ancestors and itself; its position is the prefix length plus its depth). :meth:`TargetEngine.keep` then moves the
accepted nodes' keys and values into place, so the cache again holds exactly the verified text.

    >>> eng = TargetEngine(teacher, max_len=64)
    >>> logits, h = eng([5, 6, 7], keep=1)           # a prefill of three tokens: logits of the last
    >>> tuple(logits.shape), tuple(h.shape), eng.length
    ((1, 8192), (3, 192), 3)
    >>> ref = teacher(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1]
    >>> bool(torch.allclose(logits[0], ref, atol=1e-4))
    True

The logits equal transformers' to float32 rounding (``tests/test_target_engine.py`` checks chains, trees and the
real Qwen3-0.6B's widths). Configurations it does not cover (attention biases, sliding windows, scaled RoPE) are
refused with a clear error by :func:`supports`; the decoding loops then use transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError


def supports(model) -> str | None:
    """None when :class:`TargetEngine` can run ``model``; else the reason it cannot."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in ("qwen3", "qd_draft"):
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not qwen3 (or a layer-sampled draft of one)"
    if getattr(cfg, "attention_bias", False):
        return "attention biases are not supported"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention is not supported"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not supported (only 'silu')"
    return None


class LeanStack:
    """Consecutive Qwen3 decoder layers with fused weights, run over a preallocated KV cache (batch 1).

    The one written-out decoding forward of qdlib: :class:`TargetEngine` runs the teacher's 28 layers through it, and
    :class:`qdlib.feature_draft.FeatureDraft` its own layers while drafting. ``stack(h, k, v, s, positions, mask)``
    appends the new tokens' keys and values at cache positions ``s, s + 1, ...`` of ``k``, ``v`` ``(L, 1, kvh, S, hd)``
    and returns the hidden states after the last layer ``(T, H)``; ``mask`` ``(T, s + T)`` bool (None: one token).
    The weights are copied (fused) when the stack is built: build a new stack after changing them.
    """

    def __init__(self, layers, config, inv_freq: torch.Tensor):
        self.nh, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.eps, self.H = config.rms_norm_eps, config.hidden_size
        self.inv_freq = inv_freq.float()
        self.layers = [self._fuse(layer) for layer in layers]
        self.dtype = self.layers[0][1].dtype if self.layers else torch.float32

    def _fuse(self, layer) -> tuple:
        a, mlp = layer.self_attn, layer.mlp
        w_qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
        w_qk = torch.cat([a.q_norm.weight.expand(self.nh, -1), a.k_norm.weight.expand(self.nkv, -1)]).detach()
        w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        t = lambda w: w.detach().T.contiguous()  # noqa: E731  (in, out): x @ w streams the weight row by row
        return (layer.input_layernorm.weight.detach(), t(w_qkv), w_qk, t(a.o_proj.weight),
                layer.post_attention_layernorm.weight.detach(), t(w_gu), t(mlp.down_proj.weight))

    def rope(self, positions: torch.Tensor):
        """``(cos, sin)`` ``(T, 1, hd)`` for ``positions`` ``(T,)``, the sign of rotate-half folded into ``sin``."""
        freqs = positions.float()[:, None] * self.inv_freq[None]  # (T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat([cos, cos], -1).to(self.dtype)  # (T, hd)
        sin = torch.cat([-sin, sin], -1).to(self.dtype)  # rotate_half(x) = roll(x) * sign
        return cos[:, None], sin[:, None]  # broadcast over heads

    def layer(self, li: int, h: torch.Tensor, cos, sin, mask, k: torch.Tensor, v: torch.Tensor, s: int) -> torch.Tensor:
        """Layer ``li`` over ``h`` ``(T, H)``, caching into ``k[li]``, ``v[li]`` from position ``s``."""
        ln1, w_qkv, w_qk, w_o, ln2, w_gu, w_down = self.layers[li]
        T, nq = h.shape[0], self.nh + self.nkv
        qkv = (F.rms_norm(h, (self.H,), ln1, self.eps) @ w_qkv).view(T, nq + self.nkv, self.hd)
        qk = F.rms_norm(qkv[:, :nq], (self.hd,), None, self.eps) * w_qk  # (T, nh + nkv, hd)
        qk = qk * cos + qk.roll(self.hd // 2, -1) * sin
        k[li, 0, :, s : s + T] = qk[:, self.nh :].transpose(0, 1)
        v[li, 0, :, s : s + T] = qkv[:, nq:].transpose(0, 1)
        q = qk[:, : self.nh].transpose(0, 1)[None]  # (1, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k[li, :, :, : s + T], v[li, :, :, : s + T], attn_mask=mask,
                                           enable_gqa=self.nh != self.nkv)
        h = h + y[0].transpose(0, 1).reshape(T, -1) @ w_o
        gate, up = (F.rms_norm(h, (self.H,), ln2, self.eps) @ w_gu).chunk(2, -1)
        return h + (F.silu(gate) * up) @ w_down

    def __call__(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: int, positions: torch.Tensor,
                 mask: torch.Tensor | None = None, *, taps=None, out: dict | None = None, hooks=None) -> torch.Tensor:
        """``taps``: layer indices (not the last) whose output states, RMS-normalised without a scale, go into
        ``out`` (index -> ``(T, H)``). ``hooks``: layer index -> a function of the layer's output ``(T, H)`` that
        returns the states the next layer reads (a draft's fusion blocks)."""
        cos, sin = self.rope(positions)
        last = len(self.layers) - 1
        for li in range(len(self.layers)):
            h = self.layer(li, h, cos, sin, mask, k, v, s)
            if hooks is not None and li in hooks:
                h = hooks[li](h)
            if taps is not None and li in taps and li != last:
                out[li] = F.rms_norm(h, (self.H,), None, self.eps)
        return h


def weights_key(module) -> tuple:
    """Changes whenever a parameter of ``module`` does: an in-place update (optimizer step, load) bumps its version
    counter, a move (``.to``) changes where its data lives."""
    return tuple((p._version, p.data_ptr(), p.dtype) for p in module.parameters())


def fused_weights(model) -> tuple[LeanStack, torch.Tensor]:
    """``(LeanStack of the model's layers, its head transposed (H, V))``, fused once and kept on the model: a decoding
    loop builds a :class:`TargetEngine` per generation, and fusing copies every weight. Rebuilt when a weight
    changed (:func:`weights_key`)."""
    key = weights_key(model)
    kept = getattr(model, "_qd_fused", None)
    if kept is None or kept[0] != key:
        m = model.model
        kept = (key, LeanStack(m.layers, model.config, m.rotary_emb.inv_freq),
                model.get_output_embeddings().weight.detach().T.contiguous())
        model._qd_fused = kept
    return kept[1], kept[2]


class TargetEngine:
    """A Qwen3 causal LM's decoding forward over a preallocated KV cache (batch 1).

    ``engine(tokens, keep=n)`` appends ``tokens`` after the ``engine.length`` cached positions and returns the
    logits of the last ``n`` of them ``(n, V)`` and the final hidden states of all of them ``(T, H)`` (what the
    head reads: the features a feature-fed draft needs). ``positions`` and ``mask`` override the causal chain.
    ``layers`` (teacher layer indices) returns those layers' states instead, concatenated ``(T, H * len(layers))``:
    the last layer's is the final-norm output, the others are RMS-normalised without a scale (what a live memory
    reads, :mod:`qdlib.memories`), taken from the same pass.
    """

    def __init__(self, model, max_len: int):
        reason = supports(model)
        if reason is not None:
            raise ConfigError(f"TargetEngine cannot run this model: {reason}")
        cfg = model.config
        self.max_len = int(max_len)
        if self.max_len < 1:
            raise ConfigError(f"max_len={max_len!r} must be a positive integer")
        self.eps, self.H = cfg.rms_norm_eps, cfg.hidden_size
        self.config, self.device = cfg, model.device
        m = model.model
        self.embed, self.norm_w = m.embed_tokens.weight, m.norm.weight
        self.stack, self.head = fused_weights(model)  # head: (H, V)
        shape = (len(self.stack.layers), 1, cfg.num_key_value_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=self.embed.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.embed.dtype, device=self.device)
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def crop(self, n: int) -> None:
        """Forget everything after the first ``n`` cached positions (a rollback costs nothing)."""
        self.length = min(self.length, n)

    def keep(self, start: int, rows: list[int]) -> None:
        """After a tree verification from ``start``: keep the new rows ``rows`` (in order), drop the others.

        The kept rows' keys and values move to positions ``start, start + 1, ...``; a chain's rows
        ``[0, 1, ..., m]`` are already in place, so that is only a crop.
        """
        n = len(rows)
        if rows != list(range(n)):
            idx = torch.tensor(rows, device=self.device) + start
            self.k[:, :, :, start : start + n] = self.k[:, :, :, idx]
            self.v[:, :, :, start : start + n] = self.v[:, :, :, idx]
        self.length = start + n

    def __call__(self, tokens, keep: int = 1, *, positions: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, rows: torch.Tensor | None = None, layers=None, hooks=None):
        """``(logits (keep, V), hidden (T, H))`` for ``tokens`` appended after the cache.

        ``positions`` ``(T,)`` default to ``length .. length + T - 1``; ``mask`` ``(T, T)`` bool says which new
        tokens each new token sees (default: causal), the cached prefix is always visible. ``rows``: the new
        tokens whose logits to return (default: the last ``keep``). ``layers``: return those layers' states
        (see the class) instead of the last one's. ``hooks``: ``{layer: f(h, positions) -> h}``, run after those
        layers (a draft's fusion blocks, :class:`qdlib.drafters.LiveMemoryDrafter`).
        """
        with torch.inference_mode():
            ids = torch.as_tensor(tokens, device=self.device).view(-1)
            T, s = ids.shape[0], self.length
            if s + T > self.max_len:
                raise ConfigError(f"{s} cached + {T} new tokens exceed the engine's max_len={self.max_len}")
            if positions is None:
                positions = torch.arange(s, s + T, device=self.device)
            full = None
            if T > 1:
                new = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
                full = torch.cat([torch.ones(T, s, dtype=torch.bool, device=self.device), new], 1)  # (T, s + T)
            taps = {}  # intermediate layers' states, RMS-normalised
            bound = None if hooks is None else {li: (lambda h, f=f: f(h, positions)) for li, f in hooks.items()}
            h = self.stack(self.embed[ids], self.k, self.v, s, positions, full, taps=layers, out=taps,
                           hooks=bound)  # (T, H)
            self.length = s + T
            h = F.rms_norm(h, (self.H,), self.norm_w, self.eps)
            sel = h[-keep:] if rows is None else h[rows]
            last = len(self.stack.layers) - 1
            if layers is not None and list(layers) != [last]:
                h = torch.cat([taps.get(li, h) for li in layers], -1)  # (T, H * len(layers))
            return sel @ self.head, h


# ---------------------------------------------------------------------------------------------- the loops' view


def _check_layers(model, layers) -> tuple[int, ...] | None:
    if layers is None:
        return None
    L = model.config.num_hidden_layers
    layers = tuple(layers)
    if not layers or any(not isinstance(i, int) or not 0 <= i < L for i in layers):
        raise ConfigError(f"feature layers {list(layers)} are not layers of the target; allowed: indices in 0..{L - 1}")
    return layers


class HFVerifier:
    """The target through transformers' own forward and ``DynamicCache`` (any causal LM; chains only).

    ``layers``: the features are those layers' states (:class:`TargetEngine`'s ``layers``), from the same pass."""

    trees = False

    def __init__(self, model, want_features: bool, layers=None):
        from transformers import DynamicCache

        self.model, self.want_features, self.device = model, want_features, model.device
        self.layers = _check_layers(model, layers)
        self.cache = DynamicCache(config=model.config)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def __call__(self, tokens: list[int], keep: int, positions=None, mask=None):
        """Logits ``(keep, V)`` of the last ``keep`` positions, and features ``(len(tokens), H)`` or None."""
        if positions is not None or mask is not None:
            raise ConfigError("token trees need qdlib's TargetEngine; this target runs through transformers")
        ids = torch.tensor([tokens], device=self.model.device)
        if not self.want_features:
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=keep)
            return out.logits[0], None
        out = self.model.model(input_ids=ids, cache=self.cache, use_cache=True,
                               output_hidden_states=self.layers is not None)
        h = out.last_hidden_state[0]  # (T, H)
        if self.layers is None:
            return self.model.lm_head(h[-keep:]), h
        eps = self.model.config.rms_norm_eps
        feats = [out.hidden_states[i + 1][0] if i == len(out.hidden_states) - 2
                 else F.rms_norm(out.hidden_states[i + 1][0], (h.shape[-1],), None, eps) for i in self.layers]
        return self.model.lm_head(h[-keep:]), torch.cat(feats, -1)  # (T, H * len(layers))

    def keep_rows(self, start: int, rows: list[int]) -> None:
        if rows != list(range(len(rows))):
            raise ConfigError("token trees need qdlib's TargetEngine; this target runs through transformers")
        extra = self.length - (start + len(rows))
        if extra > 0:
            self.cache.crop(-extra)


class EngineVerifier:
    """The target through :class:`TargetEngine` (chains and trees)."""

    trees = True

    def __init__(self, model, want_features: bool, max_len: int, layers=None):
        self.engine, self.want_features = TargetEngine(model, max_len), want_features
        self.layers = _check_layers(model, layers)
        self.device = self.engine.device

    @property
    def length(self) -> int:
        return self.engine.length

    def __call__(self, tokens: list[int], keep: int, positions=None, mask=None):
        logits, h = self.engine(tokens, keep, positions=positions, mask=mask, layers=self.layers)
        return logits, (h if self.want_features else None)

    def keep_rows(self, start: int, rows: list[int]) -> None:
        self.engine.keep(start, rows)


ENGINES = ("auto", "qdlib", "transformers")


def verifier(model, want_features: bool, max_len: int, engine: str = "auto", layers=None):
    """The target's forward for a decoding loop: ``engine`` "qdlib" (:class:`TargetEngine`), "transformers",
    or "auto" (qdlib's where :func:`supports` the model, else transformers'). With ``want_features`` it also returns
    the states of the tokens it scores: the last layer's, or those of ``layers`` (a drafter's ``feature_layers``)."""
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not one of {', '.join(ENGINES)}")
    reason = supports(model)
    if engine == "qdlib" and reason is not None:
        raise ConfigError(f"engine='qdlib' cannot run this model: {reason}; use engine='transformers'")
    if engine == "transformers" or reason is not None:
        return HFVerifier(model, want_features, layers)
    return EngineVerifier(model, want_features, max_len, layers)
