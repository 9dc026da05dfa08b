"""KV-cached generation: window drivers for any hyperschedule and BD3-LM arbitrary-length sampling
(seed 000 §3.3 and App. B.4, Fig. 6; seed 001 Alg. 2).

Window driver (:func:`generate_cached`). At transition ``t -> t+1`` the hyperschedule partitions the
positions into a settled prefix ``[0, s)``, the active window ``[s, w)`` and the worthless suffix
``[w, d)`` (:meth:`Hyperschedule.partition`). Settled tokens live in a KV cache, appended once, in
the step where they become settled; the active window is denoised with
``forward_cached(update_cache=False)``; worthless positions are never fed (window cells past ``w``
are masked out of the attention, so the valid cells' outputs are those of a window without them).
The loop is one jitted ``jax.lax.scan`` with a static window size ``W = max_t (w - s)`` (the
hyperschedule's width for the constructors) and a traced cache length.

* ALIGNED (seed 000 Fig. 9 left): the window cells are the active positions, cell ``j`` predicts
  position ``s + j``.
* SHIFTED (seed 000 Fig. 9–10): the window starts by repeating the last settled token at its own
  position with ``sigma_bar = 0``; cell ``j`` predicts position ``s + j`` from the cell at
  ``s + j - 1`` and the last cell's output is discarded (``W + 1`` cells). Position 0 has no
  predecessor, so it must be fixed (a prompt / BOS token); the driver uses ``s = max(s, 1)``.
  A score network's head is told the state and level of the position each cell predicts
  (``score_tokens`` / ``score_sigma_bar``; in ALIGNED that is the cell's own input).

Cache filling (``fill``), matching the training layouts of :mod:`hybriddiff.masks`: ``"causal"``
appends newly settled tokens token-causally (SHIFTED, and ALIGNED slides), ``"block"`` appends the
tokens that settle at the same step with full attention among them (ALIGNED blocks: the block-causal
M_BC of seed 001 App. D). The default is ``"causal"`` for SHIFTED and ``"block"`` for ALIGNED (for
a slide with ρ = 1 one token settles per step and the two coincide). Appending is one network call
(``cache_calls``) per step in which the settled prefix grows.

Prompts (``prefill``, on by default): the leading positions that are fixed in every row (a prompt of
``P`` tokens, or the BOS of SHIFTED) are written into the cache by one network call before the
loop, with the attention the step-by-step appends would have used among them (causal, or
block-causal by the step at which the unprompted hyperschedule settles each position); the loop
then starts with ``s >= P`` and spends no call on windows inside the prompt. When the prompt ends on
a window boundary of the hyperschedule this is the same computation as without prefill; inside a
window, the prompt tokens are read from the cache instead of being re-fed with the window. A transition whose window levels do
not change skips the network (e.g. quench step 0 in SHIFTED, where position 0 is fixed).

With ``use_cache=False`` the same loop runs without a cache: every call is a full forward over the
whole sequence (clean slots for the settled prefix, then the window cells) with the inference mask,
so both paths are the same computation and the cache only removes work.

Arbitrary length (:func:`generate_blocks`, BD3-LM / seed 001 Alg. 2): blocks of ``block_width``
generated left to right past the training length, each denoised by a per-block flat schedule
against the cache and then appended to it (rotary positions continue); the cache is preallocated to
the requested ``max_length``. A sequence stops at EOS or when the mean predicted entropy of its
last block falls below ``entropy_threshold``; the loop (``jax.lax.while_loop``) ends when every
sequence has stopped or ``max_length`` is reached.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybriddiff.hyperschedules import Hyperschedule, flat
from hybriddiff.masks import block_causal_mask
from hybriddiff.model.cache import KVCache, init_cache
from hybriddiff.sampling.generate import (GenerationResult, ReverseStep, check_model,
                                          check_shifted_start, check_state, masked_noise,
                                          merge_for_inference, network_sigma, score_context,
                                          with_start)
from hybriddiff.sampling.steps import level_noise
from hybriddiff.sampling.unmasking import prediction_entropy
from hybriddiff.schedules import NoiseSchedule

__all__ = ["WindowPlan", "generate_blocks", "generate_cached", "window_plan"]

Array = jax.Array
Fill = Literal["causal", "block"]


class WindowPlan(NamedTuple):
    """Static per-transition layout of the window driver (numpy, from the hyperschedule).

    settled: [T] effective settled prefix ``s`` (``max(s, 1)`` in SHIFTED, ``max(s, P)`` with a
    prefilled prompt of ``P`` tokens); worthless: [T] ``w``; previous: [T] settled prefix already
    cached before step t; call: [T] bool, the window has a level change; append: [T] bool, the
    cache grows; group: [d] the step at which the unprompted hyperschedule appends a position
    (``T`` if never; it fixes which settled tokens attend to which); width: static W;
    append_width: static number of append cells; prefix: static P.
    """

    settled: np.ndarray
    worthless: np.ndarray
    previous: np.ndarray
    call: np.ndarray
    append: np.ndarray
    group: np.ndarray
    width: int
    append_width: int
    prefix: int


def _append_groups(settled: np.ndarray, length: int) -> np.ndarray:
    """[d] the step at which a settled prefix growing as ``settled [T]`` appends each position."""
    group = np.full(length, len(settled), np.int64)
    previous = np.concatenate([[0], settled[:-1]])
    for t in np.flatnonzero(settled > previous)[::-1]:
        group[previous[t]:settled[t]] = t
    return group


def window_plan(hyperschedule: Hyperschedule, shifted: bool, prefix: int = 0) -> WindowPlan:
    """The :class:`WindowPlan` of ``hyperschedule`` for ALIGNED (``shifted=False``) or SHIFTED,
    with the first ``prefix`` positions prefilled into the cache before the loop."""
    if isinstance(prefix, bool) or not isinstance(prefix, (int, np.integer)) or not (
            0 <= prefix <= hyperschedule.length):
        raise ValueError(f"prefix must be an integer in [0, {hyperschedule.length}], got "
                         f"prefix={prefix!r}")
    tau = hyperschedule.tau
    natural = hyperschedule.settled_per_step.astype(np.int64)
    if shifted:
        natural = np.maximum(natural, 1)
    settled = np.maximum(natural, prefix)
    worthless = hyperschedule.worthless_start_per_step.astype(np.int64)
    index = np.arange(hyperschedule.length)
    in_window = (index[None, :] >= settled[:, None]) & (index[None, :] < worthless[:, None])
    call = np.any(in_window & (tau[:-1] != tau[1:]), axis=1)
    previous = np.concatenate([[prefix], settled[:-1]])
    append = settled > previous
    width = int(max(1, (worthless - settled).max()))
    append_width = int(max(1, (settled - previous).max()))
    return WindowPlan(settled, worthless, previous, call, append,
                      _append_groups(natural, hyperschedule.length), width, append_width,
                      int(prefix))


def _append_mask(valid: Array, fill: Fill) -> Array:
    """[A, A] attention among the cells appended at once: valid pairs, causal or full."""
    pairs = valid[:, None] & valid[None, :]
    if fill == "causal":
        return pairs & jnp.tril(jnp.ones(pairs.shape, bool))
    return pairs


def _settled_mask(group: Array, fill: Fill) -> Array:
    """[n, n] attention among settled positions with append steps ``group [n]``: causal, or
    block-causal by append step (what appending them step by step gives)."""
    if fill == "causal":
        return jnp.tril(jnp.ones((group.shape[0],) * 2, bool))
    return group[None, :] <= group[:, None]


@functools.partial(jax.jit, static_argnames=("graphdef", "hyperschedule", "schedule", "step",
                                             "shifted", "fill", "use_cache", "cache_dtype",
                                             "prefix", "return_trajectory"))
def generate_cached_jit(graphdef: nnx.GraphDef, state: nnx.State, key: Array, tokens: Array,
                        fixed: Array, *, hyperschedule: Hyperschedule, schedule: NoiseSchedule,
                        step: ReverseStep, shifted: bool, fill: Fill, use_cache: bool,
                        cache_dtype: Any, prefix: int = 0, return_trajectory: bool = False
                        ) -> tuple[Array, Array | None]:
    """The jitted scan of :func:`generate_cached` over ``nnx.split(model)``: tokens [B, d] and,
    with ``return_trajectory``, the states [T + 1, B, d] (else None)."""
    config = nnx.merge(graphdef, state).config
    plan = window_plan(hyperschedule, shifted, prefix)
    batch, length = tokens.shape
    width, append_width = plan.width, plan.append_width
    cells = width + int(shifted)
    pad = cells + append_width
    num_levels = hyperschedule.num_levels
    x_pad = jnp.concatenate([tokens, jnp.full((batch, pad), config.mask_id, jnp.int32)], 1)
    fixed_pad = jnp.concatenate([fixed, jnp.ones((batch, pad), bool)], 1)
    tau_pad = jnp.pad(hyperschedule.tau_jnp(), ((0, 0), (0, pad)))  # [T+1, d + pad]
    group = jnp.asarray(np.concatenate([plan.group, np.full(pad, hyperschedule.num_steps)]))
    slots = jnp.arange(length)
    cache = init_cache(config, batch, length + append_width, cache_dtype) if use_cache else None
    if use_cache and prefix:
        model = merge_for_inference(graphdef, state)
        sigma = jnp.zeros((batch, prefix), jnp.float32) if config.needs_sigma_bar else None
        _, cache = model.forward_cached(tokens[:, :prefix], jnp.arange(prefix), sigma, cache,
                                        window_mask=_settled_mask(group[:prefix], fill),
                                        update_cache=True)
        cache = dataclasses.replace(cache, length=jnp.asarray(prefix, jnp.int32))

    def append(carry: tuple[Array, KVCache], t_inputs: tuple[Array, ...]) -> tuple[Array, KVCache]:
        x, cache = carry
        model = merge_for_inference(graphdef, state)
        _, _, _, settled, _, previous, _, _ = t_inputs
        cell_positions = previous + jnp.arange(append_width)  # [A]
        valid = cell_positions < settled
        cell_tokens = jax.lax.dynamic_slice_in_dim(x, previous, append_width, axis=1)
        sigma = jnp.zeros((batch, append_width), jnp.float32) if config.needs_sigma_bar else None
        _, cache = model.forward_cached(cell_tokens, cell_positions, sigma, cache,
                                        window_mask=_append_mask(valid, fill), update_cache=True)
        return x, dataclasses.replace(cache, length=settled.astype(jnp.int32))

    def denoise(carry: tuple[Array, KVCache | None], t_inputs: tuple[Array, ...]
                ) -> tuple[Array, KVCache | None]:
        x, cache = carry
        model = merge_for_inference(graphdef, state)
        t, level_now, level_next, settled, worthless, _, _, _ = t_inputs
        base = settled - int(shifted)
        cell_positions = base + jnp.arange(cells)  # [Wc]
        valid = cell_positions < worthless
        window_mask = valid[:, None] & valid[None, :]
        cell_tokens = jax.lax.dynamic_slice_in_dim(x, base, cells, axis=1)  # [B, Wc]
        cell_fixed = jax.lax.dynamic_slice_in_dim(fixed_pad, base, cells, axis=1)
        cell_levels = jax.lax.dynamic_slice_in_dim(level_now, base, cells)
        cell_noise = masked_noise(schedule, jnp.broadcast_to(cell_levels, (batch, cells)),
                                  num_levels, cell_fixed | (cell_positions < settled))
        sigma = network_sigma(config, cell_noise)
        # cell c predicts position settled + c (its own position unless SHIFTED); the first
        # W of these positions are the window the step updates
        ahead_tokens = jax.lax.dynamic_slice_in_dim(x, settled, cells, axis=1)  # [B, Wc]
        ahead_fixed = jax.lax.dynamic_slice_in_dim(fixed_pad, settled, cells, axis=1)
        ahead_levels = jax.lax.dynamic_slice_in_dim(level_now, settled, cells)  # [Wc]
        ahead_noise = masked_noise(schedule, jnp.broadcast_to(ahead_levels, (batch, cells)),
                                   num_levels, ahead_fixed)
        scoring = score_context(config, ahead_tokens, ahead_noise)
        if use_cache:
            output, _ = model.forward_cached(cell_tokens, cell_positions, sigma, cache,
                                             window_mask=window_mask, update_cache=False,
                                             **scoring)
        else:
            seen = slots < settled
            clean = _settled_mask(group[:length], fill) & seen[None, :] & seen[:, None]  # [d, d]
            top = jnp.concatenate([clean, jnp.zeros((length, cells), bool)], 1)
            bottom = jnp.concatenate([jnp.broadcast_to(seen, (cells, length)), window_mask], 1)
            full_sigma = None if sigma is None else jnp.concatenate(
                [jnp.zeros((batch, length), sigma.dtype), sigma], 1)
            full_scoring = {name: jnp.concatenate([jnp.zeros((batch, length), value.dtype), value],
                                                  1) for name, value in scoring.items()}
            output = model(jnp.concatenate([x[:, :length], cell_tokens], 1),
                           jnp.concatenate([slots, cell_positions]), full_sigma,
                           mask=jnp.concatenate([top, bottom], 0), **full_scoring)[:, length:]
        target = ahead_tokens[:, :width]  # [B, W]
        target_positions = settled + jnp.arange(width)
        moving = (target_positions < worthless)[None, :] & ~ahead_fixed[:, :width]  # [B, W]
        levels_now = jnp.broadcast_to(ahead_levels[:width], (batch, width))
        levels_next = jnp.where(moving, jax.lax.dynamic_slice_in_dim(level_next, settled, width),
                                levels_now)
        now = masked_noise(schedule, levels_now, num_levels, ~moving)
        nxt = masked_noise(schedule, levels_next, num_levels, ~moving)
        x_next = step(jax.random.fold_in(key, t), target, output[:, :width], now, nxt)
        x_next = jnp.where(moving, x_next.astype(x.dtype), target)
        return jax.lax.dynamic_update_slice_in_dim(x, x_next, settled, axis=1), cache

    def body(carry: tuple[Array, KVCache | None], t_inputs: tuple[Array, ...]
             ) -> tuple[tuple[Array, KVCache | None], Array | None]:
        *_, needs_append, needs_call = t_inputs
        if use_cache:
            carry = jax.lax.cond(needs_append, append, lambda c, _: c, carry, t_inputs)
        carry = jax.lax.cond(needs_call, denoise, lambda c, _: c, carry, t_inputs)
        return carry, carry[0][:, :length] if return_trajectory else None

    as_int = functools.partial(jnp.asarray, dtype=jnp.int32)
    inputs = (jnp.arange(hyperschedule.num_steps, dtype=jnp.int32), tau_pad[:-1], tau_pad[1:],
              as_int(plan.settled), as_int(plan.worthless), as_int(plan.previous),
              jnp.asarray(plan.append), jnp.asarray(plan.call))
    (x, _), states = jax.lax.scan(body, (x_pad, cache), inputs)
    chex.assert_shape(x, (batch, length + pad))
    return x[:, :length], with_start(tokens, states)


def generate_cached(model: nnx.Module, key: Array, hyperschedule: Hyperschedule,
                    schedule: NoiseSchedule, step: ReverseStep, *, tokens: Array,
                    fixed: Array | None = None, shifted: bool = False, fill: Fill | None = None,
                    use_cache: bool = True, cache_dtype: Any = None, prefill: bool = True,
                    return_trajectory: bool = False) -> GenerationResult:
    """Window generation with a KV cache over the settled prefix (module docstring).

    Args:
      model: a DiT (or a module with the same interface).
      key: PRNG key; transition ``t`` uses ``fold_in(key, t)``.
      hyperschedule: any hyperschedule (block, slide, quench, user array) of length d.
      schedule: the noise schedule.
      step: the reverse step, called on the W window positions.
      tokens: initial state [B, d] (:func:`hybriddiff.sampling.generate.prompt_state`).
      fixed: [B, d] positions that never change; SHIFTED needs position 0 fixed.
      shifted: SHIFTED (True) or ALIGNED (False) layout.
      fill: ``"causal"`` or ``"block"`` cache filling; default causal for SHIFTED, block for
        ALIGNED.
      use_cache: False runs the same loop with full forwards over prefix + window (reference).
      cache_dtype: dtype of the cached keys / values, default the model's compute dtype.
      prefill: settle the leading positions fixed in every row (a prompt) before the loop, in one
        call (module docstring); the reference path (``use_cache=False``) uses the same plan.
      return_trajectory: also return the state after every transition, [T + 1, B, d].
    Returns:
      :class:`GenerationResult`: tokens [B, d], ``nfe`` window calls, ``cache_calls`` appends
      (the prefill included), and the trajectory when asked.
    """
    check_model(model)
    config = model.config
    tokens, fixed = check_state(tokens, fixed, hyperschedule.length)
    if fill is None:
        fill = "causal" if shifted else "block"
    if fill not in ("causal", "block"):
        raise ValueError(f"fill must be 'causal' or 'block', got fill={fill!r}")
    if shifted:
        check_shifted_start(fixed)
    prefix = fixed_prefix(fixed) if prefill else 0
    plan = window_plan(hyperschedule, shifted, prefix)
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    x, states = generate_cached_jit(
        graphdef, state, key, tokens, fixed, hyperschedule=hyperschedule, schedule=schedule,
        step=step, shifted=bool(shifted), fill=fill, use_cache=bool(use_cache),
        cache_dtype=jnp.dtype(cache_dtype or config.dtype), prefix=prefix,
        return_trajectory=bool(return_trajectory))
    x, states = jax.block_until_ready((x, states))
    seconds = time.perf_counter() - start
    cache_calls = int(plan.append.sum()) + int(prefix > 0) if use_cache else 0
    return GenerationResult(tokens=x, nfe=int(plan.call.sum()), cache_calls=cache_calls,
                            seconds=seconds, trajectory=states)


def fixed_prefix(fixed: Array) -> int:
    """The number of leading positions fixed in every row of ``fixed [B, d]`` (a host value)."""
    leading = np.cumprod(np.all(np.asarray(fixed), axis=0))
    return int(leading.sum())


@functools.partial(jax.jit, static_argnames=("graphdef", "block_schedule", "schedule", "step",
                                             "num_blocks", "eos_id", "entropy_threshold",
                                             "cache_dtype"))
def generate_blocks_jit(graphdef: nnx.GraphDef, state: nnx.State, key: Array, prompt: Array, *,
                        block_schedule: Hyperschedule, schedule: NoiseSchedule, step: ReverseStep,
                        num_blocks: int, eos_id: int | None, entropy_threshold: float | None,
                        cache_dtype: Any) -> tuple[Array, Array, Array]:
    """The jitted block loop of :func:`generate_blocks`.

    Returns (tokens [B, P + num_blocks * omega], lengths [B], number of generated blocks).
    """
    config = nnx.merge(graphdef, state).config
    batch, prompt_length = prompt.shape
    width = block_schedule.length
    total = prompt_length + num_blocks * width
    pad_id = config.mask_id if eos_id is None else eos_id
    num_levels = block_schedule.num_levels
    tau = block_schedule.tau_jnp()  # [K+1, omega]
    cache = init_cache(config, batch, total, cache_dtype)
    zeros = jnp.zeros((batch, width), jnp.float32) if config.needs_sigma_bar else None
    if prompt_length:
        model = merge_for_inference(graphdef, state)
        prompt_sigma = jnp.zeros((batch, prompt_length), jnp.float32) if config.needs_sigma_bar else None
        _, cache = model.forward_cached(prompt, jnp.arange(prompt_length), prompt_sigma, cache,
                                        window_mask=block_causal_mask(prompt_length,
                                                                    min(width, prompt_length)),
                                        update_cache=True)
    tokens = jnp.full((batch, total), pad_id, jnp.int32).at[:, :prompt_length].set(prompt)

    def not_finished(carry: tuple[Any, ...]) -> Array:
        block, _, _, done, _ = carry
        return (block < num_blocks) & ~jnp.all(done)

    def one_block(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        block, tokens, cache, done, lengths = carry
        model = merge_for_inference(graphdef, state)
        start = prompt_length + block * width
        positions = start + jnp.arange(width)  # [omega]
        block_key = jax.random.fold_in(key, block)

        def denoise(inner: tuple[Array, Array], k_inputs: tuple[Array, Array, Array]
                    ) -> tuple[tuple[Array, Array], None]:
            x, _ = inner
            k, level_now, level_next = k_inputs
            now = level_noise(schedule, jnp.broadcast_to(level_now, (batch, width)), num_levels)
            nxt = level_noise(schedule, jnp.broadcast_to(level_next, (batch, width)), num_levels)
            output, _ = model.forward_cached(x, positions, network_sigma(config, now), cache)
            x = step(jax.random.fold_in(block_key, k), x, output, now, nxt).astype(jnp.int32)
            return (x, jnp.mean(prediction_entropy(output), axis=-1)), None

        masked = jnp.full((batch, width), config.mask_id, jnp.int32)
        steps = jnp.arange(block_schedule.num_steps, dtype=jnp.int32)
        (x, entropy), _ = jax.lax.scan(denoise, (masked, jnp.zeros(batch, jnp.float32)),
                                       (steps, tau[:-1], tau[1:]))
        _, cache = model.forward_cached(x, positions, zeros, cache, update_cache=True)
        if eos_id is None:
            has_eos = jnp.zeros(batch, bool)
            first_eos = jnp.full(batch, width)
        else:
            is_eos = x == eos_id
            has_eos = jnp.any(is_eos, axis=-1)
            first_eos = jnp.where(has_eos, jnp.argmax(is_eos, axis=-1), width)
        low_entropy = (jnp.zeros(batch, bool) if entropy_threshold is None
                       else entropy < entropy_threshold)
        keep = (jnp.arange(width)[None, :] <= first_eos[:, None]) & ~done[:, None]
        x = jnp.where(keep, x, pad_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, x, start, axis=1)
        lengths = jnp.where(done, lengths, start + jnp.minimum(first_eos + 1, width)).astype(
            jnp.int32)
        done = done | has_eos | low_entropy
        return block + 1, tokens, cache, done, lengths

    carry = (jnp.zeros((), jnp.int32), tokens, cache, jnp.zeros(batch, bool),
             jnp.full(batch, prompt_length, jnp.int32))
    blocks, tokens, _, _, lengths = jax.lax.while_loop(not_finished, one_block, carry)
    return tokens, lengths, blocks


def generate_blocks(model: nnx.Module, key: Array, *, block_width: int, max_length: int,
                    schedule: NoiseSchedule, step: ReverseStep, num_levels: int | None = None,
                    steps_per_block: int | None = None, prompt: Array | None = None,
                    batch_size: int | None = None, eos_id: int | None = None,
                    entropy_threshold: float | None = None,
                    cache_dtype: Any = None) -> GenerationResult:
    """BD3-LM arbitrary-length generation, block by block with a KV cache (module docstring).

    Args:
      model: a DiT trained with the block layout (ALIGNED).
      key: PRNG key; block b, denoising step k use ``fold_in(fold_in(key, b), k)``.
      block_width: omega.
      max_length: total length (prompt included); may exceed the training length. Generation
        runs in whole blocks; the output is cut to ``max_length``.
      schedule: noise schedule; step: reverse step on the block's omega positions.
      num_levels, steps_per_block: the per-block flat schedule ``flat(omega, num_levels,
        steps_per_block)``; both default to omega (rho = 1).
      prompt: [B, P] conditioning tokens, or None with ``batch_size``. The prompt is cached
        block-causally in blocks of omega from position 0 and generated blocks start at P, so P a
        multiple of omega reproduces the training block boundaries exactly.
      eos_id: a sequence stops after the block in which it draws EOS; later positions hold EOS.
      entropy_threshold: a sequence also stops after a block whose mean predicted entropy (nats,
        last denoising call) is below this.
      cache_dtype: key / value dtype, default the model's compute dtype.
    Returns:
      :class:`GenerationResult`: tokens [B, max_length] (EOS, or MASK without ``eos_id``, past a
      sequence's end), ``lengths`` [B] (through its EOS or its last block), ``nfe`` and
      ``cache_calls`` (int32 arrays: blocks x steps and appended blocks, prompt included).
    """
    check_model(model)
    config = model.config
    for name, value in (("block_width", block_width), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    if prompt is None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer when prompt is None, got "
                             f"batch_size={batch_size!r}")
        prompt = jnp.zeros((batch_size, 0), jnp.int32)
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an integer array [batch, P], got {prompt.dtype} "
                         f"{tuple(prompt.shape)}")
    if max_length <= prompt.shape[1]:
        raise ValueError(f"max_length must exceed the prompt length {prompt.shape[1]}, got "
                         f"max_length={max_length}")
    if eos_id is not None and not 0 <= eos_id < config.num_tokens:
        raise ValueError(f"eos_id must be an ordinary token in 0..{config.num_tokens - 1}, got "
                         f"eos_id={eos_id!r}")
    num_levels = block_width if num_levels is None else num_levels
    block_schedule = flat(block_width, num_levels, steps_per_block)
    num_blocks = -(-(max_length - prompt.shape[1]) // block_width)
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    tokens, lengths, blocks = generate_blocks_jit(
        graphdef, state, key, prompt.astype(jnp.int32), block_schedule=block_schedule,
        schedule=schedule, step=step, num_blocks=num_blocks, eos_id=eos_id,
        entropy_threshold=None if entropy_threshold is None else float(entropy_threshold),
        cache_dtype=jnp.dtype(cache_dtype or config.dtype))
    tokens = jax.block_until_ready(tokens)
    seconds = time.perf_counter() - start
    return GenerationResult(tokens=tokens[:, :max_length], nfe=blocks * block_schedule.num_steps,
                            cache_calls=blocks + int(prompt.shape[1] > 0), seconds=seconds,
                            lengths=jnp.minimum(lengths, max_length))
