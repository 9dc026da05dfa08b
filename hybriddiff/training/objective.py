"""Training objectives: one code path for every hyperschedule, process and loss (seed 000 Eq. 10).

Every objective runs the network once over a *layout* (``hybriddiff.masks.TrainingLayout``): slots
that hold either clean tokens or noisy copies of positions (a *noisy buffer*), with rotary
positions, an attention mask and, per slot, the position its output predicts.

* ``flat`` (seed 000 Fig. 2b): the whole row is one interval at one noise level per sequence;
  plain ``L``-slot input with full attention (:func:`flat_layout`). SHIFTED: the first input is
  the clean token 0 (conditioning only) and cell ``p`` predicts position ``p + 1``.
* ``block`` (Fig. 2c, BD3-LM): ``masks.block_layout`` — ``x_noisy ⊕ x_clean`` with the efficient
  2L mask (seed 001 App. D; seed 000 Fig. 8, 10), one noise level per block.
* ``slide`` (Fig. 2d): ``masks.slide_layout`` with starts drawn on the host from ``(seed, step)``
  (:meth:`Objective.layout_for_step`), so a resumed run sees the same layouts; the layout is a
  pytree argument of the jitted step, so new starts never recompile.
* ``quench`` + SHIFTED (Fig. 2a): the causal language model (:func:`causal_layout`): the clean row
  under a token-causal mask, every cell predicting the next token. This *is* the efficient layout
  of the quench hyperschedule: at step ``t`` the only active position is ``t`` at full noise
  (``num_levels = 1``), so its SHIFTED window is the repeated settled token ``x[t-1]`` whose output
  predicts ``x[t]`` from the clean prefix — exactly the clean slot ``t-1`` of a causal pass. The
  objective is the next-token cross-entropy (``loss.kind = "ar"``).

Losses on the layout's outputs (``denoise_slots``: noisy targets, ``settled_slots``: clean ones):

* ``dwdse``: SEDD score entropy for the γ-hybrid process, weight ``dsigma_bar`` (score output);
* ``hdce``: the ε-hybrid HDCE of Eq. 8-9 (no time input needed);
* ``mdlm``: MDLM / SUBS weight ``-alpha'/(1 - alpha)``; per block this is BD3-LM (seed 001 Eq. 7);
* ``ar``: next-token cross-entropy on the settled slots only.

The total is Eq. 10, ``beta1 · CE(settled) + beta2 · diffusion(active)``. Block and slide
layouts are the efficient schemes of seed 000 App. B.3, under which the Eq. 11 reweighting of
settled tokens "is no longer required", so the settled CE is unweighted. For score models the
settled CE is taken on ``log_softmax`` of the log-scores (the exact score at ``sigma = 0`` puts
all its mass on the token itself).

Noise levels: time ``u`` is drawn per (sequence, interval) with stratified (antithetic) draws over
the whole batch (``schedules.sample_mask_rates``). For ``mdlm`` the draw is BD3-LM's mask rate
``1 - alpha ~ U[clip_low, clip_high]`` (seed 001 §5.2), converted to time with
``schedule.u_from_mask_rate``; otherwise it is ``u ~ U[0, 1]`` itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from hybriddiff import losses, masks
from hybriddiff.processes import EpsilonHybrid, GammaHybrid
from hybriddiff.schedules import NoiseSchedule, sample_mask_rates

__all__ = [
    "ApplyFn",
    "NoisyBuffer",
    "Objective",
    "SlotTargets",
    "causal_layout",
    "draw_levels",
    "flat_layout",
    "forward",
    "noise_buffer",
    "objective_loss",
    "slot_targets",
]

Array = jax.Array
# (tokens [B, S], positions [S], sigma_bar [B, S], mask [S, S] | None) -> outputs [B, S, N]; score
# networks on SHIFTED layouts are also given ``score_tokens=`` / ``score_sigma_bar=`` [B, S] (forward).
ApplyFn = Callable[..., Array]

LOSS_KINDS = ("dwdse", "hdce", "mdlm", "ar")
LAYOUT_KINDS = ("flat", "block", "slide", "quench")
_SLIDE_SALT = 0x51DE


def _int32(values: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(values, dtype=np.int32).reshape(-1)
    out.setflags(write=False)
    return out


def _frozen_bool(values: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=bool)
    values.setflags(write=False)
    return values


@functools.lru_cache(maxsize=16)
def flat_layout(length: int, shifted: bool = False) -> masks.TrainingLayout:
    """The flat hyperschedule as a one-interval layout of ``length`` slots with full attention.

    ALIGNED: slot ``p`` holds the noisy token of position ``p`` and predicts ``p``. SHIFTED
    (seed 000 Fig. 5b): slot 0 holds the clean token 0 (conditioning only), slot ``p >= 1`` the
    noisy token of ``p``, and slot ``p`` predicts ``p + 1`` (the last output is discarded).
    """
    if length < 1 + int(shifted):
        raise ValueError(f"length must be >= {1 + int(shifted)}, got length={length}")
    position = np.arange(length)
    if shifted:
        input_index = np.where(position == 0, length, position)  # clean x[0] sits after the buffer
        target = np.where(position + 1 < length, position + 1, -1)
        noisy_position = np.where(position >= 1, position, -1)
        start = 1
    else:
        input_index, target, noisy_position, start = position, position, position, 0
    return masks.TrainingLayout(
        kind="flat", length=length, width=length, shifted=shifted, num_intervals=1,
        window_slots=length, window_offset=0, clean_offset=0, noisy_size=length,
        num_slots=length, settled_causal=False,
        mask=_frozen_bool(np.ones((length, length), bool)),
        positions=_int32(position), input_index=_int32(input_index),
        target_position=_int32(target), target_index=_int32(target),
        interval_of_slot=_int32(np.zeros(length)), noisy_position=_int32(noisy_position),
        noisy_interval=_int32(np.where(noisy_position >= 0, 0, -1)),
        interval_start=_int32(np.array([start])), interval_end=_int32(np.array([length])),
    )


@functools.lru_cache(maxsize=16)
def causal_layout(length: int) -> masks.TrainingLayout:
    """The quench hyperschedule with SHIFTED: a causal LM over the clean row (module docstring).

    No noisy buffer; slot ``p`` holds ``x[p]`` under ``masks.causal_mask`` and predicts ``p + 1``
    (a settled target); the last output is discarded.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2, got length={length}")
    position = np.arange(length)
    target = np.where(position + 1 < length, position + 1, -1)
    empty = np.zeros(0, np.int32)
    return masks.TrainingLayout(
        kind="quench", length=length, width=1, shifted=True, num_intervals=0, window_slots=2,
        window_offset=length, clean_offset=0, noisy_size=0, num_slots=length,
        settled_causal=True, mask=masks.causal_mask(length), positions=_int32(position),
        input_index=_int32(position), target_position=_int32(target),
        target_index=_int32(target), interval_of_slot=_int32(np.full(length, -1)),
        noisy_position=_int32(empty), noisy_interval=_int32(empty),
        interval_start=_int32(empty), interval_end=_int32(empty),
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static description of a training objective (hashable; built by ``core.build``).

    Attributes:
      process: the forward process (``GammaHybrid`` for absorb / uniform / γ, ``EpsilonHybrid``).
      schedule: the noise schedule (``alpha(0) = 1``, see ``core.build``).
      loss_kind: "dwdse" | "hdce" | "mdlm" | "ar".
      layout_kind: "flat" | "block" | "slide" | "quench".
      length: L, the row length. width: omega (block / slide). shifted: SHIFTED configuration.
      beta1, beta2: Eq. 10 weights. lam: λ of HDCE (Eq. 9).
      num_intervals: slide windows per row (0: ``L // width``, the ``masks`` default).
      seed: salt of the host-side slide starts.
      pad_multiple: layouts' slot count rounded up to this (tiled attention kernels).
    """

    process: GammaHybrid | EpsilonHybrid
    schedule: NoiseSchedule
    loss_kind: str
    layout_kind: str
    length: int
    width: int
    shifted: bool
    beta1: float = 1.0
    beta2: float = 1.0
    lam: float = 1.0
    num_intervals: int = 0
    seed: int = 0
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        if self.loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss_kind={self.loss_kind!r} is not one of {LOSS_KINDS}")
        if self.layout_kind not in LAYOUT_KINDS:
            raise ValueError(f"layout_kind={self.layout_kind!r} is not one of {LAYOUT_KINDS}")
        if (self.loss_kind == "ar") != (self.layout_kind == "quench"):
            raise ValueError(f"loss_kind={self.loss_kind!r} needs layout_kind='quench' and "
                             f"vice versa, got layout_kind={self.layout_kind!r}")
        if self.loss_kind == "hdce" and not isinstance(self.process, EpsilonHybrid):
            raise ValueError("loss_kind='hdce' needs an EpsilonHybrid process")
        if self.loss_kind in ("dwdse", "mdlm") and not isinstance(self.process, GammaHybrid):
            raise ValueError(f"loss_kind={self.loss_kind!r} needs a GammaHybrid process")

    @property
    def mask_id(self) -> int:
        return self.process.mask_id

    @property
    def dynamic(self) -> bool:
        """Whether the layout changes every step (slides): it is then a jitted-step argument."""
        return self.layout_kind == "slide"

    @property
    def score_output(self) -> bool:
        """The network outputs log-scores (DWDSE) rather than log-probabilities."""
        return self.loss_kind == "dwdse"

    def static_layout(self) -> masks.TrainingLayout:
        """The fixed layout of flat / block / quench objectives (ValueError for slides)."""
        if self.layout_kind == "flat":
            return flat_layout(self.length, self.shifted)
        if self.layout_kind == "block":
            return masks.block_layout(self.length, self.width, self.shifted, self.pad_multiple)
        if self.layout_kind == "quench":
            return causal_layout(self.length)
        raise ValueError("layout_kind='slide' has no static layout; use layout_for_step(step)")

    def layout_for_step(self, step: int) -> masks.TrainingLayout:
        """The layout of train step ``step``; slide starts are drawn from ``(seed, step)`` on the
        host."""
        if not self.dynamic:
            return self.static_layout()
        rng = np.random.default_rng((self.seed, int(step), _SLIDE_SALT))
        starts = masks.draw_slide_starts(self.length, self.width, rng, self.shifted,
                                         self.num_intervals or None)
        return masks.slide_layout(self.length, self.width, starts, self.shifted,
                                  self.pad_multiple)

    def eval_layout(self) -> masks.TrainingLayout:
        """The layout of the likelihood bound: slides are evaluated on the non-overlapping windows
        ``[j, j + width)``, ``j = shifted, shifted + width, ...`` (a block-wise generator with the
        slide model's token-causal settled context); other kinds use their training layout."""
        if not self.dynamic:
            return self.static_layout()
        starts = tuple(range(int(self.shifted), self.length, self.width))
        return masks.slide_layout(self.length, self.width, starts, self.shifted,
                                  self.pad_multiple)

    @staticmethod
    def attention_mask(layout: masks.TrainingLayout) -> np.ndarray | Array | None:
        """The mask to give the network: None (full attention, no mask work) for flat layouts."""
        return None if layout.kind == "flat" else layout.mask


def draw_levels(objective: Objective, key: Array, shape: tuple[int, ...],
                clip_low: Array | float = 0.0, clip_high: Array | float = 1.0) -> Array:
    """Training times ``u`` ``[*shape]`` (one per sequence and interval), stratified over all draws.

    ``mdlm``: BD3-LM's mask rates ``U[clip_low, clip_high]`` mapped to time (seed 001 §5.2);
    other losses: ``u ~ U[clip_low, clip_high]`` directly (validation keeps it ``[0, 1]``).
    """
    draws = sample_mask_rates(key, shape, clip_low, clip_high, antithetic=True)
    if objective.loss_kind == "mdlm":
        return objective.schedule.u_from_mask_rate(draws)
    return draws


class NoisyBuffer(NamedTuple):
    """The noised copies of a layout's noisy buffer (all ``[B, noisy_size]``)."""

    tokens: Array  # x_u (MASK = N)
    u: Array  # time of each entry (0 where unused)
    sigma_bar: Array
    masked: Array  # bool
    substituted: Array  # bool, ε-hybrid: unmasked and uniformly substituted
    p_mask: Array  # masking probability of the entry


def interval_to_buffer(layout: masks.TrainingLayout, per_interval: Array) -> Array:
    """Per-interval values ``[B, I]`` spread over the noisy buffer ``[B, noisy_size]`` (0 where
    an entry is unused)."""
    interval = jnp.asarray(layout.noisy_interval)
    values = jnp.take(per_interval, jnp.maximum(interval, 0), axis=-1)
    return jnp.where(interval >= 0, values, jnp.zeros((), per_interval.dtype))


def noise_buffer(objective: Objective, key: Array, x0: Array, layout: masks.TrainingLayout,
                 u_intervals: Array) -> NoisyBuffer:
    """Draws ``x_u ~ q_u(· | x0)`` for every noisy buffer entry at its interval's time.

    Args:
      x0: ``[B, L]`` clean rows. u_intervals: ``[B, num_intervals]`` times.
    """
    source = masks.gather_noisy_source(layout, x0)  # [B, n]
    u = interval_to_buffer(layout, u_intervals.astype(jnp.float32))  # [B, n]
    sigma_bar = objective.schedule.sigma_bar(u)
    process = objective.process
    if isinstance(process, EpsilonHybrid):
        sample = process.sample(key, source, sigma_bar)
        return NoisyBuffer(sample.x_u, u, sigma_bar, sample.masked, sample.substituted,
                           sample.p_mask)
    tokens = process.sample(key, source, sigma_bar)
    masked = tokens == process.mask_id
    p_mask = -jnp.expm1(-(1.0 - process.gamma) * sigma_bar)
    return NoisyBuffer(tokens, u, sigma_bar, masked, jnp.zeros_like(masked), p_mask)


def forward(objective: Objective, apply_fn: ApplyFn, layout: masks.TrainingLayout, x0: Array,
            buffer_tokens: Array, buffer_sigma: Array) -> Array:
    """Runs the network over the layout's slots; returns outputs ``[B, S, N]``.

    Slot inputs come from ``buffer_tokens ⊕ x0`` (padding gets MASK) and the per-slot noise level
    from ``buffer_sigma ⊕ 0`` (clean tokens are at ``sigma = 0``). A SHIFTED cell's output is about
    the next position, so a score network there is also given that position's state and level
    (``score_tokens`` / ``score_sigma_bar``, the inputs where the output is discarded); an ALIGNED
    cell's output is about its own input.
    """
    chex.assert_rank(x0, 2)
    tokens = masks.gather_inputs(layout, buffer_tokens, x0, fill=objective.mask_id)  # [B, S]
    clean_sigma = jnp.zeros(x0.shape, buffer_sigma.dtype)
    sigma_in = masks.gather_inputs(layout, buffer_sigma, clean_sigma)  # [B, S]
    score_context = {}
    if objective.score_output and layout.shifted:
        kept = jnp.asarray(layout.target_index) >= 0  # [S]
        score_context = dict(
            score_tokens=jnp.where(kept, masks.gather_targets(layout, buffer_tokens, x0), tokens),
            score_sigma_bar=jnp.where(kept, masks.gather_targets(layout, buffer_sigma, clean_sigma),
                                      sigma_in))
    out = apply_fn(tokens, jnp.asarray(layout.positions), sigma_in,
                   objective.attention_mask(layout), **score_context)
    chex.assert_shape(out, (*tokens.shape, objective.process.num_tokens))
    return out


class SlotTargets(NamedTuple):
    """What each slot's output predicts, in the slot's own context (all ``[B, S]``)."""

    clean: Array  # the clean token at the target position (0 where discarded)
    noisy: Array  # x_u at the target (MASK where discarded or settled)
    u: Array
    sigma_bar: Array
    masked: Array
    substituted: Array
    p_mask: Array


def slot_targets(objective: Objective, layout: masks.TrainingLayout, x0: Array,
                 buffer: NoisyBuffer) -> SlotTargets:
    """Gathers the target of every slot from the noisy buffer and the clean row."""
    zeros = jnp.zeros(x0.shape, jnp.float32)

    def targets(values: Array, clean: Array, fill: float | int = 0) -> Array:
        return masks.gather_targets(layout, values, clean, fill=fill)

    def flag(values: Array) -> Array:
        return targets(values.astype(jnp.int32), jnp.zeros_like(x0, jnp.int32)) > 0

    return SlotTargets(
        clean=masks.gather_clean_targets(layout, x0),
        noisy=targets(buffer.tokens, x0, fill=objective.mask_id),
        u=targets(buffer.u, zeros),
        sigma_bar=targets(buffer.sigma_bar, zeros),
        masked=flag(buffer.masked),
        substituted=flag(buffer.substituted),
        p_mask=targets(buffer.p_mask, zeros),
    )


def diffusion_term(objective: Objective, out: Array, targets: SlotTargets,
                   loss_mask: Array) -> losses.LossOutput:
    """The diffusion loss of seed 000 Eq. 10 on the slots ``loss_mask`` keeps."""
    schedule = objective.schedule
    if objective.loss_kind == "dwdse":
        return losses.dwdse(objective.process, out, targets.clean, targets.noisy,
                            targets.sigma_bar, schedule.dsigma_bar(targets.u), loss_mask)
    if objective.loss_kind == "mdlm":
        return losses.mdlm_nelbo(out, targets.clean, targets.noisy, schedule.alpha(targets.u),
                                 schedule.dalpha(targets.u), loss_mask)
    return losses.hdce(out, targets.clean, targets.masked, targets.substituted, targets.p_mask,
                       objective.process.epsilon, objective.lam, loss_mask)


def settled_log_probs(objective: Objective, out: Array) -> Array:
    """Log-probabilities of the outputs for the settled CE (log_softmax of scores for DWDSE)."""
    return jax.nn.log_softmax(out, axis=-1) if objective.score_output else out


def objective_loss(objective: Objective, apply_fn: ApplyFn, x0: Array,
                   layout: masks.TrainingLayout, u_intervals: Array, key: Array
                   ) -> tuple[Array, dict[str, Array]]:
    """The training loss of one batch (seed 000 Eq. 10) and its parts.

    Args:
      apply_fn: the network, see :data:`ApplyFn`.
      x0: ``[B, L]`` int clean rows.
      layout: the step's layout.
      u_intervals: ``[B, num_intervals]`` times (:func:`draw_levels`).
      key: PRNG key of the forward noise.
    Returns:
      ``(loss, parts)`` with parts ``"ce"`` (settled cross-entropy, when the layout has settled
      targets) and ``"diffusion"`` (when it has noisy ones).
    """
    chex.assert_rank(x0, 2)
    chex.assert_shape(u_intervals, (x0.shape[0], layout.num_intervals))
    buffer = noise_buffer(objective, key, x0, layout, u_intervals)
    out = forward(objective, apply_fn, layout, x0, buffer.tokens, buffer.sigma_bar)
    targets = slot_targets(objective, layout, x0, buffer)
    batch_shape = targets.clean.shape
    parts: dict[str, Array] = {}
    loss = jnp.zeros((), jnp.float32)
    if layout.noisy_size:
        denoise = jnp.broadcast_to(jnp.asarray(layout.denoise_slots), batch_shape)
        diffusion = diffusion_term(objective, out, targets, denoise)
        parts["diffusion"] = diffusion.loss
        loss = loss + objective.beta2 * diffusion.loss
    if objective.dynamic or bool(np.asarray(layout.settled_slots).any()):
        settled = jnp.broadcast_to(jnp.asarray(layout.settled_slots), batch_shape)
        ce = losses.settled_ce(settled_log_probs(objective, out), targets.clean, settled,
                               objective.width, reweight=False)
        parts["ce"] = ce.loss
        weight = 1.0 if objective.loss_kind == "ar" else objective.beta1
        loss = loss + weight * ce.loss
    return loss, parts
