"""Masked-diffusion unmasking strategies (seed 002), vectorised over positions.

One step of :func:`unmask_step` draws a token for every position from the model's prediction
(``log_probs [..., L, N]``, ``MASK = N``; temperature / top-k / top-p / precision from a
:class:`CategoricalConfig`), chooses *which* masked positions to reveal, writes the drawn tokens
there and leaves everything else unchanged. Choices are made by ranking (``argsort``), never by a
Python loop over positions. Strategies (``UnmaskingConfig.strategy``):

Count-based — reveal ``num_unmask`` positions per sequence (from the hyperschedule via
:func:`plan_from_schedule`, or any count):

* ``"random"`` (seed 002 Strategy 0, IID/MD4; LLaDA "random remasking"): a uniformly random
  subset. With exact posteriors and one position per step this samples the data exactly.
* ``"top_prob"`` (Strategy 1): confidence ``c_i = max_v p_i(v)``; the top ``num_unmask``.
* ``"margin"`` (Strategy 2): ``c_i = p_i(v₁) - p_i(v₂)``, the gap between the two most probable
  tokens.
* ``"low_confidence"`` (LLaDA low-confidence remasking, seed 002 Alg. 4 / "remask the tokens with
  lowest logits"): predict every masked token, keep the ``num_unmask`` whose *drawn* token has
  the highest probability ``p_i(x̂_i)``, remask the rest.
* ``"pc"`` (Strategy 4, PC-sampler): ``s_i = w_i c_i`` with ``w_i = e^{-λ i}`` and
  ``c_i = min(-p_i(x̂_i) log p_D'(x̂_i), c_MAX)`` for the drawn (greedy: most probable) token
  ``x̂_i`` and a corpus token prior ``p_D'`` (``token_log_prior``; None means "no prior" and uses
  ``c_i = min(p_i(x̂_i), c_MAX)``). Ranking uses ``log c_i - λ i``, which orders exactly like
  ``e^{-λ i} c_i`` (and like ``e^{-λ (i - i₀)} c_i`` for any offset ``i₀``, e.g. the first masked
  position) without underflow for long sequences.

Adaptive — the step decides how many (at least one when any candidate exists; ``num_unmask``, if
given, caps it):

* ``"threshold"`` (Strategy 3, Fast-dLLM parallel decoding): every candidate with
  ``c_i = max_v p_i(v) > threshold``.
* ``"factor"`` (Strategy 3 as written in seed 002, Fast-dLLM's factor rule): with ``c_(n)`` the
  n-th largest confidence, the ``n`` most confident positions for every ``n`` with
  ``(n + 1)(1 - c_(n)) < factor`` (a prefix: the left side grows with ``n``).
* ``"entropy"`` (Strategy 5, EB-sampler): in order of increasing entropy ``H_i`` of ``p_i``, the
  largest prefix ``r`` with ``Σ_{i∈r} H_i - max_{i∈r} H_i <= γ_EB`` (``entropy_bound``). The
  slides print the max over all positions; the EB-sampler's bound is over the chosen subset,
  which in increasing order is its last element, so the test is "the entropies before the last
  one sum to at most γ_EB". ``γ_EB = 0`` reveals one (plus any further zero-entropy) position.

Semi-autoregressive blocks (LLaDA, seed 002 "Semi-autoregressive Sampling"): with
``block_width = ω`` the candidates are restricted to the first block of ω positions that still
holds a candidate. ``candidates`` restricts further (e.g. a hyperschedule's active window);
``forced`` positions (next level clean) are always revealed, before anything else.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybriddiff.sampling.categorical import CategoricalConfig, sample_categorical
from hybriddiff.sampling.steps import transfer_probability

__all__ = [
    "ADAPTIVE_STRATEGIES",
    "COUNT_STRATEGIES",
    "UnmaskPlan",
    "UnmaskingConfig",
    "pc_log_scores",
    "plan_from_schedule",
    "prediction_entropy",
    "select_entropy_bounded",
    "select_factor",
    "select_threshold",
    "select_top_k",
    "semi_ar_candidates",
    "top_two_margin",
    "unmask_step",
]

Array = jax.Array

COUNT_STRATEGIES = ("random", "top_prob", "margin", "low_confidence", "pc")
ADAPTIVE_STRATEGIES = ("threshold", "factor", "entropy")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {name}={value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class UnmaskingConfig:
    """Which masked positions a step reveals (module docstring). Hashable: a static argument.

    Attributes:
      strategy: one of :data:`COUNT_STRATEGIES` or :data:`ADAPTIVE_STRATEGIES`.
      threshold: ``"threshold"``: confidence threshold in [0, 1].
      factor: ``"factor"``: Fast-dLLM factor ``f > 0``.
      entropy_bound: ``"entropy"``: ``γ_EB >= 0`` in nats.
      position_decay: ``"pc"``: ``λ >= 0`` of ``w_i = e^{-λ i}``.
      confidence_clip: ``"pc"``: ``c_MAX > 0`` (may be inf).
      block_width: semi-autoregressive block width ω >= 1, or None.
    """

    strategy: str = "random"
    threshold: float = 0.9
    factor: float = 1.0
    entropy_bound: float = 0.1
    position_decay: float = 0.0
    confidence_clip: float = math.inf
    block_width: int | None = None

    def __post_init__(self) -> None:
        strategies = COUNT_STRATEGIES + ADAPTIVE_STRATEGIES
        if self.strategy not in strategies:
            raise ValueError(
                f"strategy must be one of {strategies}, got strategy={self.strategy!r}"
            )
        threshold = _real("threshold", self.threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got threshold={self.threshold!r}")
        factor = _real("factor", self.factor)
        if not (factor > 0.0 and math.isfinite(factor)):
            raise ValueError(f"factor must be positive and finite, got factor={self.factor!r}")
        bound = _real("entropy_bound", self.entropy_bound)
        if not bound >= 0.0:
            raise ValueError(
                f"entropy_bound must be >= 0, got entropy_bound={self.entropy_bound!r}"
            )
        decay = _real("position_decay", self.position_decay)
        if not (decay >= 0.0 and math.isfinite(decay)):
            raise ValueError(
                "position_decay must be finite and >= 0, "
                f"got position_decay={self.position_decay!r}"
            )
        clip = _real("confidence_clip", self.confidence_clip)
        if not clip > 0.0:
            raise ValueError(
                f"confidence_clip must be > 0, got confidence_clip={self.confidence_clip!r}"
            )
        if self.block_width is not None and (
            isinstance(self.block_width, bool)
            or not isinstance(self.block_width, numbers.Integral)
            or self.block_width < 1
        ):
            raise ValueError(
                f"block_width must be an integer >= 1 or None, got block_width={self.block_width!r}"
            )
        for name, value in (
            ("threshold", threshold),
            ("factor", factor),
            ("entropy_bound", bound),
            ("position_decay", decay),
            ("confidence_clip", clip),
        ):
            object.__setattr__(self, name, value)


class UnmaskPlan(NamedTuple):
    """What a hyperschedule step asks of a count-based strategy."""

    num_unmask: Array  # [...] int32
    candidates: Array  # [..., L] bool: masked positions whose noise decreases
    forced: Array  # [..., L] bool: candidates whose next level is clean


def plan_from_schedule(x: Array, alpha_now: Array, alpha_next: Array, mask_id: int) -> UnmaskPlan:
    """Count and candidates for one hyperschedule step of a count-based strategy.

    ``num_unmask = round(Σ_{candidates} p_transfer)`` (round half to even; the expected number
    MDLM would reveal; at least the number of forced positions, whose ``p_transfer`` is 1),
    capped by the number of candidates. Candidates are the masked positions whose ``alpha``
    increases; forced ones reach ``alpha = 1`` and are revealed first by :func:`unmask_step`.

    Args:
      x: ``[..., L]`` tokens.
      alpha_now, alpha_next: ``[..., L]`` per-position α.
      mask_id: the MASK id N.
    """
    x = jnp.asarray(x)
    alpha_now = jnp.asarray(alpha_now)
    alpha_next = jnp.asarray(alpha_next)
    for name, value in (("alpha_now", alpha_now), ("alpha_next", alpha_next)):
        if value.shape != x.shape:
            raise ValueError(f"{name} must have shape {x.shape}, got {value.shape}")
    candidates = (x == mask_id) & (alpha_next > alpha_now)
    forced = candidates & (alpha_next >= 1.0)
    expected = jnp.sum(jnp.where(candidates, transfer_probability(alpha_now, alpha_next), 0.0), -1)
    # Forced positions have p_transfer = 1, so the rounded count already covers them.
    count = jnp.minimum(jnp.round(expected).astype(jnp.int32), jnp.sum(candidates, -1))
    return UnmaskPlan(num_unmask=count, candidates=candidates, forced=forced)


def prediction_entropy(log_probs: Array) -> Array:
    """Entropy ``H_i = -Σ_v p_i(v) log p_i(v)`` in nats, ``[..., L]`` (0·log 0 = 0)."""
    log_probs = jnp.asarray(log_probs)
    probs = jnp.exp(log_probs)
    terms = jnp.where(probs > 0, probs * log_probs, 0.0)
    return -jnp.sum(terms, axis=-1)


def top_two_margin(log_probs: Array) -> Array:
    """``p_i(v₁) - p_i(v₂)``: the top-two probability margin, ``[..., L]`` (needs N >= 2). Two
    reductions (the max, then the max with the arg-max removed) rather than ``lax.top_k``, which is
    an order of magnitude slower on CPU; ties give margin 0 either way."""
    probs = jnp.exp(jnp.asarray(log_probs))  # [..., L, N]
    first = jnp.max(probs, axis=-1)
    best = jnp.argmax(probs, axis=-1)[..., None] == jnp.arange(probs.shape[-1])
    second = jnp.max(jnp.where(best, -jnp.inf, probs), axis=-1)
    return first - second


def pc_log_scores(
    log_probs: Array,
    tokens: Array,
    position_decay: float,
    confidence_clip: float,
    token_log_prior: Array | None = None,
) -> Array:
    """PC-sampler ranking scores ``log c_i - λ i`` (module docstring), ``[..., L]``.

    Args:
      log_probs: ``[..., L, N]``.
      tokens: ``[..., L]`` the drawn tokens ``x̂``.
      position_decay: λ >= 0.
      confidence_clip: ``c_MAX``.
      token_log_prior: optional ``[N]`` ``log p_D'(v)``.
    """
    log_probs = jnp.asarray(log_probs)
    picked = jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), -1)[..., 0]
    confidence = jnp.exp(picked)
    if token_log_prior is not None:
        prior = jnp.asarray(token_log_prior, log_probs.dtype)
        if prior.shape != log_probs.shape[-1:]:
            raise ValueError(
                f"token_log_prior must have shape ({log_probs.shape[-1]},), got {prior.shape}"
            )
        confidence = -confidence * prior[tokens]
    confidence = jnp.minimum(confidence, confidence_clip)
    log_confidence = jnp.where(
        confidence > 0, jnp.log(jnp.where(confidence > 0, confidence, 1.0)), -jnp.inf
    )
    positions = jnp.arange(log_probs.shape[-2], dtype=log_confidence.dtype)
    return log_confidence - position_decay * positions


def semi_ar_candidates(candidates: Array, block_width: int) -> Array:
    """Restricts ``candidates [..., L]`` to the first block of ``block_width`` positions that
    holds a candidate (semi-autoregressive decoding), ``[..., L]`` bool."""
    candidates = jnp.asarray(candidates, jnp.bool_)
    first = jnp.argmax(candidates, axis=-1)  # [...] first candidate (0 if none)
    block = jnp.arange(candidates.shape[-1]) // block_width  # [L]
    return candidates & (block == (first // block_width)[..., None])


def _ranks(scores: Array) -> Array:
    """Rank of each entry in decreasing order of ``scores`` (ties: lower index first)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def select_top_k(
    scores: Array, candidates: Array, num: Array, forced: Array | None = None
) -> Array:
    """The ``num`` candidates with the highest ``scores`` (forced ones first), ``[..., L]`` bool.

    Args:
      scores: ``[..., L]`` real scores (ties: lower position first).
      candidates: ``[..., L]`` bool.
      num: ``[...]`` or scalar count, raised to the number of forced positions.
      forced: optional ``[..., L]`` bool, always chosen (implies candidate).
    """
    candidates = jnp.asarray(candidates, jnp.bool_)
    forced = jnp.zeros_like(candidates) if forced is None else jnp.asarray(forced, jnp.bool_)
    allowed = candidates | forced
    scores = jnp.asarray(scores, jnp.float32)
    ranked = jnp.where(forced, jnp.inf, jnp.where(allowed, scores, -jnp.inf))
    num = jnp.maximum(jnp.asarray(num), jnp.sum(forced, axis=-1))
    return allowed & (_ranks(ranked) < num[..., None])


def _prefix_count(valid_sorted: Array) -> Array:
    """Length of the leading run of True along the last axis, ``[...]``."""
    return jnp.sum(jnp.cumprod(valid_sorted.astype(jnp.int32), axis=-1), axis=-1)


def _adaptive_select(
    scores: Array, count_free: Array, candidates: Array, forced: Array, cap: Array | None
) -> Array:
    """Forced positions plus the ``count_free`` best other candidates (at least one overall)."""
    num_forced = jnp.sum(forced, axis=-1)
    free = candidates & ~forced
    at_least_one = jnp.where((num_forced == 0) & jnp.any(free, axis=-1), 1, 0)
    total = num_forced + jnp.maximum(count_free, at_least_one)
    if cap is not None:
        total = jnp.minimum(total, jnp.maximum(jnp.asarray(cap), num_forced))
    return select_top_k(scores, candidates, total, forced)


def _forced_or_none(forced: Array | None, candidates: Array) -> Array:
    return jnp.zeros_like(candidates) if forced is None else jnp.asarray(forced, jnp.bool_)


def select_threshold(
    confidence: Array,
    candidates: Array,
    threshold: float,
    forced: Array | None = None,
    cap: Array | None = None,
) -> Array:
    """Fast-dLLM parallel decoding: every candidate with ``confidence > threshold``; at least the
    most confident one; forced always; at most ``cap`` (if given). ``[..., L]`` bool."""
    candidates = jnp.asarray(candidates, jnp.bool_)
    forced = _forced_or_none(forced, candidates)
    count = jnp.sum(candidates & ~forced & (confidence > threshold), axis=-1)
    return _adaptive_select(confidence, count, candidates, forced, cap)


def select_factor(
    confidence: Array,
    candidates: Array,
    factor: float,
    forced: Array | None = None,
    cap: Array | None = None,
) -> Array:
    """Fast-dLLM factor rule: the ``n`` most confident for every ``n`` with
    ``(n + 1)(1 - c_(n)) < factor`` (at least one; forced always). ``[..., L]`` bool."""
    candidates = jnp.asarray(candidates, jnp.bool_)
    forced = _forced_or_none(forced, candidates)
    free = candidates & ~forced
    ordered = jnp.flip(jnp.sort(jnp.where(free, confidence, -jnp.inf), axis=-1), axis=-1)
    n = jnp.arange(1, confidence.shape[-1] + 1, dtype=ordered.dtype)
    valid = (ordered > -jnp.inf) & ((n + 1.0) * (1.0 - ordered) < factor)
    return _adaptive_select(confidence, _prefix_count(valid), candidates, forced, cap)


def select_entropy_bounded(
    entropy: Array,
    candidates: Array,
    bound: float,
    forced: Array | None = None,
    cap: Array | None = None,
) -> Array:
    """EB-sampler: the largest lowest-entropy prefix ``r`` with
    ``Σ_{r} H - max_{r} H <= bound`` (at least one; forced always). ``[..., L]`` bool."""
    candidates = jnp.asarray(candidates, jnp.bool_)
    forced = _forced_or_none(forced, candidates)
    free = candidates & ~forced
    ordered = jnp.sort(jnp.where(free, entropy, jnp.inf), axis=-1)  # increasing
    finite = ordered < jnp.inf
    before = jnp.cumsum(jnp.where(finite, ordered, 0.0), axis=-1) - jnp.where(finite, ordered, 0.0)
    valid = finite & (before <= bound)
    return _adaptive_select(-entropy, _prefix_count(valid), candidates, forced, cap)


def _count(num_unmask: Array | int | None, batch_shape: tuple[int, ...]) -> Array | None:
    if num_unmask is None:
        return None
    if isinstance(num_unmask, bool):
        raise ValueError(f"num_unmask must be an integer count >= 0, got {num_unmask!r}")
    value = jnp.asarray(num_unmask)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(f"num_unmask must hold integers, got dtype {value.dtype}")
    if value.ndim and value.shape != batch_shape:
        raise ValueError(
            f"num_unmask must be a scalar or have shape {batch_shape}, got {value.shape}"
        )
    if not isinstance(num_unmask, jax.core.Tracer) and bool(jnp.any(value < 0)):
        raise ValueError(f"num_unmask must be >= 0, got {num_unmask!r}")
    return jnp.broadcast_to(value, batch_shape)


def unmask_step(
    key: Array,
    x: Array,
    log_probs: Array,
    num_unmask: Array | int | None = None,
    config: UnmaskingConfig = UnmaskingConfig(),
    sampling: CategoricalConfig = CategoricalConfig(),
    candidates: Array | None = None,
    forced: Array | None = None,
    token_log_prior: Array | None = None,
) -> Array:
    """Reveals masked positions chosen by ``config.strategy`` (module docstring).

    Args:
      key: PRNG key.
      x: ``[..., L]`` tokens (``MASK = N``).
      log_probs: ``[..., L, N]`` predicted ``log p(x0^i | x)``.
      num_unmask: ``[...]`` or scalar count (required by count-based strategies; a cap for
        adaptive ones).
      config: the strategy.
      sampling: how the revealed tokens are drawn.
      candidates: optional ``[..., L]`` bool restriction, intersected with the masked positions.
      forced: optional ``[..., L]`` bool: masked positions that must be revealed now.
      token_log_prior: ``"pc"`` only: optional ``[N]`` corpus log-frequencies ``log p_D'``.
    Returns:
      ``[..., L]``: drawn tokens at the chosen positions, ``x`` elsewhere.
    """
    if not isinstance(config, UnmaskingConfig):
        raise ValueError(f"config must be an UnmaskingConfig, got {type(config).__name__}")
    if not isinstance(sampling, CategoricalConfig):
        raise ValueError(f"sampling must be a CategoricalConfig, got {type(sampling).__name__}")
    x = jnp.asarray(x)
    log_probs = jnp.asarray(log_probs)
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim < 1:
        raise ValueError(f"x must be an integer token array [..., L], got {x.dtype} {x.shape}")
    if log_probs.shape[:-1] != x.shape or log_probs.ndim != x.ndim + 1:
        raise ValueError(
            f"log_probs must have shape x.shape + (N,) = {x.shape} + (N,), got {log_probs.shape}"
        )
    masked = x == log_probs.shape[-1]
    allowed = masked
    if candidates is not None:
        if jnp.shape(candidates) != x.shape:
            raise ValueError(
                f"candidates must have shape {x.shape}, got {tuple(jnp.shape(candidates))}"
            )
        allowed = allowed & jnp.asarray(candidates, jnp.bool_)
    if forced is not None and jnp.shape(forced) != x.shape:
        raise ValueError(f"forced must have shape {x.shape}, got {tuple(jnp.shape(forced))}")
    must = jnp.zeros_like(masked) if forced is None else masked & jnp.asarray(forced, jnp.bool_)
    if config.block_width is not None:
        allowed = semi_ar_candidates(allowed, config.block_width)
    allowed = allowed | must
    count = _count(num_unmask, x.shape[:-1])
    strategy = config.strategy
    if strategy in COUNT_STRATEGIES and count is None:
        raise ValueError(f"num_unmask is required for strategy={strategy!r}")

    key_token, key_rank = jax.random.split(key)
    tokens = sample_categorical(key_token, log_probs, sampling).astype(x.dtype)
    if strategy == "random":
        scores = jax.random.uniform(key_rank, x.shape, jnp.float32)
    elif strategy == "top_prob":
        scores = jnp.max(log_probs, axis=-1)
    elif strategy == "margin":
        scores = top_two_margin(log_probs)
    elif strategy == "low_confidence":
        scores = jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), -1)[..., 0]
    elif strategy == "pc":
        scores = pc_log_scores(
            log_probs, tokens, config.position_decay, config.confidence_clip, token_log_prior
        )
    if strategy in COUNT_STRATEGIES:
        chosen = select_top_k(scores, allowed, count, must)
    elif strategy == "threshold":
        confidence = jnp.exp(jnp.max(log_probs, axis=-1))
        chosen = select_threshold(confidence, allowed, config.threshold, must, count)
    elif strategy == "factor":
        confidence = jnp.exp(jnp.max(log_probs, axis=-1))
        chosen = select_factor(confidence, allowed, config.factor, must, count)
    else:
        entropy = prediction_entropy(log_probs)
        chosen = select_entropy_bounded(entropy, allowed, config.entropy_bound, must, count)
    return jnp.where(chosen, tokens, x)
