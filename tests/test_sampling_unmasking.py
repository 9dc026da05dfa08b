"""Unmasking strategies of seed 002: which positions each strategy reveals, on hand-built
probability arrays (the exact-sampling check of the IID strategy is in test_sampling_steps.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_posterior as tp
from hybriddiff.sampling import (
    CategoricalConfig,
    UnmaskingConfig,
    pc_log_scores,
    plan_from_schedule,
    prediction_entropy,
    select_entropy_bounded,
    select_factor,
    select_threshold,
    select_top_k,
    semi_ar_candidates,
    top_two_margin,
    unmask_step,
)

N = tp.NUM_TOKENS
MASK = N


def _log(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32) + 1e-30)


def test_plan_from_schedule_counts_and_forced():
    x = jnp.array([[MASK, MASK, MASK, 2, MASK]], jnp.int32)
    alpha_now = jnp.array([[0.0, 0.0, 0.0, 0.0, 0.5]])
    alpha_next = jnp.array([[0.5, 0.5, 0.0, 0.5, 1.0]])
    plan = plan_from_schedule(x, alpha_now, alpha_next, MASK)
    np.testing.assert_array_equal(np.asarray(plan.candidates), [[1, 1, 0, 0, 1]])
    np.testing.assert_array_equal(np.asarray(plan.forced), [[0, 0, 0, 0, 1]])
    assert int(plan.num_unmask[0]) == 2  # round(0.5 + 0.5 + 1) = 2
    # A forced position is revealed first, whatever the strategy ranks higher.
    rows = jnp.full((512, 5), MASK, jnp.int32)
    forced = jnp.zeros((512, 5), bool).at[:, 3].set(True)
    out = np.asarray(unmask_step(jax.random.key(4), rows, jnp.zeros((512, 5, N)), 1, forced=forced))
    np.testing.assert_array_equal(out != MASK, np.asarray(forced))


def test_top_probability_margin_and_low_confidence_choices():
    probs = np.array(
        [
            [0.50, 0.45, 0.05, 0.00],  # top 0.50, margin 0.05
            [0.40, 0.20, 0.20, 0.20],  # top 0.40, margin 0.20
            [0.97, 0.01, 0.01, 0.01],  # not masked
            [0.30, 0.30, 0.20, 0.20],  # top 0.30, margin 0.00
        ]
    )[None]
    x = jnp.array([[MASK, MASK, 1, MASK]], jnp.int32)
    greedy = CategoricalConfig(top_k=1)
    step = unmask_step
    key = jax.random.key(0)
    for strategy, want in (("top_prob", [1, 0, 0, 0]), ("margin", [0, 1, 0, 0])):
        out = step(key, x, _log(probs), 1, config=UnmaskingConfig(strategy), sampling=greedy)
        np.testing.assert_array_equal(np.asarray(out) != np.asarray(x), [want])
        np.testing.assert_array_equal(np.asarray(out)[0, np.array(want) == 1], 0)  # argmax
    np.testing.assert_allclose(
        np.asarray(top_two_margin(_log(probs)))[0], [0.05, 0.2, 0.96, 0], atol=1e-6
    )
    # Low-confidence remasking ranks by the probability of the *drawn* token: position 0
    # ([0.9, 0.1]) beats position 1 ([0.6, 0.4]) exactly when it draws token 0.
    rows = jnp.broadcast_to(_log([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0]]), (4000, 2, N))
    masks = jnp.full((4000, 2), MASK, jnp.int32)
    out = step(key, masks, rows, 1, config=UnmaskingConfig("low_confidence"))
    first = np.asarray(out)[:, 0] != MASK
    np.testing.assert_array_equal(first, np.asarray(out)[:, 0] == 0)
    assert abs(first.mean() - 0.9) < 5 * math.sqrt(0.09 / 4000)


def test_pc_sampler_scores_and_choices():
    probs = np.array([[0.95, 0.05, 0, 0], [0.1, 0.6, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1]])[None]
    prior = np.log(np.array([0.9, 0.001, 0.05, 0.049]))
    tokens = jnp.array([[0, 1, 2]])
    got = np.asarray(pc_log_scores(_log(probs), tokens, 0.5, 1.5, jnp.asarray(prior)))
    conf = np.minimum(-np.array([0.95, 0.6, 0.7]) * prior[[0, 1, 2]], 1.5)
    np.testing.assert_allclose(got[0], np.log(conf) - 0.5 * np.arange(3), rtol=1e-5)
    x = jnp.full((1, 3), MASK, jnp.int32)
    greedy = CategoricalConfig(top_k=1)
    step = unmask_step
    key = jax.random.key(0)

    def chosen(config, log_prior):
        out = step(key, x, _log(probs), 1, config=config, sampling=greedy,
                   token_log_prior=log_prior)
        return np.flatnonzero(np.asarray(out)[0] != MASK).tolist()

    assert chosen(UnmaskingConfig("top_prob"), None) == [0]  # frequent token wins on confidence
    assert chosen(UnmaskingConfig("pc"), jnp.asarray(prior)) == [1]  # rare token wins with prior
    assert chosen(UnmaskingConfig("pc", position_decay=5.0), jnp.asarray(prior)) == [0]  # AR-like
    assert chosen(UnmaskingConfig("pc", confidence_clip=0.1), jnp.asarray(prior)) == [0]  # ties


def test_adaptive_selections():
    candidates = jnp.array([[True, True, True, True, False]])
    confidence = jnp.array([[0.95, 0.5, 0.91, 0.3, 0.99]])
    pick = lambda mask: np.flatnonzero(np.asarray(mask)[0]).tolist()  # noqa: E731
    assert pick(select_threshold(confidence, candidates, 0.9)) == [0, 2]
    assert pick(select_threshold(confidence, candidates, 0.96)) == [0]  # at least one
    forced = jnp.array([[False, False, False, True, False]])
    assert pick(select_threshold(confidence, candidates, 0.9, forced)) == [0, 2, 3]
    assert pick(select_threshold(confidence, candidates, 0.9, cap=jnp.array(1))) == [0]
    sorted_conf = jnp.array([[0.8, 0.99, 0.5, 0.9, 0.2]])
    all_five = jnp.ones((1, 5), bool)
    # n = 1..4: (n+1)(1 - c_(n)) = 0.02, 0.3, 0.8, 2.5, ...
    assert pick(select_factor(sorted_conf, all_five, 1.0)) == [0, 1, 3]
    assert pick(select_factor(sorted_conf, all_five, 0.5)) == [1, 3]
    assert pick(select_factor(sorted_conf, all_five, 0.01)) == [1]
    entropy = jnp.array([[0.1, 0.5, 0.05, 1.0, 0.3]])
    # increasing: 0.05, 0.1, 0.3, 0.5, 1.0; sums before each: 0, 0.05, 0.15, 0.45, 0.95
    assert pick(select_entropy_bounded(entropy, all_five, 0.2)) == [0, 2, 4]
    assert pick(select_entropy_bounded(entropy, all_five, 0.0)) == [2]
    assert pick(select_entropy_bounded(entropy, all_five, 10.0)) == [0, 1, 2, 3, 4]
    assert pick(select_top_k(entropy, candidates, jnp.array(2))) == [1, 3]
    assert pick(select_top_k(entropy, candidates, jnp.array(0), forced)) == [3]


def test_unmask_step_adaptive_strategies_and_entropy():
    probs = np.array(
        [[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25], [0.92, 0.08, 0, 0], [0.6, 0.4, 0, 0]]
    )[None]
    entropy = -np.sum(np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-300)), 0), -1)
    np.testing.assert_allclose(np.asarray(prediction_entropy(_log(probs))), entropy, rtol=1e-5)
    x = jnp.full((1, 4), MASK, jnp.int32)
    step = unmask_step
    key = jax.random.key(1)

    def revealed(config, cap=None):
        out = step(key, x, _log(probs), cap, config=config, sampling=CategoricalConfig(top_k=1))
        return np.flatnonzero(np.asarray(out)[0] != MASK).tolist()

    assert revealed(UnmaskingConfig("threshold", threshold=0.9)) == [0, 2]
    assert revealed(UnmaskingConfig("threshold", threshold=0.9), cap=1) == [0]
    assert revealed(UnmaskingConfig("factor", factor=1.0)) == [0, 2]  # 0.06, 0.24, 1.6
    assert revealed(UnmaskingConfig("entropy", entropy_bound=float(entropy[0, 0]) + 1e-3)) == [0, 2]
    assert revealed(UnmaskingConfig("entropy", entropy_bound=0.0)) == [0]


def test_semi_autoregressive_blocks_restrict_candidates():
    candidates = jnp.array([[False, True, True, False, True, True], [False] * 4 + [True] * 2])
    got = np.asarray(semi_ar_candidates(candidates, 3))
    np.testing.assert_array_equal(got, [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
    x = jnp.array([[0, MASK, MASK, 1, MASK, MASK]], jnp.int32)
    probs = _log(np.tile([0.1, 0.2, 0.3, 0.4], (1, 6, 1)))
    config = UnmaskingConfig("top_prob", block_width=3)
    out = unmask_step(jax.random.key(0), x, probs, 5, config=config)
    np.testing.assert_array_equal(np.asarray(out)[0, 4:], MASK)  # later block untouched
    assert np.all(np.asarray(out)[0, 1:3] < N)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "greedy"}, "strategy"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"factor": 0.0}, "factor"),
        ({"entropy_bound": -0.1}, "entropy_bound"),
        ({"position_decay": -1.0}, "position_decay"),
        ({"confidence_clip": 0.0}, "confidence_clip"),
        ({"block_width": 0}, "block_width"),
        ({"block_width": 2.0}, "block_width"),
    ],
)
def test_unmasking_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnmaskingConfig(**kwargs)


_X = jnp.full((2, 3), MASK, jnp.int32)
_LOG_PROBS = jnp.zeros((2, 3, N))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"num_unmask": True}, r"num_unmask must be an integer count >= 0, got True"),
        ({"num_unmask": jnp.ones(3, jnp.int32)},
         r"num_unmask must be a scalar or have shape \(2,\), got \(3,\)"),
        ({"num_unmask": 1, "sampling": "float64"},
         r"sampling must be a CategoricalConfig, got str"),
        ({"num_unmask": 1, "log_probs": jnp.zeros((2, 4, N))},
         r"log_probs must have shape x\.shape \+ \(N,\) = \(2, 3\) \+ \(N,\), got \(2, 4, 4\)"),
    ],
    ids=["bool-count", "count-shape", "sampling-type", "log-probs-shape"],
)
def test_unmask_step_rejects_bad_arguments(kwargs: dict, pattern: str) -> None:
    """``unmask_step`` refuses a bad count, sampling config or ``log_probs``, naming the value."""
    kwargs = {"log_probs": _LOG_PROBS, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        unmask_step(jax.random.key(0), _X, **kwargs)
