"""Tests of the generation drivers (hybriddiff.sampling.generate / cached) on a tiny DiT.

References are independent Python loops: per step a full forward over the visible prefix + the
window with the inference mask (seed 000 Fig. 6), greedy autoregressive decoding, and a loop over
the flat schedule calling the network and the reverse step directly.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybriddiff import hyperschedules as hs
from hybriddiff.data import ByteTokenizer
from hybriddiff.model import DiT, DiTConfig
from hybriddiff.model.sharding import activate, make_mesh
from hybriddiff.sampling.cached import generate_blocks, generate_cached, window_plan
from hybriddiff.sampling.categorical import CategoricalConfig
from hybriddiff.processes import GammaHybrid
from hybriddiff.sampling.generate import (MDLMReverse, ScoreReverse, UnmaskReverse, generate,
                                          prompt_state)
from hybriddiff.sampling.score import analytic_step, euler_step
from hybriddiff.sampling.steps import level_noise
from hybriddiff.sampling.unmasking import UnmaskingConfig
from hybriddiff.sampling import drive
from hybriddiff.schedules import LogLinear
from hybriddiff.training import config as config_lib
from hybriddiff.training import core

N = 11
MASK = N
SCHEDULE = LogLinear()
STEP = MDLMReverse(CategoricalConfig(top_k=1))  # greedy tokens, random transfer decisions
STEP_JIT = jax.jit(STEP)  # the reference loops call the step at one shape: compile it once


@pytest.fixture(scope="module")
def model() -> DiT:
    config = DiTConfig(num_tokens=N, num_layers=2, d_model=32, num_heads=2, cond_dim=16,
                       frequency_embedding_size=16, dropout_rate=0.0, dtype=jnp.float32)
    dit = DiT(config, rngs=nnx.Rngs(0))
    # Non-zero adaLN so that the network really reads sigma_bar.
    for path, node in nnx.iter_graph(dit):
        if isinstance(node, nnx.Param) and "modulation" in "/".join(map(str, path)):
            node[...] = 0.3 * jax.random.normal(jax.random.key(len(path)), node[...].shape)
    return dit


@pytest.fixture(scope="module")
def score_model(model: DiT) -> DiT:
    """The same network with SEDD's score head (a γ-hybrid model)."""
    graphdef, state = nnx.split(model)
    dit = DiT(dataclasses.replace(model.config, output="score"), rngs=nnx.Rngs(0))
    nnx.update(dit, nnx.state(nnx.merge(graphdef, state)))
    return dit


@pytest.fixture(scope="module")
def timeless_model(model: DiT) -> DiT:
    """A network that reads no noise level (ε-hybrid / MDLM without time conditioning)."""
    dit = DiT(dataclasses.replace(model.config, time_conditioning=False), rngs=nnx.Rngs(3))
    assert not dit.config.needs_sigma_bar
    return dit


SCORE_STEP = ScoreReverse(GammaHybrid(N, 0.3))
SCORE_STEP_JIT = jax.jit(SCORE_STEP)
_LEVEL_NOISE = jax.jit(level_noise, static_argnums=(0, 2))


_PADDED = 12  # every reference forward is padded to this many slots: one compilation


@nnx.jit
def _jit_forward(model: DiT, tokens: jax.Array, positions: jax.Array, sigma: jax.Array,
                 mask: jax.Array, score: dict[str, jax.Array]) -> jax.Array:
    return model(tokens, positions, sigma, mask=mask, **score)


def _forward(model: DiT, tokens: np.ndarray, positions: np.ndarray, sigma: np.ndarray,
             mask: np.ndarray, score_tokens: np.ndarray | None = None,
             score_sigma: np.ndarray | None = None) -> np.ndarray:
    """The full forward over ``tokens [B, S]`` with the inference ``mask [S, S]`` (and the state
    ``score_tokens`` / ``score_sigma`` [B, S] each cell predicts, for score models); the input is
    padded with slots that attend to nothing and that nothing attends to."""
    batch, size = tokens.shape
    extra = _PADDED - size
    full_mask = np.zeros((_PADDED, _PADDED), bool)
    full_mask[:size, :size] = mask
    pad = lambda a: np.pad(a, ((0, 0), (0, extra)))  # noqa: E731
    score = {} if score_tokens is None else dict(
        score_tokens=jnp.asarray(pad(score_tokens), jnp.int32),
        score_sigma_bar=jnp.asarray(pad(score_sigma), jnp.float32))
    out = _jit_forward(model, jnp.asarray(pad(tokens)), jnp.asarray(np.pad(positions, (0, extra))),
                       jnp.asarray(pad(sigma), jnp.float32), jnp.asarray(full_mask), score)
    return np.array(out)[:, :size]


def _noise(levels: np.ndarray, num_levels: int):
    return _LEVEL_NOISE(SCHEDULE, jnp.asarray(levels), num_levels)


def _window_reference(model: DiT, key: jax.Array, schedule: hs.Hyperschedule, tokens: jax.Array,
                      fixed: jax.Array, shifted: bool, fill: str, prefix: int = 0,
                      step=STEP_JIT) -> np.ndarray:
    """Loop over transitions: full forward over settled prefix + window with the inference mask;
    the first ``prefix`` positions count as settled from the start (a prefilled prompt), attending
    among themselves as the unprompted appends would. A score model is told, for each window
    cell, the state of the position it predicts (the next one when SHIFTED)."""
    x = np.array(tokens)
    fixed = np.array(fixed)
    batch, length = x.shape
    tau, levels = schedule.tau, schedule.num_levels
    parts = [schedule.partition(t) for t in range(schedule.num_steps)]
    natural = [max(p.settled, 1) if shifted else p.settled for p in parts]
    starts = [max(s, prefix) for s in natural]
    width = max(1, max(p.worthless_start - s for p, s in zip(parts, starts)))
    group = np.full(length, 10 ** 6)
    cached = 0
    for t, s in enumerate(natural):
        group[cached:s] = t
        cached = max(cached, s)
    for t, (part, s) in enumerate(zip(parts, starts)):
        w = part.worthless_start
        if w <= s or not np.any(tau[t, s:w] != tau[t + 1, s:w]):
            continue
        cells = list(range(s - 1 if shifted else s, w))
        seq = np.concatenate([x[:, :s], x[:, cells]], axis=1)
        positions = np.array(list(range(s)) + cells)
        cell_levels = np.where(fixed[:, cells] | (np.array(cells) < s), 0, tau[t, cells])
        sigma = np.concatenate([np.zeros((batch, s)),
                                np.array(_noise(cell_levels, levels).sigma_bar)], axis=1)
        size = s + len(cells)
        q, k = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        if fill == "causal":
            prefix = k <= q
        else:
            prefix = group[np.minimum(k, length - 1)] <= group[np.minimum(q, length - 1)]
        mask = np.where(q < s, (k < s) & prefix, True)
        score_tokens = score_sigma = None
        if model.config.output == "score":
            ahead = [min(c + int(shifted), length - 1) for c in cells]  # the last is discarded
            ahead_levels = np.where(fixed[:, ahead], 0, tau[t, ahead])
            score_tokens = np.concatenate([x[:, :s], x[:, ahead]], axis=1)
            score_sigma = np.concatenate([np.zeros((batch, s)),
                                          np.array(_noise(ahead_levels, levels).sigma_bar)], 1)
        out = _forward(model, seq, positions, sigma, mask, score_tokens, score_sigma)[:, s:]
        count = w - s
        target = np.full((batch, width), MASK)
        target[:, :count] = x[:, s:w]
        output = np.zeros((batch, width, N), np.float32)
        output[:, :count] = out[:, :count]
        moving = np.zeros((batch, width), bool)
        moving[:, :count] = ~fixed[:, s:w]
        now_levels = np.zeros((batch, width), int)
        now_levels[:, :count] = tau[t, s:w]
        next_levels = np.where(moving, np.pad(tau[t + 1, s:w], (0, width - count))[None],
                               now_levels)
        now_levels = np.where(moving, now_levels, 0)
        next_levels = np.where(moving, next_levels, 0)
        new = np.array(step(jax.random.fold_in(key, t), jnp.asarray(target),
                            jnp.asarray(output), _noise(now_levels, levels),
                            _noise(next_levels, levels)))
        x[:, s:w] = np.where(moving, new, target)[:, :count]
    return x


@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("schedule,shifted,fill", [
    (hs.block(8, 2, 2), False, "block"),
    (hs.slide(8, 3, 3), True, "causal"),
    (hs.slide(8, 3, 3, 5), False, "causal"),  # quick draft: several tokens settle per step
])
def test_cached_equals_uncached_reference(model: DiT, schedule: hs.Hyperschedule,
                                          shifted: bool, fill: str, prefill: bool) -> None:
    key = jax.random.key(1)
    prompt = 2
    tokens, fixed = prompt_state(jnp.array([[3, 4], [5, 6]]), schedule.length, MASK)
    result = generate_cached(model, key, schedule, SCHEDULE, STEP, tokens=tokens, fixed=fixed,
                             shifted=shifted, fill=fill, cache_dtype=jnp.float32,
                             prefill=prefill, return_trajectory=True)
    prefix = prompt if prefill else 0
    expected = _window_reference(model, key, schedule, tokens, fixed, shifted, fill, prefix)
    np.testing.assert_array_equal(np.array(result.tokens), expected)
    assert not np.any(np.array(result.tokens) == MASK)
    np.testing.assert_array_equal(np.array(result.tokens)[:, :2], [[3, 4], [5, 6]])
    settled = [max(schedule.partition(t).settled, int(shifted), prefix)
               for t in range(schedule.num_steps)]
    assert result.cache_calls == len(set(settled) - {0, prefix}) + int(prefix > 0)
    windows = [(s, schedule.partition(t).worthless_start) for t, s in enumerate(settled)]
    changing = [np.any(schedule.tau[t, s:w] != schedule.tau[t + 1, s:w])
                for t, (s, w) in enumerate(windows)]
    assert result.nfe == sum(changing)
    if not (shifted or prefill):  # ALIGNED: every transition changes a level in its window
        assert result.nfe == schedule.num_steps
    assert result.seconds > 0
    trajectory = np.array(result.trajectory)
    assert trajectory.shape == (schedule.num_steps + 1, 2, schedule.length)
    np.testing.assert_array_equal(trajectory[0], np.array(tokens))
    np.testing.assert_array_equal(trajectory[-1], np.array(result.tokens))


@pytest.mark.parametrize("schedule,shifted,fill", [
    (hs.block(8, 2, 2), True, "causal"),
    (hs.slide(8, 3, 3), True, "causal"),
    (hs.block(8, 2, 2), False, "block"),
])
@pytest.mark.parametrize("use_cache", [True, False])
def test_score_model_cached_equals_uncached_reference(score_model: DiT, schedule: hs.Hyperschedule,
                                                      shifted: bool, fill: str,
                                                      use_cache: bool) -> None:
    """γ-hybrid score models, SHIFTED included: each window cell's score is about the position
    it predicts (seed 000 Fig. 5b), with and without the KV cache."""
    key = jax.random.key(6)
    tokens, fixed = prompt_state(jnp.array([[3, 4], [5, 6]]), schedule.length, MASK)
    result = generate_cached(score_model, key, schedule, SCHEDULE, SCORE_STEP, tokens=tokens,
                             fixed=fixed, shifted=shifted, fill=fill, use_cache=use_cache,
                             cache_dtype=jnp.float32)
    expected = _window_reference(score_model, key, schedule, tokens, fixed, shifted, fill,
                                 prefix=2, step=SCORE_STEP_JIT)  # the prompt is prefilled
    np.testing.assert_array_equal(np.array(result.tokens), expected)
    assert not np.any(expected == MASK)


def test_prefill_on_a_window_boundary_changes_nothing_but_the_calls(model: DiT) -> None:
    """A prompt of whole blocks: one prefill call replaces the appends and window calls inside
    the prompt, and the tokens are those of the step-by-step driver."""
    schedule = hs.block(8, 2, 2)
    key = jax.random.key(4)
    tokens, fixed = prompt_state(jnp.array([[3, 4, 7, 1], [5, 6, 2, 2]]), 8, MASK)
    runs = [generate_cached(model, key, schedule, SCHEDULE, STEP, tokens=tokens, fixed=fixed,
                            cache_dtype=jnp.float32, prefill=prefill) for prefill in (False, True)]
    np.testing.assert_array_equal(np.array(runs[0].tokens), np.array(runs[1].tokens))
    assert (runs[0].nfe, runs[1].nfe) == (8, 4)  # the 4 steps of the two prompt blocks are skipped
    assert (runs[0].cache_calls, runs[1].cache_calls) == (3, 2)


def test_library_uncached_path_matches_cache(model: DiT) -> None:
    schedule = hs.block(8, 2, 2)
    key = jax.random.key(1)
    tokens, fixed = prompt_state(jnp.array([[3, 4], [5, 6]]), 8, MASK)
    cached = generate_cached(model, key, schedule, SCHEDULE, STEP, tokens=tokens, fixed=fixed,
                             cache_dtype=jnp.float32)
    uncached = generate_cached(model, key, schedule, SCHEDULE, STEP, tokens=tokens, fixed=fixed,
                               use_cache=False)
    np.testing.assert_array_equal(np.array(cached.tokens), np.array(uncached.tokens))
    assert uncached.cache_calls == 0 and uncached.nfe == cached.nfe


def test_quench_shifted_is_greedy_autoregression(model: DiT) -> None:
    length = 7
    tokens, fixed = prompt_state(jnp.array([[2], [9]]), length, MASK)
    result = generate_cached(model, jax.random.key(3), hs.quench(length), SCHEDULE, STEP,
                             tokens=tokens, fixed=fixed, shifted=True, cache_dtype=jnp.float32)
    x = np.array(tokens)
    for i in range(1, length):  # position i from the repeated token at i - 1, prefix causal
        seq = np.concatenate([x[:, :i], x[:, i - 1:i + 1]], axis=1)
        positions = np.array(list(range(i)) + [i - 1, i])
        q, k = np.meshgrid(np.arange(i + 2), np.arange(i + 2), indexing="ij")
        mask = np.where(q < i, (k <= q), True)
        sigma = np.zeros(seq.shape)
        sigma[:, -1] = np.array(SCHEDULE.sigma_bar(1.0))
        out = _forward(model, seq, positions, sigma, mask)
        x[:, i] = np.argmax(out[:, i], axis=-1)
    np.testing.assert_array_equal(np.array(result.tokens), x)
    assert result.nfe == length - 1  # step 0 would only touch the fixed position 0
    assert result.cache_calls == length - 1


def test_flat_generate_matches_loop_and_keeps_fixed(model: DiT) -> None:
    schedule = hs.flat(8, 4)
    key = jax.random.key(5)
    tokens = jnp.full((2, 8), MASK).at[:, 0].set(jnp.array([1, 2])).at[:, 5].set(7)
    fixed = jnp.zeros((2, 8), bool).at[:, 0].set(True).at[:, 5].set(True)
    result = generate(model, key, schedule, SCHEDULE, STEP, tokens=tokens, fixed=fixed,
                      return_trajectory=True)
    x = np.array(tokens)
    fixed_np = np.array(fixed)
    states = [x]
    for t in range(schedule.num_steps):
        now_levels = np.where(fixed_np, 0, schedule.tau[t])
        next_levels = np.where(fixed_np, 0, schedule.tau[t + 1])
        now, nxt = _noise(now_levels, 4), _noise(next_levels, 4)
        out = _forward(model, x, np.arange(8), np.array(now.sigma_bar), np.ones((8, 8), bool))
        x = np.array(STEP_JIT(jax.random.fold_in(key, t), jnp.asarray(x), out, now, nxt))
        states.append(x)
    np.testing.assert_array_equal(np.array(result.tokens), x)
    np.testing.assert_array_equal(np.array(result.trajectory), np.stack(states))
    assert result.nfe == 4
    assert np.all(np.array(result.tokens)[:, [0, 5]] == [[1, 7], [2, 7]])
    assert not np.any(np.array(result.tokens) == MASK)


@pytest.mark.parametrize("network", ["model", "score_model"])
def test_flat_shifted_generation_moves_each_output_one_position_right(
        network: str, request: pytest.FixtureRequest) -> None:
    """SHIFTED flat generation: cell p reads position p and predicts p + 1 (the last cell's
    output is discarded; position 0 is a fixed BOS); a score network is told the state of p + 1."""
    dit = request.getfixturevalue(network)
    step, step_jit = (SCORE_STEP, SCORE_STEP_JIT) if network == "score_model" else (STEP, STEP_JIT)
    schedule = hs.flat(7, 3)
    key = jax.random.key(8)
    tokens, fixed = prompt_state(jnp.array([[2], [9]]), 7, MASK)
    result = generate(dit, key, schedule, SCHEDULE, step, tokens=tokens, fixed=fixed, shifted=True)
    x = np.array(tokens)
    for t in range(schedule.num_steps):
        now_levels = np.where(np.array(fixed), 0, schedule.tau[t])
        next_levels = np.where(np.array(fixed), 0, schedule.tau[t + 1])
        now, nxt = _noise(now_levels, 3), _noise(next_levels, 3)
        sigma = np.array(now.sigma_bar)
        ahead = [1, 2, 3, 4, 5, 6, 6]  # cell p predicts p + 1; the last cell's output is unused
        score = (x[:, ahead], sigma[:, ahead]) if network == "score_model" else (None, None)
        cells = _forward(dit, x, np.arange(7), sigma, np.ones((7, 7), bool), *score)
        out = np.concatenate([np.zeros_like(cells[:, :1]), cells[:, :-1]], axis=1)
        x_next = np.array(step_jit(jax.random.fold_in(key, t), jnp.asarray(x), jnp.asarray(out),
                                   now, nxt))
        x = np.where(np.array(fixed), x, x_next)
    np.testing.assert_array_equal(np.array(result.tokens), x)
    assert result.nfe == 3 and not np.any(x == MASK) and np.all(x[:, 0] == [2, 9])
    if network == "model":  # the shift matters (the untrained score model's draws are
        aligned = generate(dit, key, schedule, SCHEDULE, step, tokens=tokens, fixed=fixed)
        assert np.any(np.array(aligned.tokens) != x)  # dominated by the noise term here)
    with pytest.raises(ValueError, match="shifted=True needs position 0 fixed"):
        generate(dit, key, schedule, SCHEDULE, step, batch_size=2, shifted=True)


@pytest.mark.parametrize("shifted", [False, True])
def test_time_independent_network_is_called_only_after_a_change(timeless_model: DiT,
                                                                 shifted: bool) -> None:
    """MDLM's cached sampler: with more steps than tokens most transitions change nothing, and
    a network that reads no noise level is called again only once the state has changed; the
    tokens are those of calling it at every step."""
    schedule = hs.flat(6, 24)
    key = jax.random.key(9)
    tokens, fixed = prompt_state(jnp.array([[1], [4], [7]]), 6, MASK)
    runs = [generate(timeless_model, key, schedule, SCHEDULE, STEP, tokens=tokens, fixed=fixed,
                     shifted=shifted, reuse_predictions=reuse, return_trajectory=True)
            for reuse in (True, False)]
    np.testing.assert_array_equal(np.array(runs[0].trajectory), np.array(runs[1].trajectory))
    states = np.array(runs[0].trajectory)  # [T + 1, B, d]
    changed = np.any(states[1:-1] != states[:-2], axis=(1, 2))  # after transitions 0..T-2
    assert runs[0].nfe == 1 + changed.sum()
    assert runs[1].nfe == 24 and runs[0].nfe < 24
    assert not np.any(states[-1] == MASK)


@pytest.mark.parametrize("predictor, reference", [("analytic", analytic_step),
                                                   ("euler", euler_step)])
def test_score_predictors_match_a_loop_over_the_steps(model: DiT, predictor: str,
                                                      reference) -> None:
    """The DiT's log-probabilities stand in for log scores: the driver must call the predictor
    on sigma_bar exactly as a loop over the flat schedule does."""
    process = GammaHybrid(N, 0.3)
    step = ScoreReverse(process, predictor=predictor)
    schedule = hs.flat(6, 3)
    key = jax.random.key(7)
    result = generate(model, key, schedule, SCHEDULE, step, batch_size=2)
    x = np.full((2, 6), MASK)
    for t in range(schedule.num_steps):
        now, nxt = _noise(schedule.tau[t], 3), _noise(schedule.tau[t + 1], 3)
        now_b = jax.tree.map(lambda a: jnp.broadcast_to(a, x.shape), now)
        nxt_b = jax.tree.map(lambda a: jnp.broadcast_to(a, x.shape), nxt)
        out = _forward(model, x, np.arange(6), np.array(now_b.sigma_bar), np.ones((6, 6), bool))
        x = np.array(reference(jax.random.fold_in(key, t), jnp.asarray(x), jnp.asarray(out),
                               now_b.sigma_bar, nxt_b.sigma_bar, process))
    np.testing.assert_array_equal(np.array(result.tokens), x)
    assert not np.any(x == MASK) and result.nfe == 3
    with pytest.raises(ValueError, match="predictor must be one of .* got predictor='leap'"):
        ScoreReverse(process, predictor="leap")


def test_unmasking_strategy_plugs_in(model: DiT) -> None:
    step = UnmaskReverse(UnmaskingConfig(strategy="top_prob"))
    schedule = hs.flat(6, 3)
    result = generate(model, jax.random.key(2), schedule, SCHEDULE, step, batch_size=3)
    assert result.tokens.shape == (3, 6) and not np.any(np.array(result.tokens) == MASK)
    assert result.nfe == 3


def test_random_strategy_at_rate_one_reveals_one_token_per_step_as_first_hitting(model: DiT) -> None:
    """Block ω = 4 with 4 levels (ρ = 1): MDLM expects exactly one reveal per step, so the random
    strategy is BD3-LM's first-hitting sampler (one uniformly chosen masked token per step)."""
    schedule = hs.block(8, 4, 4)
    step = UnmaskReverse(UnmaskingConfig(strategy="random"))
    result = generate(model, jax.random.key(4), schedule, SCHEDULE, step, batch_size=3,
                      return_trajectory=True)
    unmasked = (np.array(result.trajectory) != MASK).sum(-1)  # [T + 1, B]
    assert schedule.num_steps == 8
    np.testing.assert_array_equal(np.diff(unmasked, axis=0), np.ones((8, 3), int))


class BiasedEOS(nnx.Module):
    """A DiT whose predictions are EOS exactly from position ``after`` on (never before)."""

    def __init__(self, dit: DiT, eos_id: int, after: int):
        self.dit = dit
        self.config = dit.config
        self.eos_id = eos_id
        self.after = after

    def forward_cached(self, tokens, positions, sigma_bar, cache, window_mask=None,
                       update_cache=False):
        out, cache = self.dit.forward_cached(tokens, positions, sigma_bar, cache, window_mask,
                                             update_cache)
        late = jnp.broadcast_to(positions, tokens.shape) >= self.after  # [B, W]
        bias = jnp.where(late, 1e4, -1e4)[..., None] * jax.nn.one_hot(self.eos_id, N)
        return jax.nn.log_softmax(out + bias, axis=-1), cache


def test_arbitrary_length_stops_at_eos(model: DiT) -> None:
    training_length, eos, after = 8, 10, 17
    prompt = jnp.array([[1, 2, 3], [4, 5, 6]])
    result = generate_blocks(BiasedEOS(model, eos, after), jax.random.key(4), block_width=4,
                             max_length=40, schedule=SCHEDULE, step=MDLMReverse(), prompt=prompt,
                             eos_id=eos)
    tokens = np.array(result.tokens)
    assert tokens.shape == (2, 40)
    np.testing.assert_array_equal(np.array(result.lengths), [after + 1] * 2)
    assert after + 1 > training_length
    assert np.all(tokens[:, after:] == eos) and not np.any(tokens[:, :after] == eos)
    np.testing.assert_array_equal(tokens[:, :3], np.array(prompt))
    blocks = (after - 3) // 4 + 1  # the block holding position `after` is the last one run
    assert int(result.nfe) == 4 * blocks and int(result.cache_calls) == blocks + 1


def test_arbitrary_length_entropy_stop_and_max_length(model: DiT) -> None:
    sharp = BiasedEOS(model, 0, 0)  # always EOS-sure: entropy ~ 0 after the first block
    stopped = generate_blocks(sharp, jax.random.key(6), block_width=3, max_length=20,
                              schedule=SCHEDULE, step=MDLMReverse(), batch_size=2,
                              entropy_threshold=0.5, steps_per_block=2)
    np.testing.assert_array_equal(np.array(stopped.lengths), [3, 3])
    assert int(stopped.nfe) == 2
    free = generate_blocks(model, jax.random.key(6), block_width=3, max_length=20,
                           schedule=SCHEDULE, step=MDLMReverse(), batch_size=2, steps_per_block=2)
    np.testing.assert_array_equal(np.array(free.lengths), [20, 20])
    assert int(free.nfe) == 2 * 7 and not np.any(np.array(free.tokens) == MASK)


def test_errors(model: DiT) -> None:
    tokens = jnp.full((1, 6), MASK)
    with pytest.raises(ValueError, match="shifted=True needs position 0 fixed"):
        generate_cached(model, jax.random.key(0), hs.quench(6), SCHEDULE, STEP, tokens=tokens,
                        shifted=True)
    with pytest.raises(ValueError, match="fill must be 'causal' or 'block', got fill='x'"):
        generate_cached(model, jax.random.key(0), hs.quench(6), SCHEDULE, STEP, tokens=tokens,
                        fill="x")
    with pytest.raises(ValueError, match=r"tokens must be an integer array \[batch, 5\]"):
        generate(model, jax.random.key(0), hs.flat(5, 2), SCHEDULE, STEP, tokens=tokens)
    with pytest.raises(ValueError, match="fixed must have shape"):
        generate(model, jax.random.key(0), hs.flat(6, 2), SCHEDULE, STEP, tokens=tokens,
                 fixed=jnp.zeros((1, 5), bool))
    with pytest.raises(ValueError, match="batch_size must be a positive integer.*batch_size=0"):
        generate(model, jax.random.key(0), hs.flat(6, 2), SCHEDULE, STEP, batch_size=0)
    with pytest.raises(ValueError, match="model must be an nnx.Module"):
        generate(object(), jax.random.key(0), hs.flat(6, 2), SCHEDULE, STEP, batch_size=1)
    with pytest.raises(ValueError, match=r"prefix must be an integer in \[0, 6\], got prefix=7"):
        window_plan(hs.quench(6), False, 7)
    with pytest.raises(ValueError, match="prompt length 7 exceeds length=6"):
        prompt_state(jnp.zeros((1, 7), jnp.int32), 6, MASK)
    with pytest.raises(ValueError, match="max_length must exceed the prompt length 3"):
        generate_blocks(model, jax.random.key(0), block_width=2, max_length=3, schedule=SCHEDULE,
                        step=STEP, prompt=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="eos_id must be an ordinary token.*eos_id=11"):
        generate_blocks(model, jax.random.key(0), block_width=2, max_length=8, schedule=SCHEDULE,
                        step=STEP, batch_size=1, eos_id=N)
    with pytest.raises(ValueError, match="block_width must be a positive integer"):
        generate_blocks(model, jax.random.key(0), block_width=0, max_length=8, schedule=SCHEDULE,
                        step=STEP, batch_size=1)


@pytest.mark.parametrize("prompt, pattern", [
    (jnp.zeros((1, 3), jnp.float32),
     r"prompt must be an integer array \[batch, P\], got float32 \(1, 3\)"),
    (jnp.zeros(3, jnp.int32), r"prompt must be an integer array \[batch, P\], got int32 \(3,\)"),
], ids=["float", "1d"])
def test_prompt_drivers_reject_bad_prompts(model: DiT, prompt: jax.Array, pattern: str) -> None:
    """``prompt_state`` and ``generate_blocks`` refuse a prompt that is not ``int [batch, P]``."""
    with pytest.raises(ValueError, match=pattern):
        prompt_state(prompt, 6, MASK)
    with pytest.raises(ValueError, match=pattern):
        generate_blocks(model, jax.random.key(0), block_width=2, max_length=8, schedule=SCHEDULE,
                        step=STEP, prompt=prompt)


@pytest.fixture(scope="module")
def block_run() -> drive.RestoredRun:
    """An untrained BD3-LM run (``configs/demo_block.py`` shrunk to a 1-layer DiT on 32 bytes)."""
    configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
    config = config_lib.load_config_file(configs / "demo_block.py")
    config.model.update(num_layers=1, d_model=32, num_heads=2)
    config.data.seq_len = 32
    config.hyperschedule.update(width=8, num_levels=8)
    tokenizer = ByteTokenizer()
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    setup = core.build(config, mesh, vocab_size=tokenizer.vocab_size)
    with activate(mesh, setup.rules):
        params = nnx.state(DiT(setup.model_config, rngs=nnx.Rngs(0)), nnx.Param)
    return drive.RestoredRun(workdir=pathlib.Path("untrained"), config=config, setup=setup,
                             params=params, tokenizer=tokenizer, step=0, ema=False)


@pytest.mark.parametrize("call, pattern", [
    (lambda run: drive.inference_hyperschedule(run.setup, 0),
     r"num_levels must be a positive integer, got num_levels=0"),
    (lambda run: drive.inference_hyperschedule(run.setup, 2.5),
     r"num_levels must be a positive integer, got num_levels=2\.5"),
    (lambda run: drive.inference_hyperschedule(run.setup, True),
     r"num_levels must be a positive integer, got num_levels=True"),
    (lambda run: drive.sample(run, STEP, jax.random.key(0), num_samples=1, max_length=40,
                              infill={20: [1, 2]}),
     r"max_length generation takes a prompt only, got infill=\{20: \[1, 2\]\}"),
    (lambda run: drive.sample(run, STEP, jax.random.key(0), num_samples=1, max_length=40,
                              return_trajectory=True),
     r"max_length generation takes a prompt only, got infill=\{\} and return_trajectory=True"),
], ids=["zero-levels", "float-levels", "bool-levels", "max-length-infill",
        "max-length-trajectory"])
def test_drive_rejects_bad_arguments(block_run: drive.RestoredRun, call, pattern: str) -> None:
    """``inference_hyperschedule`` and ``sample`` refuse bad levels / max_length combinations."""
    with pytest.raises(ValueError, match=pattern):
        call(block_run)
