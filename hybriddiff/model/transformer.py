"""Diffusion transformer (DiT with rotary embeddings) in Flax NNX, as used by SEDD, MDLM, BD3-LM and
seed 000 (App. E): token embedding over ``V = N + 1`` (MASK = N), pre-LayerNorm blocks with optional adaLN
time conditioning on the per-position noise level sigma_bar, MLP x4 with GELU, residual dropout, and an
output over the N ordinary tokens only.

adaLN. The conditioning vector ``c = SiLU(MLP(sinusoidal(sigma_bar)))`` [B, S, cond_dim] (one per
position, since every position has its own noise level) gives per-token shift / scale / gate vectors
[B, S, D] through zero-initialised linear maps. A block computes

    x = x + (1 + gate_attn) * Attention(LN(x) * (1 + scale_attn) + shift_attn)
    x = x + (1 + gate_mlp)  * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

and the output layer ``LN(x) * (1 + scale) + shift``. The gates enter as ``1 + gate`` (unlike DiT's
adaLN-Zero, whose zero gate makes a fresh block the identity), so a freshly initialised time-conditioned
model is exactly the plain pre-LN transformer: it ignores sigma_bar until training moves the modulation.

Outputs (``config.output``):
  * ``"log_probs"``: log-softmax over the N ordinary tokens, float32 [B, S, N].
  * ``"score"``: SEDD log-scores ``log s(x_t -> y)`` for the N ordinary y, float32 [B, S, N], with
    SEDD's ``scale_by_sigma`` applied at MASK positions only: there the raw output r is shifted to
    ``r - log(expm1(sigma_bar)) - log(N)``, so that a raw output near 0 means
    ``p(y | unmasked) ~ 1/N`` times the absorbing factor ``exp(-sigma_bar) / (1 - exp(-sigma_bar))`` of
    seed 000 App. B.5 (Ou et al.). At ordinary positions the raw output is the log-score (no analytic
    factor is known for the hybrid process; the time conditioning learns it). The entry of the current
    token is set to exactly 0 (``log s(x -> x) = 0``); at MASK positions no entry is the current token.
    sigma_bar is floored at the smallest normal float32 before the shift so that it stays finite.
    The state ``x_t`` and ``sigma_bar`` the score is about are the cell's own input (ALIGNED) unless
    ``score_tokens`` / ``score_sigma_bar`` are given: a SHIFTED cell (seed 000 Fig. 5b) predicts the
    next position, so its caller passes that position's state.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybriddiff.model import axes
from hybriddiff.model.attention import Mask, check_backend, dot_product_attention
from hybriddiff.model.cache import KVCache, init_cache
from hybriddiff.model.config import DiTConfig
from hybriddiff.model.layers import (MLP, LayerNorm, Modulation, TimeEmbedding, TokenEmbedding,
                                     apply_rotary, make_param, modulate, normal_init, rotary_angles)

ACTIVATION = (axes.BATCH, axes.LENGTH, axes.EMBED)
HEAD_ACTIVATION = (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block with optional per-token adaLN modulation."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, hd = config.d_model, config.num_heads, config.head_dim
        self.norm_attention = LayerNorm(config, rngs=rngs)
        self.qkv = make_param(rngs, normal_init(1.0 / math.sqrt(d)), (d, 3, h, hd),
                              (axes.EMBED, None, axes.HEADS, axes.KV), config.param_dtype)
        self.attention_out = make_param(rngs, normal_init(1.0 / math.sqrt(d)), (h, hd, d),
                                        (axes.HEADS, axes.KV, axes.EMBED), config.param_dtype)
        self.norm_mlp = LayerNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.modulation = Modulation(config, 6, rngs=rngs) if config.time_conditioning else None
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x: jax.Array, cond: jax.Array | None, cos: jax.Array, sin: jax.Array, mask: Mask,
                 dropout_key: jax.Array | None, *, implementation: str,
                 past: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One block.

        Args:
          x: residual stream [B, S, D] float32.
          cond: conditioning [B, S, cond_dim] or None (no time conditioning).
          cos, sin: rotary tables [B|1, S, hd/2].
          mask: [S, K] or [B, S, K] bool over the keys (past keys first, then the S new ones).
          dropout_key: PRNG key of this block's dropout, or None for no dropout.
          past: cached (keys, values) [B, T, H, hd] placed before this input's keys, or None.
        Returns:
          (new residual stream [B, S, D] float32, (keys, values) [B, S, H, hd] of this input).
        """
        dtype = self.config.dtype
        deterministic = dropout_key is None
        keys_attention, keys_mlp = (None, None) if deterministic else jax.random.split(dropout_key)
        if self.modulation is not None:
            assert cond is not None
            mods = self.modulation(cond)  # [B, S, 6, D]
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mods[:, :, i] for i in range(6))
        h = self.norm_attention(x)
        if self.modulation is not None:
            h = modulate(h, shift_a, scale_a)
        qkv = jnp.einsum("bsd,dthk->tbshk", h, self.qkv[...].astype(dtype))  # [3, B, S, H, hd]
        q = axes.constrain(apply_rotary(qkv[0], cos, sin), HEAD_ACTIVATION)
        k = axes.constrain(apply_rotary(qkv[1], cos, sin), HEAD_ACTIVATION)
        v = axes.constrain(qkv[2], HEAD_ACTIVATION)
        keys, values = k, v
        if past is not None:
            keys = jnp.concatenate([past[0].astype(dtype), k], axis=1)
            values = jnp.concatenate([past[1].astype(dtype), v], axis=1)
        attended = dot_product_attention(q, keys, values, mask, implementation=implementation,
                                         interpret=self.config.pallas_interpret,
                                         query_chunk=self.config.attention_query_chunk)  # [B, S, H, hd]
        attended = axes.constrain(attended, HEAD_ACTIVATION)
        branch = jnp.einsum("bshk,hkd->bsd", attended, self.attention_out[...].astype(dtype))
        branch = self.dropout(branch, deterministic=deterministic, rngs=keys_attention)
        if self.modulation is not None:
            branch = (1 + gate_a) * branch
        x = axes.constrain(x + branch.astype(jnp.float32), ACTIVATION)
        h = self.norm_mlp(x)
        if self.modulation is not None:
            h = modulate(h, shift_m, scale_m)
        branch = self.dropout(self.mlp(h), deterministic=deterministic, rngs=keys_mlp)
        if self.modulation is not None:
            branch = (1 + gate_m) * branch
        x = axes.constrain(x + branch.astype(jnp.float32), ACTIVATION)
        return x, (k, v)


def log_expm1(x: jax.Array) -> jax.Array:
    """``log(exp(x) - 1)`` for x > 0, stable for small and large x: ``x + log(-expm1(-x))``."""
    return x + jnp.log(-jnp.expm1(-x))


class DiT(nnx.Module):
    """The diffusion transformer. See the module docstring for the architecture and the outputs."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        check_backend(config.attention_impl, config.pallas_interpret)
        self.config = config
        self.embedding = TokenEmbedding(config, rngs=rngs)
        self.time_embedding = TimeEmbedding(config, rngs=rngs) if config.time_conditioning else None
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.dropout_rngs = rngs["dropout"].fork()
        self.final_norm = LayerNorm(config, rngs=rngs)
        self.final_modulation = Modulation(config, 2, rngs=rngs) if config.time_conditioning else None
        self.head = None if config.tied_embedding else make_param(
            rngs, normal_init(1.0 / math.sqrt(config.d_model)),
            (config.d_model, config.padded_vocab_size), (axes.EMBED, axes.VOCAB), config.param_dtype)

    # ----------------------------------------------------------------------------------------------
    def _check_inputs(self, tokens: jax.Array, positions: jax.Array,
                      sigma_bar: jax.Array | None) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, length], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        batch, length = tokens.shape
        if positions.shape not in ((length,), (batch, length)):
            raise ValueError(f"positions must have shape [{length}] or [{batch}, {length}], got "
                             f"{tuple(positions.shape)}")
        if self.config.needs_sigma_bar:
            if sigma_bar is None:
                raise ValueError("sigma_bar is None but the config needs it (time_conditioning="
                                 f"{self.config.time_conditioning}, weighted_embedding="
                                 f"{self.config.weighted_embedding}, output={self.config.output!r})")
            if sigma_bar.shape != (batch, length):
                raise ValueError(f"sigma_bar must have shape [{batch}, {length}], got "
                                 f"{tuple(sigma_bar.shape)}")

    def _score_context(self, tokens: jax.Array, sigma_bar: jax.Array | None,
                       score_tokens: jax.Array | None, score_sigma_bar: jax.Array | None
                       ) -> tuple[jax.Array, jax.Array | None]:
        """The ``(x_t [B, S], sigma_bar [B, S])`` the score head reads: the inputs unless given."""
        for name, value in (("score_tokens", score_tokens), ("score_sigma_bar", score_sigma_bar)):
            if value is not None and value.shape != tokens.shape:
                raise ValueError(f"{name} must have shape {tuple(tokens.shape)} (one per cell), got "
                                 f"{tuple(value.shape)}")
        if score_tokens is not None and not jnp.issubdtype(score_tokens.dtype, jnp.integer):
            raise ValueError(f"score_tokens must be an integer array, got {score_tokens.dtype}")
        return (tokens if score_tokens is None else score_tokens,
                sigma_bar if score_sigma_bar is None else score_sigma_bar)

    def _prepare(self, tokens: jax.Array, positions: jax.Array, sigma_bar: jax.Array | None):
        """Embedded inputs [B, S, D] float32, conditioning [B, S, cond] or None, rotary tables."""
        x = self.embedding(tokens, sigma_bar).astype(jnp.float32)
        x = axes.constrain(x, ACTIVATION)
        cond = None
        if self.time_embedding is not None:
            assert sigma_bar is not None
            cond = self.time_embedding(sigma_bar)
        cos, sin = rotary_angles(positions, self.config.head_dim, self.config.rotary_base)
        return x, cond, cos, sin

    def _output(self, x: jax.Array, cond: jax.Array | None, tokens: jax.Array,
                sigma_bar: jax.Array | None) -> jax.Array:
        """Final LayerNorm (+ adaLN), logits over the N ordinary tokens, log-probs or log-scores."""
        config = self.config
        h = self.final_norm(x)
        if self.final_modulation is not None:
            mods = self.final_modulation(cond)  # [B, S, 2, D]
            h = modulate(h, mods[:, :, 0], mods[:, :, 1])
        if self.head is None:
            logits = self.embedding.attend(h)
        else:
            logits = jnp.einsum("bsd,dv->bsv", h, self.head[...].astype(h.dtype),
                                preferred_element_type=jnp.float32)
        logits = axes.constrain(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))
        logits = logits[..., :config.num_tokens].astype(jnp.float32)  # [B, S, N], MASK and padding dropped
        if config.output == "log_probs":
            return jax.nn.log_softmax(logits, axis=-1)
        assert sigma_bar is not None
        sigma = jnp.maximum(sigma_bar.astype(jnp.float32), jnp.finfo(jnp.float32).tiny)
        shift = log_expm1(sigma) + math.log(config.num_tokens)  # [B, S]
        is_mask = (tokens == config.mask_id)[..., None]
        log_score = jnp.where(is_mask, logits - shift[..., None], logits)
        current = jax.nn.one_hot(tokens, config.num_tokens, dtype=jnp.bool_)  # all False at MASK
        return jnp.where(current, 0.0, log_score)

    def _dropout_keys(self, deterministic: bool, dropout_key: jax.Array | None
                      ) -> list[jax.Array | None]:
        """One dropout key per block, split from ``dropout_key`` or else drawn from the model's own
        dropout stream; Nones when there is no dropout. Keys are drawn outside the rematerialised
        blocks, so the recomputation reuses them."""
        if deterministic or self.config.dropout_rate == 0.0:
            return [None] * self.config.num_layers
        key = self.dropout_rngs() if dropout_key is None else dropout_key
        return list(jax.random.split(key, self.config.num_layers))

    # ----------------------------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, positions: jax.Array, sigma_bar: jax.Array | None = None,
                 mask: Mask = None, deterministic: bool = True,
                 dropout_key: jax.Array | None = None, score_tokens: jax.Array | None = None,
                 score_sigma_bar: jax.Array | None = None) -> jax.Array:
        """Full forward over an arbitrary token layout.

        Args:
          tokens: [B, S] int in 0..N (N = MASK).
          positions: [B, S] or [S] int rotary position ids.
          sigma_bar: [B, S] per-position noise level (0 for clean tokens), or None when the config
            reads no noise level.
          mask: None (full bidirectional), numpy bool [S, S] (static), or jnp bool [S, S] / [B, S, S];
            True = query row may attend to key column.
          deterministic: disable dropout.
          dropout_key: PRNG key for dropout (when not deterministic); None draws one from the model's
            own stream (``nnx.Rngs(dropout=...)`` given at construction), which mutates the model, so
            use ``nnx.jit`` / ``nnx.value_and_grad`` then. Pure ``jax.jit`` / ``jax.grad`` code over
            ``nnx.split`` states should pass a key.
          score_tokens, score_sigma_bar: [B, S] the state ``x_t`` and noise level of the position each
            cell's output is about, read by the score head only (module docstring); default the
            inputs ``tokens`` / ``sigma_bar`` (ALIGNED).
        Returns:
          [B, S, N] float32 log-probs, or log-scores when ``config.output == "score"``.
        """
        self._check_inputs(tokens, positions, sigma_bar)
        score_context = self._score_context(tokens, sigma_bar, score_tokens, score_sigma_bar)
        x, cond, cos, sin = self._prepare(tokens, positions, sigma_bar)
        static_mask = mask if isinstance(mask, np.ndarray) or mask is None else None
        dynamic_mask = None if static_mask is not None or mask is None else mask

        dropout_keys = self._dropout_keys(deterministic, dropout_key)

        def run_block(block: Block, x: jax.Array, cond: jax.Array | None, cos: jax.Array,
                      sin: jax.Array, dynamic_mask: jax.Array | None,
                      dropout_key: jax.Array | None) -> jax.Array:
            block_mask = static_mask if dynamic_mask is None else dynamic_mask
            return block(x, cond, cos, sin, block_mask, dropout_key,
                         implementation=self.config.attention_impl)[0]

        if self.config.remat:
            run_block = nnx.remat(run_block)
        for layer, block in enumerate(self.blocks):
            x = run_block(block, x, cond, cos, sin, dynamic_mask, dropout_keys[layer])
        return self._output(x, cond, *score_context)

    # ----------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype = jnp.bfloat16) -> KVCache:
        """An empty ``KVCache`` for this model with room for ``max_length`` tokens."""
        return init_cache(self.config, batch_size, max_length, dtype)

    def forward_cached(self, tokens: jax.Array, positions: jax.Array, sigma_bar: jax.Array | None,
                       cache: KVCache, window_mask: Mask = None, update_cache: bool = False,
                       deterministic: bool = True, dropout_key: jax.Array | None = None,
                       score_tokens: jax.Array | None = None,
                       score_sigma_bar: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Forward over a window of W tokens that also attends to the cached tokens (seed 000 App. B.4).

        Window queries attend to every cached key with index < ``cache.length`` and to window keys per
        ``window_mask``. With ``update_cache`` the window's keys / values (as computed in this forward)
        are written at ``cache.length`` and the length advances by W; otherwise the cache is returned
        unchanged. ``cache.length`` may be traced; the caller keeps ``length + W <= max_length`` (checked
        when the length is concrete). Splash attention needs static masks, so with
        ``attention_impl="splash"`` this path uses the XLA kernel (windows are small).

        Args:
          tokens: [B, W] window tokens; positions: [B, W] or [W]; sigma_bar: [B, W] or None.
          cache: the ``KVCache``.
          window_mask: None (full), or bool [W, W] / [B, W, W] attention inside the window.
          update_cache: append this window to the cache.
          deterministic, dropout_key, score_tokens, score_sigma_bar: as in ``__call__`` ([B, W]).
        Returns:
          (outputs [B, W, N] float32, the cache).
        """
        self._check_inputs(tokens, positions, sigma_bar)
        score_context = self._score_context(tokens, sigma_bar, score_tokens, score_sigma_bar)
        batch, width = tokens.shape
        config = self.config
        if (cache.num_layers, cache.batch_size) != (config.num_layers, batch) or \
                cache.keys[0].shape[2:] != (config.num_heads, config.head_dim):
            raise ValueError(f"cache holds {cache.num_layers} layers of {tuple(cache.keys[0].shape)}; the "
                             f"model needs {config.num_layers} layers of [{batch}, max_length, "
                             f"{config.num_heads}, {config.head_dim}]")
        if update_cache:
            try:
                current = int(cache.length)
            except jax.errors.JAXTypeError:  # traced length: the caller guarantees room
                current = 0
            if current + width > cache.max_length:
                raise ValueError(f"cache.length={current} + window {width} exceeds max_length="
                                 f"{cache.max_length}")
        if window_mask is None:
            window_mask = np.ones((width, width), bool)
        if window_mask.ndim not in (2, 3) or window_mask.shape[-2:] != (width, width):
            raise ValueError(f"window_mask must have shape [{width}, {width}] or [{batch}, {width}, "
                             f"{width}], got {tuple(window_mask.shape)}")
        past_allowed = jnp.arange(cache.max_length) < cache.length  # [T]
        window_mask = jnp.asarray(window_mask, bool)
        past_mask = jnp.broadcast_to(past_allowed, window_mask.shape[:-1] + (cache.max_length,))
        full_mask = jnp.concatenate([past_mask, window_mask], axis=-1)  # [(B,) W, T + W]
        implementation = "xla" if config.attention_impl == "splash" else config.attention_impl

        x, cond, cos, sin = self._prepare(tokens, positions, sigma_bar)
        keys, values = [], []
        start = (jnp.zeros((), jnp.int32), cache.length.astype(jnp.int32), jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32))
        dropout_keys = self._dropout_keys(deterministic, dropout_key)
        for layer, block in enumerate(self.blocks):
            past_k = axes.constrain(cache.keys[layer], HEAD_ACTIVATION)
            past_v = axes.constrain(cache.values[layer], HEAD_ACTIVATION)
            x, (k, v) = block(x, cond, cos, sin, full_mask, dropout_keys[layer],
                              implementation=implementation, past=(past_k, past_v))
            if update_cache:
                keys.append(jax.lax.dynamic_update_slice(past_k, k.astype(past_k.dtype), start))
                values.append(jax.lax.dynamic_update_slice(past_v, v.astype(past_v.dtype), start))
        out = self._output(x, cond, *score_context)
        chex.assert_shape(out, (batch, width, config.num_tokens))
        if update_cache:
            cache = KVCache(keys=tuple(keys), values=tuple(values),
                            length=(cache.length + width).astype(jnp.int32))
        return out, cache
