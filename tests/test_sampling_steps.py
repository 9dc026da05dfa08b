"""Reverse steps against exact toy posteriors, dense Markov-chain references and hand-built cases.

The toy data distribution ``p`` lives on the 64 sequences of length 3 over N = 4 tokens
(``tests/toy_posterior.py``); its exact denoisers play the network: evaluated by enumeration in
float64 on all 125 states for every step's noise, then looked up by the sampler's current state.
Each sampler runs in a jitted ``lax.scan`` over a hyperschedule on ``NUM_SAMPLES`` sequences.
Two kinds of reference:

* ``p`` itself, where the step is exact: at most one position moves per step (block ω = 1), or
  the data factorises over positions (then every per-position step is exact for any step count);
* the exact law of the sampler's own Markov chain, computed densely over all 125 states with
  per-position kernels written independently in numpy (``scipy.linalg.expm`` of the rate
  matrices of seed 000 Eq. 1), for flat and block schedules where several positions move at
  once. The samples must match that law within the finite-sample bound, and ``p`` within the
  same bound plus the chain's exact discretisation error ``TV(chain law, p)``.

Finite-sample bounds come from ``toy_posterior.tv_sampling_bound`` (failure probability 1e-6).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy import stats

import toy_posterior as tp
from hybriddiff import hyperschedules, schedules
from hybriddiff.processes import EpsilonHybrid, GammaHybrid
from hybriddiff.sampling import (
    CategoricalConfig,
    NoiseLevels,
    UnmaskingConfig,
    acs_step,
    alpha_of,
    analytic_step,
    analytic_transition,
    clean_log_probs_from_score,
    denoise_step,
    denoise_transition,
    euler_step,
    euler_transition,
    first_hitting_mask_rate,
    first_hitting_step,
    level_noise,
    mdlm_cached_step,
    mdlm_step,
    plan_from_schedule,
    semi_ar_candidates,
    transfer_probability,
    unmask_step,
)

N, L = tp.NUM_TOKENS, tp.LENGTH
MASK = N
P = tp.toy_distribution()
NUM_SAMPLES = 32768
SCHEDULE = schedules.LogLinear(eta=1e-6)  # sigma_bar(1) ≈ 13.8: an all-MASK start is ~exact
STATES = tp.all_sequences(N + 1, L)  # [125, L], every state including MASK
ALL_MASK = np.eye(len(STATES))[-1]  # the all-MASK state has the last code
CODE_WEIGHTS = (N + 1) ** np.arange(L - 1, -1, -1)  # code of a state, as in tp.codes


def _product_of_marginals(p: np.ndarray) -> np.ndarray:
    cube = p.reshape(N, N, N)
    marginals = [cube.sum(axis=(1, 2)), cube.sum(axis=(0, 2)), cube.sum(axis=(0, 1))]
    return np.einsum("a,b,c->abc", *marginals).reshape(-1)


def _levels(hyper, dtype=jnp.float32, num_steps=None) -> NoiseLevels:
    """Noise of every hyperschedule row, ``[T+1, L]`` each; padded with repeats of the clean
    last row (no-op steps) to ``num_steps`` so that one compiled sampler serves several
    schedules."""
    tau = np.asarray(hyper.tau)
    if num_steps is not None:
        tau = np.concatenate([tau, np.repeat(tau[-1:], num_steps + 1 - len(tau), axis=0)])
    return level_noise(SCHEDULE, jnp.asarray(tau), hyper.num_levels, dtype)


def _broadcast(level_row, x):
    return jnp.broadcast_to(level_row, x.shape)


def _all_mask(n=NUM_SAMPLES):
    return jnp.full((n, L), MASK, jnp.int32)


def _uniform_prior(n=NUM_SAMPLES, seed=123):
    return jax.random.randint(jax.random.key(seed), (n, L), 0, N, jnp.int32)


# ---------------------------------------------------------------------------------------------
# Exact models. The toy oracles are evaluated once per step in float64 on all 125 states; the
# sampler looks its "network output" up by the code of the current state. The same arrays feed
# the dense chain references.


@functools.partial(jax.jit, static_argnums=0)
def _oracle_log_ratios(process, p, x, sigma):
    return tp.log_score_ratios(p, process.marginal, x, sigma)


@functools.partial(jax.jit, static_argnums=0)
def _oracle_posterior(process, p, x, sigma):
    return tp.clean_posterior(p, process.marginal, x, sigma)


def _exact_oracles(process, p, sigma_row):
    """Exact scores and clean posteriors at every state in float64, ``[125, L, N]`` each
    (NaN at states the forward process cannot reach)."""
    with jax.enable_x64(True):
        sigma = jnp.broadcast_to(jnp.asarray(sigma_row, jnp.float64), STATES.shape)
        p = jnp.asarray(p, jnp.float64)
        ratios = np.exp(np.asarray(_oracle_log_ratios(process, p, STATES, sigma)))
        posterior = np.asarray(_oracle_posterior(process, p, STATES, sigma))
    return ratios, posterior


def _model_tables(process, p, levels, output) -> np.ndarray:
    """Per step, the exact model output at every state, ``[T, 125, L, N]`` float64:
    ``"log_score"`` (score models) or ``"log_probs"`` (clean posterior)."""
    sigma = np.asarray(levels.sigma_bar, np.float64)
    tables = []
    for t in range(sigma.shape[0] - 1):
        ratios, posterior = _exact_oracles(process, p, sigma[t])
        with np.errstate(divide="ignore"):
            tables.append(np.log(ratios if output == "log_score" else posterior))
    tables = np.stack(tables)
    return np.where(np.isnan(tables), 0.0, tables)  # unreachable states: never visited


def _lookup(table, x):
    """The model output for each row of ``x [n, L]``: ``table[code(x)]``, ``[n, L, N]``."""
    return table[x @ jnp.asarray(CODE_WEIGHTS, x.dtype)]


def _convex_mix_step(key, x, log_score, sigma_now, sigma_next, process, sampling):
    """The published approximation: the reverse transition of Q_γ replaced by the convex mix
    (1-γ)·(absorb analytic transition) + γ·(uniform analytic transition); final step exact."""
    gamma = process.gamma
    mixed = (1.0 - gamma) * analytic_transition(
        GammaHybrid.absorb(N), log_score, x, sigma_now, sigma_next
    ) + gamma * analytic_transition(GammaHybrid.uniform(N), log_score, x, sigma_now, sigma_next)
    final = denoise_transition(process, log_score, x, sigma_now)
    final = jnp.concatenate([final, jnp.zeros_like(final[..., :1])], axis=-1)
    weights = jnp.where(((sigma_next == 0) & (sigma_now > 0))[..., None], final, mixed)
    drawn = jax.random.categorical(key, jnp.log(jnp.maximum(weights, 0.0))).astype(x.dtype)
    return jnp.where(sigma_now != sigma_next, drawn, x)


def _score_model(step):
    def fn(key, x, now, nxt, output, process, sampling):
        sigma_now, sigma_next = _broadcast(now.sigma_bar, x), _broadcast(nxt.sigma_bar, x)
        return step(key, x, output, sigma_now, sigma_next, process, sampling)

    return fn


def _masked_model(step, **kwargs):
    """A masked-family step; a γ-hybrid score model goes through its Tweedie clean-token
    prediction with ``alpha = e^{-(1-γ) sigma_bar}``."""

    def fn(key, x, now, nxt, output, process, sampling):
        if isinstance(process, GammaHybrid) and process.gamma > 0.0:
            sigma_now, sigma_next = _broadcast(now.sigma_bar, x), _broadcast(nxt.sigma_bar, x)
            log_probs = clean_log_probs_from_score(process, output, x, sigma_now)
            alpha_now, alpha_next = alpha_of(process, sigma_now), alpha_of(process, sigma_next)
        else:
            log_probs = output
            alpha_now, alpha_next = _broadcast(now.alpha, x), _broadcast(nxt.alpha, x)
        return step(key, x, log_probs, alpha_now, alpha_next, sampling=sampling, **kwargs)

    return fn


def _first_hitting_model(key, x, now, nxt, output, process, sampling):
    """BD3-LM first hitting restricted to the current block of width 2 (noise unused)."""
    candidates = semi_ar_candidates(x == MASK, 2)
    return first_hitting_step(key, x, output, candidates, 2, sampling)


def _random_unmasking_model(key, x, now, nxt, output, process, sampling):
    """IID/MD4 unmasking with counts and candidates from the hyperschedule."""
    plan = plan_from_schedule(x, _broadcast(now.alpha, x), _broadcast(nxt.alpha, x), MASK)
    return unmask_step(
        key, x, output, plan.num_unmask, sampling=sampling, candidates=plan.candidates,
        forced=plan.forced,
    )


_MODELS = {
    "analytic": _score_model(analytic_step),
    "euler": _score_model(euler_step),
    "convex_mix": _score_model(_convex_mix_step),
    "mdlm": _masked_model(mdlm_step),
    "acs": _masked_model(acs_step, eta=0.3),
    "first_hitting": _first_hitting_model,
    "random_unmasking": _random_unmasking_model,
}


@functools.lru_cache(maxsize=None)
def _sampler(kind, process, sampling):
    """One jitted ``lax.scan`` sampler per (step, process, sampling): noise rows and model
    tables are arguments, so schedules of equal (padded) length share the compilation."""
    step_fn = _MODELS[kind]

    def run(x_init, levels, tables, key):
        now = jax.tree.map(lambda a: a[:-1], levels)
        nxt = jax.tree.map(lambda a: a[1:], levels)
        keys = jax.random.split(key, tables.shape[0])

        def body(x, inputs):
            k, a, b, table = inputs
            return step_fn(k, x, a, b, _lookup(table, x), process, sampling), None

        return jax.lax.scan(body, x_init, (keys, now, nxt, tables))[0]

    return jax.jit(run)


def _sample(kind, process, levels, x_init, p=P, sampling=CategoricalConfig(), seed=0):
    """Samples with the exact model of ``p``: scores for the SEDD predictors and γ-hybrid ACS,
    clean posteriors otherwise."""
    scores = kind in ("analytic", "euler", "convex_mix") or (
        isinstance(process, GammaHybrid) and process.gamma > 0.0
    )
    tables = _model_tables(process, p, levels, "log_score" if scores else "log_probs")
    dtype = levels.sigma_bar.dtype
    run = _sampler(kind, process, sampling)
    return np.asarray(run(x_init, levels, jnp.asarray(tables, dtype), jax.random.key(seed)))


def _assert_close_to(samples, target, extra=0.0):
    empirical = tp.empirical_distribution(samples)
    tv = tp.total_variation(empirical, target)
    bound = tp.tv_sampling_bound(target, samples.shape[0]) + extra
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
    return tv


# ---------------------------------------------------------------------------------------------
# Dense references (numpy, float64).


def _chain_law(kernel_fn, levels: NoiseLevels, initial=ALL_MASK) -> np.ndarray:
    """Exact law over the 64 clean sequences of a position-factorised sampler."""
    sigma = np.asarray(levels.sigma_bar, np.float64)
    alpha = np.asarray(levels.alpha, np.float64)
    kernels = []
    for t in range(sigma.shape[0] - 1):
        kernel = kernel_fn(sigma[t], sigma[t + 1], alpha[t], alpha[t + 1])
        unreachable = ~np.all(np.isfinite(kernel), axis=(1, 2))  # states of probability 0
        kernel[unreachable] = np.eye(N + 1)[STATES[unreachable]]
        kernels.append(kernel)
    law = tp.product_chain(initial, kernels)
    assert abs(tp.ordinary_part(law).sum() - 1.0) < 1e-9, "mass left on MASK states"
    return tp.ordinary_part(law)


def _check_against_chain(samples, law):
    """Samples match the chain's law; and ``p`` up to its exact discretisation error."""
    _assert_close_to(samples, law)
    discretisation = tp.total_variation(law, P)
    _assert_close_to(samples, P, extra=discretisation)
    return discretisation


# ---------------------------------------------------------------------------------------------
# Score predictors.


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_analytic_and_euler_transitions_match_dense_matrices(gamma):
    process = GammaHybrid(N, gamma)
    rates = tp.rate_matrix(gamma)
    rng = np.random.default_rng(2)
    x = np.array([[0, 1, 2, 3, MASK], [3, MASK, 2, 0, 1]], np.int32)
    log_score = rng.normal(size=x.shape + (N,)).astype(np.float32)
    now = np.array([[1.5, 0.9, 2.0, 0.4, 1.1], [3.0, 0.2, 1.0, 0.7, 0.05]], np.float32)
    nxt = now * np.array([[0.2, 0.5, 0.9, 0.0, 0.6], [0.1, 0.5, 0.3, 0.9, 0.5]], np.float32)
    transitions = jax.jit(
        lambda *a: (analytic_transition(process, *a), euler_transition(process, *a))
    )
    analytic, euler = map(np.asarray, transitions(log_score, x, now, nxt))
    for b, i in np.ndindex(x.shape):
        delta = float(now[b, i]) - float(nxt[b, i])
        score = np.append(np.exp(log_score[b, i].astype(np.float64)), 0.0)
        score[x[b, i]] = 1.0
        inverse, forward = scipy.linalg.expm(-delta * rates), scipy.linalg.expm(delta * rates)
        np.testing.assert_allclose(
            analytic[b, i], (inverse @ score) * forward[x[b, i]], rtol=2e-4, atol=2e-5
        )
        assert abs(analytic[b, i].sum() - 1.0) < 1e-5
        jumps = delta * rates[x[b, i]] * score
        jumps[x[b, i]] = 0.0
        jumps[x[b, i]] = max(1.0 - jumps.sum(), 0.0)
        np.testing.assert_allclose(euler[b, i], jumps / jumps.sum(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_analytic_exact_one_position_at_a_time(gamma):
    """Block ω = 1 with two levels per position: each step moves one position, so the analytic
    step with exact scores samples p exactly. Uniform runs in float64 (oracle and step): near
    full noise its scores differ from 1 by ~e^{-13.8}, below float32 resolution."""
    process = GammaHybrid(N, gamma)
    hyper = hyperschedules.block(L, 1, 2, num_steps=2 * L)
    wide = gamma == 1.0
    sampling = CategoricalConfig(precision="float64" if wide else "float32")
    with jax.enable_x64(wide):
        levels = _levels(hyper, jnp.float64 if wide else jnp.float32)
        x_init = _uniform_prior() if wide else _all_mask()
        samples = _sample("analytic", process, levels, x_init, sampling=sampling)
    _assert_close_to(samples, P)


GAMMA = GammaHybrid(N, 0.2)  # one γ-hybrid process for the sampled score tests (shared compiles)


@pytest.mark.parametrize(
    "data, hyper",
    [
        (P, hyperschedules.block(L, 1, 2, num_steps=2 * L)),
        (_product_of_marginals(P), hyperschedules.flat(L, 3)),
    ],
    ids=["correlated-block1-2levels", "product-flat-3steps"],
)
def test_analytic_gamma_exact_inverse_where_convex_mix_fails(data, hyper):
    """Few coarse steps where the per-position reverse step is exact (one position per step,
    or data that factorises): the exact inverse exp(-Δ Q_γ) samples the data within the
    sampling bound; the convex mix of the absorb and uniform steps misses by > 2× the bound."""
    exact = _sample("analytic", GAMMA, _levels(hyper, num_steps=12), _all_mask(), data)
    mixed = _sample("convex_mix", GAMMA, _levels(hyper, num_steps=6), _all_mask(), data)
    _assert_close_to(exact, data)
    bound = tp.tv_sampling_bound(data, NUM_SAMPLES)
    tv_mixed = tp.total_variation(tp.empirical_distribution(mixed), data)
    assert tv_mixed > 2.0 * bound, f"convex mix TV {tv_mixed:.4f} vs bound {bound:.4f}"


@pytest.mark.parametrize(
    "kind, hyper",
    [
        ("analytic", hyperschedules.flat(L, 12)),
        ("analytic", hyperschedules.slide(L, 2, 4)),
        ("euler", hyperschedules.flat(L, 16)),
    ],
    ids=["analytic-flat12", "analytic-slide2", "euler-flat16"],
)
def test_score_predictors_match_dense_chain(kind, hyper):
    """Several positions move per step: the samples follow the exact law of the sampler's
    chain, and p up to that law's discretisation error (which is small here)."""
    levels = _levels(hyper, num_steps=max(hyper.num_steps, 12))
    samples = _sample(kind, GAMMA, levels, _all_mask())

    def kernel(sigma_now, sigma_next, *_):
        ratios, posterior = _exact_oracles(GAMMA, P, sigma_now)
        return tp.score_kernel(kind, GAMMA.gamma, STATES, ratios, posterior, sigma_now, sigma_next)

    assert _check_against_chain(samples, _chain_law(kernel, levels)) < 0.1


def test_denoise_step_is_final_analytic_step_and_never_masks():
    process = GammaHybrid(N, 0.3)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.integers(0, N + 1, size=(64, L)), jnp.int32)
    log_score = jnp.asarray(rng.normal(size=(64, L, N)), jnp.float32)
    sigma = jnp.asarray(rng.uniform(0.0, 3.0, size=(64, L)), jnp.float32).at[:, 0].set(0.0)
    key = jax.random.key(9)
    out, same = jax.jit(
        lambda *a: (
            denoise_step(key, *a, process),
            analytic_step(key, *a[:2], a[2], jnp.zeros_like(a[2]), process),
        )
    )(x, log_score, sigma)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(same))
    assert np.all(np.asarray(out)[:, 1:] < N)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], np.asarray(x)[:, 0])  # sigma = 0 stays


def test_denoise_transition_is_exact_clean_posterior():
    """Tweedie to noise 0 with exact scores is the exact posterior (γ = 0.5, mixed noise)."""
    process = GammaHybrid(N, 0.5)
    sigma = np.broadcast_to(np.array([0.3, 2.0, 0.0], np.float32), STATES.shape)
    reachable = STATES[:, 2] < N  # position 2 is settled
    log_score = _oracle_log_ratios(process, P, STATES, sigma)
    want = np.asarray(_oracle_posterior(process, P, STATES, sigma))[reachable]
    denoise = jax.jit(
        lambda *a: (denoise_transition(process, *a), clean_log_probs_from_score(process, *a))
    )
    probs, log_probs = denoise(log_score, STATES, sigma)
    np.testing.assert_allclose(np.asarray(probs)[reachable], want, atol=2e-5)
    np.testing.assert_allclose(np.exp(np.asarray(log_probs))[reachable], want, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Masked family: MDLM, ACS, first hitting.


@pytest.mark.parametrize(
    "hyper",
    [hyperschedules.flat(L, 8), hyperschedules.block(L, 2, 2, num_steps=4)],
    ids=["flat8", "block2"],
)
def test_mdlm_matches_dense_chain(hyper):
    absorb = GammaHybrid.absorb(N)
    levels = _levels(hyper, num_steps=8)
    samples = _sample("mdlm", absorb, levels, _all_mask())
    _, posterior = _exact_oracles(absorb, P, np.ones(L))
    law = _chain_law(lambda a, b, c, d: tp.masked_kernel(STATES, posterior, c, d), levels)
    _check_against_chain(samples, law)


@pytest.mark.parametrize("process", [EpsilonHybrid(N, 0.1), GAMMA], ids=["epsilon", "gamma"])
def test_acs_matches_dense_chain(process):
    """ACS (Alg. 4, η = 0.3) on a flat 6-step schedule: with the exact ε-hybrid (ε = 0.1)
    posterior, or a γ-hybrid score model through its Tweedie clean-token prediction and
    ``alpha = e^{-(1-γ) sigma_bar}`` (the reference uses the exact posterior directly)."""
    levels = _levels(hyperschedules.flat(L, 6))
    samples = _sample("acs", process, levels, _all_mask())
    alpha = alpha_of(process, levels.sigma_bar)

    def kernel(sigma_now, sigma_next, alpha_now, alpha_next):
        _, posterior = _exact_oracles(process, P, sigma_now)
        return tp.masked_kernel(STATES, posterior, alpha_now, alpha_next, eta=0.3)

    _assert_close_to(samples, _chain_law(kernel, NoiseLevels(levels.sigma_bar, alpha)))


def test_acs_eta_zero_is_mdlm_and_updates_happen_at_alg4_rates():
    rng = np.random.default_rng(5)
    n = 8192
    x = jnp.asarray(rng.integers(0, N + 1, size=(n, L)), jnp.int32)
    log_probs = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(n, L, N)), jnp.float32))
    # p_transfer = 0.25 at position 0, 0 (unchanged noise) at 1, 1 (next level clean) at 2.
    alpha_now = jnp.broadcast_to(jnp.array([0.2, 0.5, 0.6]), x.shape)
    alpha_next = jnp.broadcast_to(jnp.array([0.4, 0.5, 1.0]), x.shape)
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(acs_step(key, x, log_probs, alpha_now, alpha_next, 0.0)),
        np.asarray(mdlm_step(key, x, log_probs, alpha_now, alpha_next)),
    )
    # A point-mass prediction on another token: every update changes the token, so the change
    # rates are the update probabilities of Alg. 4: p_transfer at MASK, η(1 - p_transfer) else.
    eta = 0.6
    point = jnp.log(jax.nn.one_hot((x + 1) % N, N) + 1e-30)
    out = np.asarray(acs_step(key, x, point, alpha_now, alpha_next, eta))
    x = np.asarray(x)
    for i, p in ((0, 0.25), (2, 1.0)):
        for rows, rate in ((x[:, i] == N, p), (x[:, i] < N, eta * (1.0 - p))):
            changed = (out[rows, i] != x[rows, i]).mean()
            assert abs(changed - rate) <= 5 * math.sqrt(rate * (1 - rate) / rows.sum()) + 1e-12
    np.testing.assert_array_equal(out[:, 1], x[:, 1])  # noise unchanged there


def test_first_hitting_semi_autoregressive_is_exact():
    """BD3-LM first hitting with the current block (ω = 2) as candidates: one token per step,
    a uniform order within each block, blocks left to right — exact for exact posteriors."""
    levels = NoiseLevels(jnp.ones((L + 1, L)), jnp.zeros((L + 1, L)))  # L steps; time-agnostic
    _assert_close_to(_sample("first_hitting", GammaHybrid.absorb(N), levels, _all_mask()), P)


def test_first_hitting_reveals_exactly_one_per_block_uniformly():
    n = 20_000
    x = jnp.full((n, 7), MASK, jnp.int32).at[:, 1].set(0).at[:, 5].set(2)
    out = first_hitting_step(jax.random.key(2), x, jnp.zeros((n, 7, N)), block_width=3)
    revealed = np.asarray(out) != np.asarray(x)
    np.testing.assert_array_equal(revealed[:, 0:3].sum(1), 1)
    np.testing.assert_array_equal(revealed[:, 3:6].sum(1), 1)
    np.testing.assert_array_equal(revealed[:, 6], True)
    assert not revealed[:, 1].any() and not revealed[:, 5].any()
    assert abs(revealed[:, 0].mean() - 0.5) < 5 * math.sqrt(0.25 / n)  # masked {0, 2}


def test_first_hitting_mask_rate_law():
    """m_s = m_t U^{1/n}: P(m_s <= m) = (m / m_t)^n."""
    counts = np.array([1, 3, 8])
    rates = np.asarray(
        first_hitting_mask_rate(jax.random.key(1), jnp.full((20_000, 3), 0.8), jnp.asarray(counts))
    )
    for j, count in enumerate(counts):
        cdf = lambda r, c=count: np.clip(r, 0.0, 1.0) ** c  # noqa: E731
        assert stats.kstest(rates[:, j] / 0.8, cdf).pvalue > 1e-4
    unchanged = first_hitting_mask_rate(jax.random.key(1), jnp.array([0.5]), jnp.array([0]))
    np.testing.assert_array_equal(np.asarray(unchanged), [0.5])


def test_mdlm_cached_step_reports_changes():
    x = jnp.array([[MASK, MASK, 1], [0, 1, 2]], jnp.int32)
    ones = jnp.ones((2, L))
    out = mdlm_cached_step(jax.random.key(0), x, jnp.zeros((2, L, N)), 0 * ones, ones)
    np.testing.assert_array_equal(np.asarray(out.changed), [True, False])
    assert np.all(np.asarray(out.x)[0] < N)
    np.testing.assert_array_equal(np.asarray(out.x)[1], [0, 1, 2])


def test_transfer_probability_and_level_noise():
    now = jnp.array([0.0, 0.25, 0.5, 1.0, 0.3])
    nxt = jnp.array([0.5, 1.0, 0.5, 1.0, 0.2])
    np.testing.assert_allclose(np.asarray(transfer_probability(now, nxt)), [0.5, 1, 0, 0, 0])
    noise = level_noise(schedules.Geometric(1e-3, 20.0), jnp.array([0, 1, 4]), 4)
    assert float(noise.sigma_bar[0]) == 0.0 and float(noise.alpha[0]) == 1.0  # not sigma_min
    want = [20.0**0.25 * 1e-3**0.75, 20.0]
    np.testing.assert_allclose(np.asarray(noise.sigma_bar[1:]), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(noise.alpha[1:]), np.exp(-np.array(want)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Unmasking strategies (seed 002): the exact IID case here, the choices in test_sampling_unmasking.py.


def test_unmask_random_with_schedule_counts_is_exact():
    """IID/MD4 strategy, counts from the flat 3-step schedule (one per step): exact."""
    levels = _levels(hyperschedules.flat(L, 3))
    _assert_close_to(_sample("random_unmasking", GammaHybrid.absorb(N), levels, _all_mask()), P)


# ---------------------------------------------------------------------------------------------
# Contract: unchanged positions, jit/vmap, errors.


def test_positions_with_unchanged_noise_stay_exactly_even_with_nan_outputs():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.integers(0, N + 1, size=(128, 5)), jnp.int32)
    outputs = rng.normal(size=(128, 5, N)).astype(np.float32)
    outputs[:, [0, 4]] = np.nan
    sigma_now = jnp.broadcast_to(jnp.array([0.0, 2.0, 1.0, 3.0, 5.0]), x.shape)
    sigma_next = jnp.broadcast_to(jnp.array([0.0, 1.0, 0.0, 3.0, 5.0]), x.shape)
    process = GammaHybrid(N, 0.4)
    key = jax.random.key(0)

    @jax.jit
    def all_steps(x, outputs, sigma_now, sigma_next):
        alpha_now, alpha_next = jnp.exp(-sigma_now), jnp.exp(-sigma_next)
        return (
            analytic_step(key, x, outputs, sigma_now, sigma_next, process),
            euler_step(key, x, outputs, sigma_now, sigma_next, process),
            mdlm_step(key, x, outputs, alpha_now, alpha_next),
            acs_step(key, x, outputs, alpha_now, alpha_next, 0.7),
        )

    for out in all_steps(x, jnp.asarray(outputs), sigma_now, sigma_next):
        out = np.asarray(out)
        np.testing.assert_array_equal(out[:, [0, 3, 4]], np.asarray(x)[:, [0, 3, 4]])
        assert out.dtype == np.int32
        assert np.all(out[:, 2] < N)  # next noise 0: every step ends on an ordinary token


def test_steps_are_jittable_and_vmappable():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.integers(0, N + 1, size=(3, 4, L)), jnp.int32)
    log_probs = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(3, 4, L, N)), jnp.float32))
    alpha_now, alpha_next = jnp.full(x.shape, 0.3), jnp.full(x.shape, 0.7)
    keys = jax.random.split(jax.random.key(0), 3)
    mapped = jax.jit(jax.vmap(mdlm_step))(keys, x, log_probs, alpha_now, alpha_next)
    single = jax.jit(mdlm_step)
    for b in range(3):
        np.testing.assert_array_equal(
            np.asarray(mapped[b]), np.asarray(single(keys[b], x[b], log_probs[b], alpha_now[b],
                                                     alpha_next[b]))
        )


def test_errors_name_the_argument():
    x = jnp.full((2, L), MASK, jnp.int32)
    probs = jnp.zeros((2, L, N))
    alpha = jnp.zeros((2, L))
    key = jax.random.key(0)
    process = GammaHybrid(N, 0.5)
    for eta in (-0.1, 1.5, math.nan, True, "a", [0.1]):
        with pytest.raises(ValueError, match="eta"):
            acs_step(key, x, probs, alpha, alpha, eta)
    cases = [
        ("log_probs", lambda: mdlm_step(key, x, jnp.zeros((2, L + 1, N)), alpha, alpha)),
        ("alpha_next", lambda: mdlm_step(key, x, probs, alpha, jnp.zeros((2, L + 1)))),
        ("log_score", lambda: analytic_step(key, x, jnp.zeros((2, L, N + 1)), alpha, alpha,
                                            process)),
        ("process", lambda: euler_step(key, x, probs, alpha, alpha, EpsilonHybrid(N, 0.1))),
        ("sampling", lambda: mdlm_step(key, x, probs, alpha, alpha, "float64")),
        ("x must", lambda: mdlm_step(key, x.astype(jnp.float32), probs, alpha, alpha)),
        ("block_width", lambda: first_hitting_step(key, x, probs, block_width=0)),
        ("candidates", lambda: first_hitting_step(key, x, probs, jnp.ones((2, L + 1), bool))),
        ("num_levels", lambda: level_noise(SCHEDULE, jnp.zeros(3, jnp.int32), 0)),
        ("process", lambda: alpha_of("absorb", alpha)),
        ("float64", lambda: mdlm_step(key, x, probs, alpha, alpha,
                                      CategoricalConfig(precision="float64"))),
        ("num_unmask is required", lambda: unmask_step(key, x, probs)),
        ("num_unmask must be >= 0", lambda: unmask_step(key, x, probs, -1)),
        ("num_unmask must hold", lambda: unmask_step(key, x, probs, 1.5)),
        ("candidates", lambda: unmask_step(key, x, probs, 1, candidates=jnp.ones((2, 1), bool))),
        ("forced", lambda: unmask_step(key, x, probs, 1, forced=jnp.ones((1, L), bool))),
        ("token_log_prior", lambda: unmask_step(key, x, probs, 1, UnmaskingConfig("pc"),
                                                token_log_prior=jnp.zeros(N + 1))),
        ("config", lambda: unmask_step(key, x, probs, 1, "random")),
    ]
    for match, call in cases:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: mdlm_step(jax.random.key(0), jnp.full((2, L), MASK, jnp.int32),
                           jnp.zeros((2, L, N), jnp.int32), jnp.zeros((2, L)), jnp.zeros((2, L))),
         r"log_probs must be floating point, got dtype int32"),
        (lambda: analytic_step(jax.random.key(0), jnp.full((2, L), MASK, jnp.int32),
                               jnp.zeros((2, L, N), jnp.int32), jnp.zeros((2, L)),
                               jnp.zeros((2, L)), GammaHybrid(N, 0.5)),
         r"log_score must be floating point, got dtype int32"),
        (lambda: level_noise(SCHEDULE, jnp.zeros(3, jnp.int32), 2.0),
         r"num_levels must be an integer >= 1, got num_levels=2\.0"),
        (lambda: level_noise(SCHEDULE, jnp.zeros(3, jnp.int32), True),
         r"num_levels must be an integer >= 1, got num_levels=True"),
    ],
    ids=["mdlm-int-log-probs", "analytic-int-log-score", "float-num-levels", "bool-num-levels"],
)
def test_steps_reject_bad_arguments(call, pattern: str) -> None:
    """Integer network outputs and non-integer ``num_levels`` are refused, naming the value."""
    with pytest.raises(ValueError, match=pattern):
        call()
