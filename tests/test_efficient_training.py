"""Exactness of efficient training (DESIGN §3 acceptance test; seed 000 App. B.3, seed 001 App. D).

For every training layout of hybriddiff.masks (ALIGNED / SHIFTED, block / slide), one vectorized
forward of a tiny time-conditioned DiT over the layout equals, slot by slot, a loop that runs each
noisy interval with its clean prefix through `model.forward_cached` (KV cache) with the inference
semantics: the prefix is cached block by block with a full window mask for ALIGNED blocks (M_BC)
and token-causally otherwise, and the window attends densely to itself and to the cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybriddiff import masks
from hybriddiff.model import DiT, DiTConfig
from hybriddiff.model.attention import dot_product_attention
from hybriddiff.processes import GammaHybrid
from hybriddiff.schedules import LogLinear
from hybriddiff.training import objective as objective_lib

NUM_TOKENS = 11
BATCH = 2
TOLERANCE = 1e-5
MAX_LENGTH = 16  # one cache shape for every case


class Runner:
    """Jitted full and KV-cached forwards of one model (tiny shapes, few compilations)."""

    def __init__(self, dit: DiT):
        graphdef, state = nnx.split(dit)

        @jax.jit
        def full(state, tokens, positions, sigma_bar, mask):
            model = nnx.merge(graphdef, state)
            return model(tokens, positions, sigma_bar, mask=mask, deterministic=True)

        @functools.partial(jax.jit, static_argnames="update_cache")
        def cached(state, tokens, positions, sigma_bar, cache, update_cache):
            model = nnx.merge(graphdef, state)
            return model.forward_cached(
                tokens, positions, sigma_bar, cache, window_mask=None, update_cache=update_cache
            )

        self.state = state
        self._full, self._cached = full, cached
        self.empty_cache = dit.init_cache(BATCH, MAX_LENGTH, dtype=jnp.float32)

    def __call__(self, tokens, positions, sigma_bar, mask) -> np.ndarray:
        out = self._full(self.state, jnp.asarray(tokens), jnp.asarray(positions),
                         jnp.asarray(sigma_bar, jnp.float32), jnp.asarray(mask))
        return np.asarray(out)

    def cached(self, tokens, positions, sigma_bar, cache, update_cache):
        return self._cached(self.state, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(sigma_bar, jnp.float32), cache, update_cache)


@pytest.fixture(scope="module")
def model() -> Runner:
    """A tiny float32 DiT with every parameter perturbed (adaLN starts at zero otherwise)."""
    config = DiTConfig(
        num_tokens=NUM_TOKENS,
        num_layers=2,
        d_model=32,
        num_heads=4,
        cond_dim=16,
        frequency_embedding_size=32,
        time_conditioning=True,
        dropout_rate=0.0,
        remat=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        vocab_multiple=8,
    )
    dit = DiT(config, rngs=nnx.Rngs(0))
    params = nnx.state(dit, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(dit, jax.tree.unflatten(treedef, noisy))
    return Runner(dit)


def _data(layout: masks.TrainingLayout, seed: int):
    """Clean rows, per-interval noisy rows and levels, and the noisy buffer built from them.

    Unused buffer entries hold garbage (random tokens, huge levels) that must never be read.
    """
    rng = np.random.default_rng(seed)
    length, num_intervals = layout.length, layout.num_intervals
    clean = rng.integers(0, NUM_TOKENS, (BATCH, length))  # [B, L]
    noisy = rng.integers(0, NUM_TOKENS + 1, (num_intervals, BATCH, length))  # [I, B, L], MASK = N
    sigma = rng.uniform(0.2, 3.0, (num_intervals, BATCH))  # [I, B]
    interval, position = layout.noisy_interval, layout.noisy_position  # [noisy_size]
    used = interval >= 0
    buffer = rng.integers(0, NUM_TOKENS + 1, (BATCH, layout.noisy_size))
    buffer[:, used] = noisy[interval[used], :, position[used]].T
    sigma_buffer = np.full((BATCH, layout.noisy_size), 50.0)
    sigma_buffer[:, used] = sigma[interval[used]].T
    return clean, noisy, sigma, buffer, sigma_buffer


def _vectorized(model: Runner, layout: masks.TrainingLayout, clean, buffer, sigma_buffer,
                mask=None) -> np.ndarray:
    tokens = masks.gather_inputs(layout, jnp.asarray(buffer), jnp.asarray(clean), fill=NUM_TOKENS)
    sigma_bar = masks.gather_inputs(
        layout, jnp.asarray(sigma_buffer, jnp.float32), jnp.zeros(clean.shape, jnp.float32)
    )
    mask = layout.mask if mask is None else mask
    return model(tokens, layout.positions, sigma_bar, mask)  # [B, S, N]


def _fill_cache(model: Runner, clean, width: int, settled_causal: bool):
    """Caches the whole clean row with the settled semantics; returns the cache and its outputs.

    Token-causal: appended token by token. Block-causal (M_BC): appended block by block, each block
    attending to itself fully. Keys and values of a token never depend on later tokens, so the cache
    of the prefix x_clean[:, :j] is this cache with its length set to j.
    """
    cache = model.empty_cache
    step = 1 if settled_causal else width
    outputs = []
    for lo in range(0, clean.shape[1], step):
        out, cache = model.cached(
            clean[:, lo : lo + step],
            np.arange(lo, lo + step),
            np.zeros((BATCH, step)),
            cache,
            update_cache=True,
        )
        outputs.append(np.asarray(out))
    return cache, np.concatenate(outputs, axis=1)  # [B, L, N]


def _loop_window(model: Runner, layout, cache, clean, noisy, sigma, i: int):
    """Inference call for interval i: its window against the cached clean prefix x_clean[:, :start].

    Returns the window outputs [B, W, N], the window positions and the position each output
    predicts (-1: discarded), from the inference semantics of seed 000 Fig. 5.
    """
    start, end = int(layout.interval_start[i]), int(layout.interval_end[i])
    prefix_cache = dataclasses.replace(cache, length=jnp.asarray(start, jnp.int32))
    tokens = noisy[i][:, start:end]  # [B, n]
    levels = np.repeat(sigma[i][:, None], end - start, axis=1)  # [B, n]
    positions = np.arange(start, end)
    if layout.shifted:  # the last settled token is repeated as the first window input
        tokens = np.concatenate([clean[:, start - 1 : start], tokens], axis=1)
        levels = np.concatenate([np.zeros((BATCH, 1)), levels], axis=1)
        positions = np.arange(start - 1, end)
        predicts = np.where(positions + 1 < end, positions + 1, -1)
    else:
        predicts = positions
    out, _ = model.cached(tokens, positions, levels, prefix_cache, update_cache=False)
    return np.asarray(out), positions, predicts


LAYOUTS = {
    "block_aligned_L8_w2": lambda: masks.block_layout(8, 2),
    "block_aligned_L12_w4_fig8": lambda: masks.block_layout(12, 4),
    "block_shifted_L8_w2": lambda: masks.block_layout(8, 2, shifted=True),
    "block_shifted_L12_w4_fig10_padded": lambda: masks.block_layout(12, 4, True, pad_multiple=8),
    "slide_aligned_L12_w4_fig7": lambda: masks.slide_layout(12, 4, (2, 5, 11)),
    "slide_aligned_L8_w3_from0": lambda: masks.slide_layout(8, 3, (0, 1, 6)),
    "slide_shifted_L12_w4_fig9": lambda: masks.slide_layout(12, 4, (2, 5, 11), shifted=True),
    "slide_shifted_L8_w3": lambda: masks.slide_layout(8, 3, (1, 4, 7), shifted=True),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_vectorized_forward_equals_kv_cached_loop(model, name):
    layout = LAYOUTS[name]()
    clean, noisy, sigma, buffer, sigma_buffer = _data(layout, seed=len(name))
    out = _vectorized(model, layout, clean, buffer, sigma_buffer)  # [B, S, N]
    covered = np.zeros(layout.num_slots, bool)

    # Clean half: the same tokens appended to a KV cache with the settled semantics.
    cache, clean_outputs = _fill_cache(model, clean, layout.width, layout.settled_causal)
    clean_slots = layout.clean_offset + np.arange(layout.length)
    np.testing.assert_array_equal(layout.positions[clean_slots], np.arange(layout.length))
    np.testing.assert_allclose(out[:, clean_slots], clean_outputs, atol=TOLERANCE, rtol=0)
    covered[clean_slots] = True

    # Each noisy interval: its window run against the cached clean prefix.
    for i in range(layout.num_intervals):
        window_out, positions, predicts = _loop_window(model, layout, cache, clean, noisy, sigma, i)
        slots = np.flatnonzero(layout.interval_of_slot == i)
        np.testing.assert_array_equal(layout.positions[slots], positions)
        np.testing.assert_array_equal(layout.target_position[slots], predicts)
        np.testing.assert_allclose(out[:, slots], window_out, atol=TOLERANCE, rtol=0)
        covered[slots] = True

    # Everything else is padding: no keys, no loss.
    assert not layout.mask[~covered].any()
    assert np.all(layout.target_index[~covered] == -1)


SCORE_LAYOUTS = {
    "flat_shifted_L6": lambda: objective_lib.flat_layout(6, shifted=True),
    "block_shifted_L8_w2": LAYOUTS["block_shifted_L8_w2"],
    "block_shifted_L12_w4_fig10_padded": LAYOUTS["block_shifted_L12_w4_fig10_padded"],
    "slide_shifted_L12_w4_fig9": LAYOUTS["slide_shifted_L12_w4_fig9"],
}


@pytest.mark.parametrize("name", sorted(SCORE_LAYOUTS))
def test_shifted_score_cells_are_told_the_state_they_predict(name):
    """A SHIFTED cell predicts the next position, so the objective gives a score network that
    position's x_t and sigma_bar: the noisy token of the cell's interval at its target, or the
    clean token at sigma 0 for a settled cell; discarded cells keep their own input. ALIGNED
    layouts and log-probability networks are given nothing extra."""
    layout = SCORE_LAYOUTS[name]()
    kind = "flat" if name.startswith("flat") else name.split("_")[0]
    objective = objective_lib.Objective(
        process=GammaHybrid(NUM_TOKENS, 0.3), schedule=LogLinear(), loss_kind="dwdse",
        layout_kind=kind, length=layout.length, width=layout.width, shifted=True)
    clean, noisy, sigma, buffer, sigma_buffer = _data(layout, seed=len(name))
    seen = {}

    def spy(tokens, positions, sigma_bar, mask, **context):
        seen.update(context, tokens=np.asarray(tokens), sigma_bar=np.asarray(sigma_bar))
        return jnp.zeros((*tokens.shape, NUM_TOKENS))

    objective_lib.forward(objective, spy, layout, jnp.asarray(clean), jnp.asarray(buffer),
                          jnp.asarray(sigma_buffer, jnp.float32))
    expected_tokens, expected_sigma = seen["tokens"].copy(), seen["sigma_bar"].copy()
    for slot in range(layout.num_slots):
        target, interval = int(layout.target_position[slot]), int(layout.interval_of_slot[slot])
        if target < 0:
            continue
        if interval >= 0:
            expected_tokens[:, slot] = noisy[interval][:, target]
            expected_sigma[:, slot] = sigma[interval]
        else:
            expected_tokens[:, slot], expected_sigma[:, slot] = clean[:, target], 0.0
    np.testing.assert_array_equal(np.asarray(seen["score_tokens"]), expected_tokens)
    np.testing.assert_allclose(np.asarray(seen["score_sigma_bar"]), expected_sigma, rtol=1e-6)
    assert (expected_tokens != seen["tokens"]).any()  # the context is not the cells' inputs
    for other in (dataclasses.replace(objective, loss_kind="mdlm"),
                  dataclasses.replace(objective, shifted=False)):
        seen.clear()
        plain = other.static_layout() if other.layout_kind != "slide" else \
            masks.slide_layout(12, 4, (2, 5, 11), shifted=other.shifted)
        other_clean, _, _, other_buffer, other_sigma = _data(plain, seed=0)
        objective_lib.forward(other, spy, plain, jnp.asarray(other_clean),
                              jnp.asarray(other_buffer), jnp.asarray(other_sigma, jnp.float32))
        assert "score_tokens" not in seen and "score_sigma_bar" not in seen


def test_time_conditioning_and_mask_are_live(model):
    """The exactness test could fail: wrong levels or a wrong mask change the outputs."""
    layout = masks.slide_layout(12, 4, (2, 5, 11), shifted=True)
    clean, _, _, buffer, sigma_buffer = _data(layout, seed=0)
    reference = _vectorized(model, layout, clean, buffer, sigma_buffer)
    window = layout.interval_of_slot >= 0
    flat_levels = _vectorized(model, layout, clean, buffer, np.ones_like(sigma_buffer))
    assert np.max(np.abs(reference - flat_levels)[:, window]) > 1e-3
    causal = masks.causal_mask(layout.num_slots)
    wrong_mask = _vectorized(model, layout, clean, buffer, sigma_buffer, mask=causal)
    assert np.max(np.abs(reference - wrong_mask)[:, window]) > 1e-3


def test_rows_without_keys_give_zeros_and_no_loss(model):
    """Padding rows (truncated windows) attend to nothing: zero attention, no loss, no influence."""
    layout = masks.slide_layout(8, 3, (1, 4, 7), shifted=True)
    empty = ~layout.mask.any(axis=1)
    assert empty.any()
    assert not layout.denoise_slots[empty].any() and not layout.settled_slots[empty].any()

    # The attention kernel returns exact zeros on those rows with this mask.
    q, k, v = jax.random.normal(jax.random.key(2), (3, 1, layout.num_slots, 4, 8))
    attended = np.asarray(dot_product_attention(q, k, v, layout.mask))
    assert np.all(attended[:, empty] == 0.0) and np.all(np.abs(attended[:, ~empty]) > 0.0)

    # The model's output there depends on nothing else: it equals an isolated one-token forward.
    clean, _, _, buffer, sigma_buffer = _data(layout, seed=3)
    out = _vectorized(model, layout, clean, buffer, sigma_buffer)
    other_clean, _, _, other_buffer, other_sigma = _data(layout, seed=4)
    other = _vectorized(model, layout, other_clean, other_buffer, other_sigma)
    np.testing.assert_array_equal(out[:, empty], other[:, empty])
    for slot in np.flatnonzero(empty):
        alone = model(
            np.full((BATCH, 1), NUM_TOKENS),
            layout.positions[slot : slot + 1],
            np.zeros((BATCH, 1)),
            np.zeros((1, 1), bool),
        )
        np.testing.assert_allclose(out[:, slot : slot + 1], alone, atol=TOLERANCE, rtol=0)
