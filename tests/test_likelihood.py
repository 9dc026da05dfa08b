"""The negative-ELBO bound of hybriddiff.evaluation.likelihood against exact references.

Toy "networks" whose outputs we control (tiny vocabulary N = 2, rows of 2 or 4 tokens) stand in
for the DiT. The generator a network defines is computed exactly: its reverse-time CTMC over all
(N+1)^L states is integrated with matrix exponentials from the prior π at u = 1 down to u = 0,
giving p_gen(x0) for every clean row. Checks, per process:

* validity: the Monte-Carlo bound (averaged over a large batch of copies of x0) is >= -log p_gen(x0)
  for an arbitrary (random, mask-respecting) network;
* tightness: with the exact posteriors / ratios of a known distribution p, the bound equals
  -log p(x0) (absorb, BD3) or -log p_gen(x0) up to the tiny prior mismatch (γ-hybrid), which pins
  down every weight;
* AR: the bound is the exact NLL.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from hybriddiff import masks
from hybriddiff.evaluation import likelihood
from hybriddiff.processes import EpsilonHybrid, GammaHybrid
from hybriddiff.schedules import LogLinear
from hybriddiff.training.objective import Objective

NUM_TOKENS = 2
MASK = NUM_TOKENS
COPIES = 4096  # Monte-Carlo copies of each row (stratified times over the batch)
GRID = 1500  # reverse-CTMC integration steps


def all_rows(num_states: int, length: int) -> np.ndarray:
    return np.array(list(itertools.product(range(num_states), repeat=length)), np.int32)


def data_distribution(length: int, seed: int = 0) -> np.ndarray:
    """A correlated distribution over the N^L clean rows (order of ``all_rows``)."""
    logits = 1.5 * np.random.default_rng(seed).standard_normal(NUM_TOKENS**length)
    p = np.exp(logits - logits.max())
    return p / p.sum()


# ------------------------------------------------------------------------------------------------
# Toy networks: (tokens [B, S], positions [S], sigma_bar [B, S], mask) -> [B, S, N].


def table_network(length: int, seed: int, log_probs: bool, time_scale: float = 0.0):
    """A random network that only reads the keys its attention mask allows (a valid network)."""
    rng = np.random.default_rng(seed)
    weights = jnp.asarray(rng.normal(size=(length, length, NUM_TOKENS + 1, NUM_TOKENS)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(length, NUM_TOKENS)), jnp.float32)
    slope = jnp.asarray(time_scale * rng.normal(size=(length, NUM_TOKENS)), jnp.float32)

    def apply(tokens, positions, sigma_bar, mask):
        positions = jnp.asarray(positions)
        num_slots = tokens.shape[1]
        allow = jnp.ones((num_slots, num_slots)) if mask is None else jnp.asarray(mask, jnp.float32)
        pair = weights[positions[:, None], positions[None, :]]  # [S, S, N+1, N]
        one_hot = jax.nn.one_hot(tokens, NUM_TOKENS + 1)  # [B, S, N+1]
        out = jnp.einsum("bkv,qkvn,qk->bqn", one_hot, pair, allow)
        out = out + bias[positions] + slope[positions] * jnp.tanh(sigma_bar)[..., None]
        if log_probs:
            return jax.nn.log_softmax(out, axis=-1)
        # Scores out of MASK scale like the absorbing factor 1 / (e^sigma - 1) (as the DiT's
        # score head does), so that the generator unmasks everything by u = 0.
        sigma = jnp.maximum(sigma_bar, 1e-30)[..., None]
        return jnp.where((tokens == MASK)[..., None], out - jnp.log(jnp.expm1(sigma)), out)

    return apply


def posterior_network(p: np.ndarray, length: int):
    """The exact absorbing-noise posterior ``log p(x0[pos_q] | visible keys)`` of distribution p.

    A key is a clean slot (its token is x0 there) or a noisy slot (MASK: no information, else the
    token); only keys the attention mask allows are read. Time-agnostic (absorbing noise).
    """
    rows = jnp.asarray(all_rows(NUM_TOKENS, length))  # [M, L]
    log_p = jnp.log(jnp.asarray(p, jnp.float32))

    def apply(tokens, positions, sigma_bar, mask):
        positions = jnp.asarray(positions)
        num_slots = tokens.shape[1]
        allow = jnp.ones((num_slots, num_slots), bool) if mask is None else jnp.asarray(mask)
        x0_at = rows[:, positions]  # [M, S]
        compatible = (tokens[:, None, :] == MASK) | (tokens[:, None, :] == x0_at[None])  # [B, M, S]
        excluded = allow[None, :, None, :] & ~compatible[:, None, :, :]  # [B, Q, M, K]
        log_weight = jnp.where(jnp.any(excluded, axis=-1), -jnp.inf, log_p)  # [B, Q, M]
        target = rows[:, positions].T  # [Q, M] x0 at each query's position
        one_hot = jax.nn.one_hot(target, NUM_TOKENS, dtype=bool)  # [Q, M, N]
        joint = jnp.where(one_hot[None], log_weight[..., None], -jnp.inf)  # [B, Q, M, N]
        return jax.nn.log_softmax(jax.nn.logsumexp(joint, axis=2), axis=-1)

    return apply


def exact_score_network(p: np.ndarray, process: GammaHybrid, length: int):
    """Exact concrete scores ``q_u(x with x_i = y) / q_u(x)`` of distribution p for flat rows."""
    rows = jnp.asarray(all_rows(NUM_TOKENS, length))  # [M, L]
    prob = jnp.asarray(p, jnp.float32)

    def apply(tokens, positions, sigma_bar, mask):
        del positions, mask
        sigma = sigma_bar[:, 0]  # flat: one level per row
        states = jnp.arange(NUM_TOKENS)
        kernel = jax.vmap(lambda s: process.marginal(states, jnp.full(NUM_TOKENS, s)))(sigma)
        kernel = jnp.swapaxes(kernel, 1, 2)  # [B, N+1 (x), N (x0)]
        batch_index = jnp.arange(tokens.shape[0])[:, None, None]
        factors = kernel[batch_index, tokens[:, None, :], rows[None]]  # [B, M, L]
        q_x = jnp.sum(prob * jnp.prod(factors, axis=-1), axis=-1)  # [B]
        out = []
        for i in range(length):
            others = jnp.prod(jnp.delete(factors, i, axis=-1), axis=-1)  # [B, M]
            at_i = kernel[:, :NUM_TOKENS, :][:, :, rows[:, i]]  # [B, N (y), M]
            out.append(jnp.einsum("bm,bym->by", prob * others, at_i))
        q_mod = jnp.stack(out, axis=1)  # [B, L, N]
        return jnp.log(q_mod) - jnp.log(q_x)[:, None, None]

    return apply


# ------------------------------------------------------------------------------------------------
# Exact generators.


def time_grid() -> np.ndarray:
    """Times from 1 down to 0, dense at both ends (the reverse rates are stiff there)."""
    return 0.5 * (1.0 + np.cos(np.pi * np.arange(GRID + 1) / GRID))


def reverse_ctmc(rates: np.ndarray, start: np.ndarray, widths: np.ndarray, states: np.ndarray
                 ) -> np.ndarray:
    """Integrates a reverse CTMC over sequence states.

    Args:
      rates: ``[T, S, L, N+1]`` rate (per unit time) of moving state s to s with position i set to
        y, held constant over step t (0 where y equals the current token).
      start: ``[S]`` distribution at u = 1. widths: ``[T]`` step lengths. states: ``[S, L]``.
    """
    num_states, length = states.shape
    base = (NUM_TOKENS + 1) ** np.arange(length - 1, -1, -1)
    codes = states @ base
    order = np.argsort(codes)
    source, position, value = np.meshgrid(np.arange(num_states), np.arange(length),
                                          np.arange(NUM_TOKENS + 1), indexing="ij")
    changed = states[source, position]
    target_codes = codes[source] + (value - changed) * base[position]
    target = order[np.searchsorted(codes[order], target_codes)]
    steps = rates.shape[0]
    flat_index = (np.arange(steps)[:, None] * num_states + target.ravel()[None]) * num_states \
        + source.ravel()[None]  # [T, S * L * (N+1)] into [T, S, S]
    generators = np.bincount(flat_index.ravel(), weights=rates.reshape(steps, -1).ravel(),
                             minlength=steps * num_states**2).reshape(steps, num_states, num_states)
    generators -= generators.sum(axis=1)[:, None, :] * np.eye(num_states)  # columns sum to 0
    kernels = scipy.linalg.expm(widths[:, None, None] * generators)  # [T, S, S]
    distribution = start.astype(np.float64)
    for kernel in kernels:
        distribution = kernel @ distribution
    return distribution


def prior_start(process, schedule, states: np.ndarray) -> np.ndarray:
    q_mask = float(process.marginal(jnp.zeros((), jnp.int32), schedule.sigma_bar(1.0))[MASK])
    token = np.full(NUM_TOKENS + 1, (1.0 - q_mask) / NUM_TOKENS)
    token[MASK] = q_mask
    return np.prod(token[states], axis=-1)


def network_on_states(apply, states: np.ndarray, sigma: np.ndarray, positions: np.ndarray,
                      mask=None) -> np.ndarray:
    """Network outputs for every (time, state): ``[T, S, L, N]`` float64."""
    tokens = np.tile(states, (len(sigma), 1))
    sigma_rows = np.repeat(np.asarray(sigma, np.float32), len(states))[:, None]
    sigma_rows = np.broadcast_to(sigma_rows, tokens.shape)
    out = jax.jit(apply, static_argnums=3)(jnp.asarray(tokens), jnp.asarray(positions),
                                           jnp.asarray(sigma_rows), mask)
    return np.asarray(out, np.float64).reshape(len(sigma), len(states), *out.shape[1:])


def absorbing_rates(log_probs: np.ndarray, states: np.ndarray, schedule, u_mid) -> np.ndarray:
    """Unmasking rates ``-alpha'/(1 - alpha) p(y | x)`` at masked positions."""
    alpha = np.asarray(schedule.alpha(u_mid), np.float64)
    weight = -np.asarray(schedule.dalpha(u_mid), np.float64) / (1.0 - alpha)  # [T]
    rates = np.zeros((*log_probs.shape[:3], NUM_TOKENS + 1))
    rates[..., :NUM_TOKENS] = weight[:, None, None, None] * np.exp(log_probs)
    return rates * (states == MASK)[None, :, :, None]


def score_rates(log_score: np.ndarray, states: np.ndarray, process: GammaHybrid, schedule,
                u_mid) -> np.ndarray:
    """Reverse rates ``sigma_bar' w(y -> x_i) s(x)_i[y]`` of a score network."""
    into = np.asarray(process.rate_into(jnp.asarray(states)), np.float64)  # [S, L, N+1]
    rates = np.zeros((*log_score.shape[:3], NUM_TOKENS + 1))
    rates[..., :NUM_TOKENS] = np.exp(log_score)
    dsigma = np.asarray(schedule.dsigma_bar(u_mid), np.float64)
    return dsigma[:, None, None, None] * into[None] * rates


def ordinary_part(distribution: np.ndarray, states: np.ndarray) -> np.ndarray:
    return distribution[np.all(states < NUM_TOKENS, axis=1)]


# ------------------------------------------------------------------------------------------------
# The bound, averaged over COPIES copies of each clean row.


@functools.lru_cache(maxsize=None)
def _bound_fn(objective: Objective, apply):
    return jax.jit(lambda x0, key: likelihood.negative_elbo(objective, apply, x0, key))


def mean_bound(objective: Objective, apply, rows: np.ndarray, seed: int = 0):
    """(mean bound per row [R], standard error [R], num_tokens per row)."""
    means, errors = [], []
    for index, row in enumerate(rows):
        x0 = jnp.asarray(np.tile(row, (COPIES, 1)), jnp.int32)
        out = _bound_fn(objective, apply)(x0, jax.random.key(seed * 1000 + index))
        values = np.asarray(out.per_sequence, np.float64)
        means.append(values.mean())
        errors.append(values.std() / math.sqrt(COPIES))
        tokens = float(out.num_tokens) / COPIES
    return np.array(means), np.array(errors), tokens


def flat_objective(process, loss_kind: str, eta: float, length: int = 2) -> Objective:
    return Objective(process=process, schedule=LogLinear(eta), loss_kind=loss_kind,
                     layout_kind="flat", length=length, width=length, shifted=False)


# ------------------------------------------------------------------------------------------------


def test_ar_bound_is_the_exact_nll():
    length = 4
    objective = Objective(process=GammaHybrid.absorb(NUM_TOKENS), schedule=LogLinear(1e-3),
                          loss_kind="ar", layout_kind="quench", length=length, width=1,
                          shifted=True)
    apply = table_network(length, seed=3, log_probs=True)
    rows = jnp.asarray(all_rows(NUM_TOKENS, length))
    out = _bound_fn(objective, apply)(rows, jax.random.key(0))
    expected = np.zeros(len(rows))
    for i in range(1, length):  # -log p(x_i | x_<i) from the network run on the prefix alone
        prefix = rows[:, :i]
        log_probs = apply(prefix, jnp.arange(i), jnp.zeros(prefix.shape), None)[:, -1]
        expected -= np.asarray(jnp.take_along_axis(log_probs, rows[:, i:i + 1], axis=-1)[:, 0])
    np.testing.assert_allclose(np.asarray(out.per_sequence), expected, rtol=1e-5)
    assert float(out.num_tokens) == len(rows) * (length - 1)
    # A proper distribution over x[1:] given x[0]: the exact NLL.
    totals = np.exp(-expected).reshape(NUM_TOKENS, -1).sum(axis=1)
    np.testing.assert_allclose(totals, 1.0, rtol=1e-5)


def _absorb_generator(objective: Objective, apply, length: int) -> np.ndarray:
    states = all_rows(NUM_TOKENS + 1, length)
    u = time_grid()
    u_mid = 0.5 * (u[:-1] + u[1:])
    sigma = np.asarray(objective.schedule.sigma_bar(u_mid))
    log_probs = network_on_states(apply, states, sigma, np.arange(length))
    rates = absorbing_rates(log_probs, states, objective.schedule, u_mid)
    start = prior_start(objective.process, objective.schedule, states)
    return ordinary_part(reverse_ctmc(rates, start, u[:-1] - u[1:], states), states)


def test_absorb_bound_is_tight_for_the_exact_posterior():
    """Exact posteriors make the reverse process exact (p_gen = p) and the NELBO equal to -log p."""
    p = data_distribution(2, seed=1)
    objective = flat_objective(GammaHybrid.absorb(NUM_TOKENS), "mdlm", eta=0.0)
    apply = posterior_network(p, 2)
    p_gen = _absorb_generator(objective, apply, 2)
    np.testing.assert_allclose(p_gen, p, atol=2e-3)
    bound, error, tokens = mean_bound(objective, apply, all_rows(NUM_TOKENS, 2))
    assert tokens == 2
    np.testing.assert_allclose(bound, -np.log(p), atol=4 * error.max() + 2e-3)


def test_absorb_bound_is_valid_for_any_network():
    eta = 0.05
    objective = flat_objective(GammaHybrid.absorb(NUM_TOKENS), "mdlm", eta=eta)
    apply = table_network(2, seed=5, log_probs=True)
    p_gen = _absorb_generator(objective, apply, 2)
    assert abs(p_gen.sum() - 1.0) < 2e-3
    bound, error, _ = mean_bound(objective, apply, all_rows(NUM_TOKENS, 2))
    nll = -np.log(p_gen)
    assert np.all(bound >= nll - 4 * error - 1e-3), (bound, nll)
    # The prior term is eta log N per token: dropping it would break validity at eta = 0.05.
    prior = likelihood.prior_kl(objective.process, float(objective.schedule.sigma_bar(1.0)))
    np.testing.assert_allclose(prior, eta * math.log(NUM_TOKENS), rtol=1e-5, atol=1e-12)


def _gamma_generator(objective: Objective, apply, length: int) -> np.ndarray:
    states = all_rows(NUM_TOKENS + 1, length)
    u = time_grid()
    u_mid = 0.5 * (u[:-1] + u[1:])
    sigma = np.asarray(objective.schedule.sigma_bar(u_mid))
    log_score = network_on_states(apply, states, sigma, np.arange(length))
    rates = score_rates(log_score, states, objective.process, objective.schedule, u_mid)
    start = prior_start(objective.process, objective.schedule, states)
    return ordinary_part(reverse_ctmc(rates, start, u[:-1] - u[1:], states), states)


def test_gamma_bound_is_tight_for_the_exact_scores():
    p = data_distribution(2, seed=2)
    process = GammaHybrid(NUM_TOKENS, 0.3)
    objective = flat_objective(process, "dwdse", eta=1e-3)
    apply = exact_score_network(p, process, 2)
    p_gen = _gamma_generator(objective, apply, 2)
    np.testing.assert_allclose(p_gen, p, atol=5e-3)
    bound, error, _ = mean_bound(objective, apply, all_rows(NUM_TOKENS, 2))
    nll = -np.log(p_gen)
    assert np.all(bound >= nll - 4 * error - 1e-3)
    np.testing.assert_allclose(bound, nll, atol=4 * error.max() + 1e-2)


def exact_row_scores(p: np.ndarray, process: GammaHybrid, length: int):
    """Exact concrete scores of distribution p for rows noised position by position:
    ``(x_t [B, L], sigma_bar [B, L]) -> log q(x_t with x_i = y) / q(x_t)`` [B, L, N], where
    ``q(x_t) = Σ_x0 p(x0) Π_i q_{sigma_i}(x_t,i | x0_i)``; a position at sigma 0 is conditioned on."""
    rows = jnp.asarray(all_rows(NUM_TOKENS, length))  # [M, L]
    prob = jnp.asarray(p, jnp.float32)
    states = jnp.arange(NUM_TOKENS)

    def scores(tokens, sigma_bar):
        marginal = lambda s: process.marginal(states, jnp.full(NUM_TOKENS, s))  # noqa: E731
        kernel = jnp.swapaxes(jax.vmap(jax.vmap(marginal))(sigma_bar), -1, -2)  # [B, L, N+1, N]
        b = jnp.arange(tokens.shape[0])[:, None, None]
        i = jnp.arange(length)[None, None, :]
        factors = kernel[b, i, tokens[:, None, :], rows[None]]  # [B, M, L]
        q_x = jnp.sum(prob * jnp.prod(factors, axis=-1), axis=-1)  # [B]
        out = []
        for pos in range(length):
            others = jnp.prod(jnp.delete(factors, pos, axis=-1), axis=-1)  # [B, M]
            at_pos = kernel[:, pos, :NUM_TOKENS, :][:, :, rows[:, pos]]  # [B, N (y), M]
            out.append(jnp.einsum("bm,bym->by", prob * others, at_pos))
        return jnp.log(jnp.stack(out, axis=1)) - jnp.log(q_x)[:, None, None]

    return scores


def test_shifted_gamma_bound_is_tight_for_the_exact_conditional_scores():
    """SHIFTED flat γ-hybrid (seed 000 Fig. 5b): cell p reads x_t[p] and scores position p + 1,
    whose state and level it is told; position 0 is clean conditioning. With the exact scores the
    bound is -log p(x[1:] | x[0]) over L - 1 tokens; scoring the cells' own positions is not."""
    length = 3
    p = data_distribution(length, seed=6)
    process = GammaHybrid(NUM_TOKENS, 0.3)
    objective = Objective(process=process, schedule=LogLinear(1e-3), loss_kind="dwdse",
                          layout_kind="flat", length=length, width=length, shifted=True)
    scores = exact_row_scores(p, process, length)

    def shifted(tokens, positions, sigma_bar, mask, score_tokens, score_sigma_bar):
        """The row the cells score: x[0] (clean), then each cell's predicted state."""
        row = jnp.concatenate([tokens[:, :1], score_tokens[:, :-1]], axis=1)
        levels = jnp.concatenate([jnp.zeros_like(sigma_bar[:, :1]), score_sigma_bar[:, :-1]], 1)
        out = scores(row, levels)  # [B, L, N] at positions 0..L-1
        return jnp.concatenate([out[:, 1:], jnp.zeros_like(out[:, :1])], axis=1)

    def own(tokens, positions, sigma_bar, mask, score_tokens, score_sigma_bar):
        return scores(tokens, sigma_bar)  # cell p scoring its own position p

    rows = all_rows(NUM_TOKENS, length)
    conditional = p.reshape(NUM_TOKENS, -1) / p.reshape(NUM_TOKENS, -1).sum(1, keepdims=True)
    nll = -np.log(conditional.ravel())  # -log p(x[1:] | x[0]) in the order of all_rows
    bound, error, tokens = mean_bound(objective, shifted, rows)
    assert tokens == length - 1
    np.testing.assert_allclose(bound, nll, atol=4 * error.max() + 1e-2)
    wrong, wrong_error, _ = mean_bound(objective, own, rows)
    assert np.mean(wrong - nll) > 1.0 + 4 * wrong_error.max()  # far off: about 6.6 nats


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_gamma_bound_is_valid_for_any_network(gamma):
    process = GammaHybrid(NUM_TOKENS, gamma)
    objective = flat_objective(process, "dwdse", eta=0.02)
    apply = table_network(2, seed=7, log_probs=False, time_scale=1.0)
    p_gen = _gamma_generator(objective, apply, 2)
    assert p_gen.sum() <= 1.0 + 5e-3  # a toy generator may still hold MASK at u = 0
    bound, error, _ = mean_bound(objective, apply, all_rows(NUM_TOKENS, 2), seed=int(10 * gamma))
    nll = -np.log(p_gen)
    assert np.all(bound >= nll - 4 * error - 2e-3), (bound, nll)


def test_epsilon_bound_is_valid_for_any_network():
    """The ε generator: masked diffusion for the substituted row z, then p(x0 | z)."""
    length, epsilon = 2, 0.2
    process = EpsilonHybrid(NUM_TOKENS, epsilon)
    objective = flat_objective(process, "hdce", eta=0.02)
    apply = table_network(length, seed=11, log_probs=True)
    states = all_rows(NUM_TOKENS + 1, length)
    u = time_grid()
    u_mid = 0.5 * (u[:-1] + u[1:])
    sigma = np.asarray(objective.schedule.sigma_bar(u_mid))
    log_probs = network_on_states(apply, states, sigma, np.arange(length))
    log_pz = np.logaddexp(np.log1p(-epsilon) + log_probs, np.log(epsilon / NUM_TOKENS))
    rates = absorbing_rates(log_pz, states, objective.schedule, u_mid)
    start = prior_start(GammaHybrid.absorb(NUM_TOKENS), objective.schedule, states)
    p_z = ordinary_part(reverse_ctmc(rates, start, u[:-1] - u[1:], states), states)  # [N^L]
    rows = all_rows(NUM_TOKENS, length)
    recon = network_on_states(apply, rows, np.zeros(1), np.arange(length))[0]  # [Z, L, N]
    p_x0_given_z = np.exp(sum(recon[:, i, rows[:, i]] for i in range(length)).T)  # [X, Z]
    p_gen = p_x0_given_z @ p_z
    assert abs(p_gen.sum() - 1.0) < 5e-3
    bound, error, _ = mean_bound(objective, apply, rows)
    nll = -np.log(p_gen)
    assert np.all(bound >= nll - 4 * error - 2e-3), (bound, nll)
    # The substitution entropy term against a direct sum.
    keep, other = 1 - epsilon + epsilon / NUM_TOKENS, epsilon / NUM_TOKENS
    direct = -(keep * math.log(keep) + (NUM_TOKENS - 1) * other * math.log(other))
    assert likelihood.substitution_entropy(NUM_TOKENS, epsilon) == pytest.approx(direct)


def _block_generator(objective: Objective, apply) -> np.ndarray:
    """p_gen of the block-wise generator: per block, a reverse CTMC given the clean prefix."""
    length, width = objective.length, objective.width
    layout = objective.eval_layout()
    block_states = all_rows(NUM_TOKENS + 1, width)
    u = time_grid()
    u_mid = 0.5 * (u[:-1] + u[1:])
    rows = all_rows(NUM_TOKENS, length)
    p_gen = np.ones(len(rows))
    start = prior_start(objective.process, objective.schedule, block_states)
    for block in range(length // width):
        span = slice(block * width, (block + 1) * width)
        slots = np.flatnonzero(layout.interval_of_slot == block)
        for prefix in all_rows(NUM_TOKENS, block * width):
            clean = np.zeros((len(block_states), length), np.int32)
            clean[:, :block * width] = prefix
            buffer = np.full((len(block_states), layout.noisy_size), MASK, np.int32)
            buffer[:, span] = block_states
            tokens = np.asarray(masks.gather_inputs(layout, buffer, clean, fill=MASK))
            out = np.asarray(apply(jnp.asarray(tokens), layout.positions,
                                   jnp.zeros(tokens.shape), layout.mask), np.float64)
            log_probs = np.broadcast_to(out[:, slots], (len(u_mid), *out[:, slots].shape))
            rates = absorbing_rates(log_probs, block_states, objective.schedule, u_mid)
            block_p = ordinary_part(reverse_ctmc(rates, start, u[:-1] - u[1:], block_states),
                                    block_states)
            match = np.all(rows[:, :block * width] == prefix, axis=1)
            codes = rows[match, span] @ (NUM_TOKENS ** np.arange(width - 1, -1, -1))
            p_gen[match] *= block_p[codes]
    return p_gen


def test_bd3_block_bound_is_tight_for_exact_posteriors_and_valid_otherwise():
    length, width = 4, 2
    objective = Objective(process=GammaHybrid.absorb(NUM_TOKENS), schedule=LogLinear(0.0),
                          loss_kind="mdlm", layout_kind="block", length=length, width=width,
                          shifted=False)
    rows = all_rows(NUM_TOKENS, length)
    p = data_distribution(length, seed=4)
    exact = posterior_network(p, length)
    bound, error, tokens = mean_bound(objective, exact, rows)
    assert tokens == length
    np.testing.assert_allclose(bound, -np.log(p), atol=4 * error.max() + 2e-3)

    random = table_network(length, seed=13, log_probs=True)
    p_gen = _block_generator(objective, random)
    assert abs(p_gen.sum() - 1.0) < 5e-3
    bound, error, _ = mean_bound(objective, random, rows, seed=1)
    assert np.all(bound >= -np.log(p_gen) - 4 * error - 2e-3)


def test_epsilon_bound_is_tight_for_one_token_with_exact_networks():
    """For L = 1 the ε bound is exact with exact networks: p(x0 | MASK) = p(x0) and
    p(x0 | z) = p(x0) q(z | x0) / p(z), since E_z[-log p(x0, z) + log q(z | x0)] = -log p(x0)."""
    epsilon = 0.3
    p = np.array([0.7, 0.3])
    substitution = (1 - epsilon) * np.eye(NUM_TOKENS) + epsilon / NUM_TOKENS  # q(z | x0) [z, x0]
    joint = substitution * p[None, :]  # [z, x0]
    table = np.concatenate([np.log(joint / joint.sum(axis=1, keepdims=True)), np.log(p)[None]])
    table = jnp.asarray(table, jnp.float32)  # [N+1 (input token), N]

    def apply(tokens, positions, sigma_bar, mask):
        return table[tokens]

    objective = flat_objective(EpsilonHybrid(NUM_TOKENS, epsilon), "hdce", eta=0.0, length=1)
    bound, error, tokens = mean_bound(objective, apply, all_rows(NUM_TOKENS, 1))
    assert tokens == 1
    np.testing.assert_allclose(bound, -np.log(p), atol=4 * error.max() + 2e-3)
