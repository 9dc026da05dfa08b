"""Full-sequence generation under a hyperschedule (seed 000 §3.1, Alg. 3 / 4 driven by ``tau``).

A generation driver owns the loop; the reverse step is pluggable. A *reverse step* is any hashable
callable ``step(key, x [B, W], output [B, W, N], now: NoiseLevels, nxt: NoiseLevels) -> x_next``
(the network output at the positions ``x``, and their per-position noise at ``tau[t]`` and
``tau[t+1]``). :class:`MDLMReverse`, :class:`ScoreReverse` and :class:`UnmaskReverse` wrap the
steps of :mod:`hybriddiff.sampling.steps`, :mod:`hybriddiff.sampling.score` and
:mod:`hybriddiff.sampling.unmasking`; they are frozen
dataclasses, so a driver jits them as static arguments.

:func:`generate` runs one ``jax.lax.scan`` over the ``T`` transitions of any hyperschedule (flat,
block, slide, quench, a user array; any rate) with the whole sequence fed to the network with full
bidirectional attention at every step (MDLM / SEDD style). A transition whose levels do not change
anywhere skips the network (``jax.lax.cond``), so the number of network calls (NFE) is at most the
number of transitions with a level change: ``T`` for ``flat`` with ``T`` steps. A network that
reads no noise level (ε-hybrid, MDLM without time conditioning) gives the same output for the same
state, so the driver keeps its last output and calls it again only after a transition that changed
a token (MDLM's cached sampler; the tokens are those of calling it every step). With ``T`` larger
than the number of tokens, most transitions change nothing and the NFE drops well below ``T``.

Prompts and infilling: ``fixed [B, d]`` marks positions that never change; they are fed as clean
tokens (``sigma_bar = 0``) and the step sees no noise change there.

SHIFTED models (seed 000 Fig. 5b, ``shifted=True``): cell ``p`` reads position ``p`` and predicts
position ``p + 1``, so the outputs are moved one position right (position 0, which has no cell
predicting it, must be fixed: a BOS or prompt), and score networks are told the state of the
position each cell predicts (``score_tokens`` / ``score_sigma_bar`` of the DiT). The KV-cached window drivers for
block / slide hyperschedules and BD3-LM's arbitrary-length generation are in
:mod:`hybriddiff.sampling.cached`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybriddiff.hyperschedules import Hyperschedule
from hybriddiff.processes import GammaHybrid
from hybriddiff.sampling.categorical import CategoricalConfig
from hybriddiff.sampling.score import analytic_step, euler_step
from hybriddiff.sampling.steps import NoiseLevels, level_noise, mdlm_step
from hybriddiff.sampling.unmasking import UnmaskingConfig, plan_from_schedule, unmask_step
from hybriddiff.schedules import NoiseSchedule

__all__ = [
    "SCORE_PREDICTORS",
    "GenerationResult",
    "MDLMReverse",
    "ReverseStep",
    "ScoreReverse",
    "UnmaskReverse",
    "generate",
    "generate_jit",
    "merge_for_inference",
    "prompt_state",
]

Array = jax.Array
SCORE_PREDICTORS = ("analytic", "euler")


class ReverseStep(Protocol):
    """``(key, x [B, W], output [B, W, N], now, nxt) -> x_next [B, W]``; must be hashable."""

    def __call__(self, key: Array, x: Array, output: Array, now: NoiseLevels,
                 nxt: NoiseLevels) -> Array: ...


@dataclasses.dataclass(frozen=True)
class MDLMReverse:
    """MDLM ancestral step (seed 000 Alg. 3) on ``alpha``; ``top_k=1`` sampling makes it greedy."""

    sampling: CategoricalConfig = CategoricalConfig()

    def __call__(self, key: Array, x: Array, output: Array, now: NoiseLevels,
                 nxt: NoiseLevels) -> Array:
        return mdlm_step(key, x, output, now.alpha, nxt.alpha, self.sampling)


@dataclasses.dataclass(frozen=True)
class ScoreReverse:
    """A SEDD predictor of the γ-hybrid process on ``sigma_bar`` (score models): ``"analytic"``
    (τ-leaping with the exact inverse, :func:`~hybriddiff.sampling.score.analytic_step`) or
    ``"euler"`` (:func:`~hybriddiff.sampling.score.euler_step`); both end with the final
    denoising step."""

    process: GammaHybrid
    sampling: CategoricalConfig = CategoricalConfig()
    predictor: str = "analytic"

    def __post_init__(self) -> None:
        if self.predictor not in SCORE_PREDICTORS:
            raise ValueError(f"predictor must be one of {SCORE_PREDICTORS}, got "
                             f"predictor={self.predictor!r}")

    def __call__(self, key: Array, x: Array, output: Array, now: NoiseLevels,
                 nxt: NoiseLevels) -> Array:
        step = analytic_step if self.predictor == "analytic" else euler_step
        return step(key, x, output, now.sigma_bar, nxt.sigma_bar, self.process, self.sampling)


@dataclasses.dataclass(frozen=True)
class UnmaskReverse:
    """A seed 002 unmasking strategy whose count and candidates come from the hyperschedule
    (:func:`plan_from_schedule`: as many reveals as MDLM expects, among positions whose noise
    decreases, forcing those that become clean)."""

    config: UnmaskingConfig = UnmaskingConfig()
    sampling: CategoricalConfig = CategoricalConfig()

    def __call__(self, key: Array, x: Array, output: Array, now: NoiseLevels,
                 nxt: NoiseLevels) -> Array:
        plan = plan_from_schedule(x, now.alpha, nxt.alpha, output.shape[-1])
        return unmask_step(key, x, output, plan.num_unmask, self.config, self.sampling,
                           candidates=plan.candidates, forced=plan.forced)


class GenerationResult(NamedTuple):
    """Generated tokens, network calls and wall time.

    ``tokens``: [B, d] int32. ``nfe``: denoising network calls (an int, or an int32 array when it
    is data dependent, as in arbitrary-length generation). ``cache_calls``: network calls that only
    append settled tokens to a KV cache (0 for uncached drivers). ``seconds``: wall time of the
    driver call, compilation included on the first call with given static arguments.
    ``lengths``: [B] generated lengths (arbitrary-length generation), else None.
    ``trajectory``: [T + 1, B, d] the state before the first transition and after each of the
    ``T`` transitions, when the driver was asked for it (``return_trajectory=True``), else None.
    """

    tokens: Array
    nfe: Any
    cache_calls: Any = 0
    seconds: float = 0.0
    lengths: Array | None = None
    trajectory: Array | None = None


def with_start(x0: Array, states: Array | None) -> Array | None:
    """``[T + 1, B, d]``: the start state ``x0 [B, d]`` followed by the scanned ``states``."""
    return None if states is None else jnp.concatenate([x0[None], states], 0)


def prompt_state(prompt: Array, length: int, mask_id: int) -> tuple[Array, Array]:
    """Initial state ``[B, length]`` (MASK everywhere) with ``prompt [B, P]`` written at the front,
    and the matching ``fixed [B, length]`` bool."""
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an integer array [batch, P], got {prompt.dtype} "
                         f"{tuple(prompt.shape)}")
    if prompt.shape[1] > length:
        raise ValueError(f"prompt length {prompt.shape[1]} exceeds length={length}")
    batch, size = prompt.shape
    tokens = jnp.full((batch, length), mask_id, jnp.int32).at[:, :size].set(prompt)
    fixed = jnp.zeros((batch, length), bool).at[:, :size].set(True)
    return tokens, fixed


def check_state(tokens: Array, fixed: Array | None, length: int) -> tuple[Array, Array]:
    """Validates the initial state ``tokens [B, length]`` and ``fixed`` (None = nothing fixed)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != length or not jnp.issubdtype(tokens.dtype,
                                                                            jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, {length}] (the hyperschedule "
                         f"length), got {tokens.dtype} {tuple(tokens.shape)}")
    fixed = jnp.zeros(tokens.shape, bool) if fixed is None else jnp.asarray(fixed, bool)
    if fixed.shape != tokens.shape:
        raise ValueError(f"fixed must have shape {tuple(tokens.shape)}, got {tuple(fixed.shape)}")
    return tokens.astype(jnp.int32), fixed


def check_model(model: Any) -> None:
    """The drivers need a DiT-like nnx module (``config``, ``__call__``, ``forward_cached``)."""
    if not isinstance(model, nnx.Module) or not hasattr(model, "config"):
        raise ValueError(f"model must be an nnx.Module with a DiTConfig `config`, got "
                         f"{type(model).__name__}")


def merge_for_inference(graphdef: nnx.GraphDef, state: nnx.State) -> Any:
    """``nnx.merge`` with rematerialisation off (it only serves the backward pass, and
    ``nnx.remat`` cannot run inside ``jax.lax`` control flow over a merged module). Call it inside
    the traced function that uses the model, so its variables belong to that trace."""
    model = nnx.merge(graphdef, state)
    if getattr(model.config, "remat", False):
        model.config = dataclasses.replace(model.config, remat=False)
    return model


def masked_noise(schedule: NoiseSchedule, levels: Array, num_levels: int, clean: Array
                 ) -> NoiseLevels:
    """``level_noise`` with positions where ``clean`` forced to level 0."""
    return level_noise(schedule, jnp.where(clean, 0, levels), num_levels)


def network_sigma(config: Any, noise: NoiseLevels) -> Array | None:
    """The per-position ``sigma_bar`` the network reads, or None when it reads none."""
    return noise.sigma_bar if config.needs_sigma_bar else None


def score_context(config: Any, tokens: Array, noise: NoiseLevels) -> dict[str, Array]:
    """The DiT's ``score_tokens`` / ``score_sigma_bar`` keywords: the state ``tokens [B, W]`` and
    ``noise`` of the positions the cells predict, for score networks (none for the others)."""
    if config.output != "score":
        return {}
    return dict(score_tokens=tokens, score_sigma_bar=noise.sigma_bar)


def check_shifted_start(fixed: Array) -> None:
    """SHIFTED generation needs position 0 fixed in every row (no cell predicts it)."""
    if not bool(jnp.all(fixed[:, 0])):
        raise ValueError("shifted=True needs position 0 fixed in every sequence (a prompt or BOS "
                         "token; no SHIFTED cell predicts it): got fixed[:, 0] not all True")


@functools.partial(jax.jit, static_argnames=("graphdef", "hyperschedule", "schedule", "step",
                                             "shifted", "reuse", "return_trajectory"))
def generate_jit(graphdef: nnx.GraphDef, state: nnx.State, key: Array, tokens: Array,
                 fixed: Array, *, hyperschedule: Hyperschedule, schedule: NoiseSchedule,
                 step: ReverseStep, shifted: bool = False, reuse: bool = False,
                 return_trajectory: bool = False) -> tuple[Array, Array | None, Array]:
    """The jitted scan of :func:`generate` over ``nnx.split(model)``: tokens [B, d], with
    ``return_trajectory`` the states [T + 1, B, d] (else None), and the network calls (int32).
    ``reuse``: keep the last output and call the network again only once the state has changed
    (valid for networks that read no noise level)."""
    config = nnx.merge(graphdef, state).config
    tau = hyperschedule.tau_jnp()  # [T+1, d]
    num_levels = hyperschedule.num_levels
    changes = np.any(hyperschedule.tau[:-1] != hyperschedule.tau[1:], axis=1)  # [T]
    batch, length = tokens.shape
    positions = jnp.arange(length, dtype=jnp.int32)

    def predict(x: Array, now: NoiseLevels) -> Array:
        """The network's output about every position, [B, d, N]."""
        model = merge_for_inference(graphdef, state)
        if not shifted:
            return model(x, positions, network_sigma(config, now))
        # SHIFTED: cell p predicts position p + 1; the last cell's output is discarded.
        ahead = jax.tree.map(lambda a: jnp.roll(a, -1, axis=1), now)
        output = model(x, positions, network_sigma(config, now),
                       **score_context(config, jnp.roll(x, -1, axis=1), ahead))
        return jnp.roll(output, 1, axis=1)  # position 0 is fixed

    Carry = tuple[Array, Array, Array, Array]  # x [B, d], output [B, d, N] or [], stale, calls

    def body(carry: Carry, inputs: tuple[Array, Array, Array, Array]
             ) -> tuple[Carry, Array | None]:
        t, level_now, level_next, call = inputs
        now = masked_noise(schedule, jnp.broadcast_to(level_now, (batch, length)), num_levels,
                           fixed)
        nxt = masked_noise(schedule, jnp.broadcast_to(level_next, (batch, length)), num_levels,
                           fixed)

        def denoise(carry: Carry) -> Carry:
            x, output, stale, calls = carry
            if reuse:
                output, calls = jax.lax.cond(stale, lambda: (predict(x, now), calls + 1),
                                             lambda: (output, calls))
                prediction = output
            else:
                prediction, calls = predict(x, now), calls + 1
            x_next = step(jax.random.fold_in(key, t), x, prediction, now, nxt)
            x_next = jnp.where(fixed, x, x_next.astype(x.dtype))
            return x_next, output, jnp.any(x_next != x), calls

        carry = jax.lax.cond(call, denoise, lambda c: c, carry)
        return carry, carry[0] if return_trajectory else None

    steps = jnp.arange(hyperschedule.num_steps, dtype=jnp.int32)
    kept = (batch, length, config.num_tokens) if reuse else ()
    carry = (tokens, jnp.zeros(kept, jnp.float32), jnp.asarray(True), jnp.zeros((), jnp.int32))
    (x, _, _, calls), states = jax.lax.scan(body, carry, (steps, tau[:-1], tau[1:],
                                                          jnp.asarray(changes)))
    chex.assert_shape(x, (batch, length))
    return x, with_start(tokens, states), calls


def generate(model: nnx.Module, key: Array, hyperschedule: Hyperschedule,
             schedule: NoiseSchedule, step: ReverseStep, *, tokens: Array | None = None,
             fixed: Array | None = None, batch_size: int | None = None, shifted: bool = False,
             reuse_predictions: bool = True, return_trajectory: bool = False
             ) -> GenerationResult:
    """Full-sequence generation under ``hyperschedule`` (module docstring).

    Args:
      model: a DiT (or a module with the same interface).
      key: PRNG key; transition ``t`` uses ``fold_in(key, t)``.
      hyperschedule: any :class:`Hyperschedule` of length d.
      schedule: the noise schedule mapping levels to ``sigma_bar`` / ``alpha``.
      step: the reverse step (hashable callable, module docstring).
      tokens: initial state [B, d] (e.g. from :func:`prompt_state`); default all MASK.
      fixed: [B, d] bool positions that never change (prompt, infilling), default none.
      batch_size: B when ``tokens`` is None.
      shifted: the model is SHIFTED (module docstring); position 0 must be fixed.
      reuse_predictions: for a network that reads no noise level (``config.needs_sigma_bar``
        False: ε-hybrid, MDLM without time conditioning), reuse its last output while the state
        is unchanged (MDLM's cached sampler; module docstring). Ignored for other networks.
      return_trajectory: also return the state after every transition, [T + 1, B, d].
    Returns:
      :class:`GenerationResult` with tokens [B, d], NFE and wall seconds (and the trajectory).
    """
    check_model(model)
    config = model.config
    length = hyperschedule.length
    if tokens is None:
        if batch_size is None or isinstance(batch_size, bool) or not isinstance(
                batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer when tokens is None, got "
                             f"batch_size={batch_size!r}")
        tokens = jnp.full((batch_size, length), config.mask_id, jnp.int32)
    tokens, fixed = check_state(tokens, fixed, length)
    if shifted:
        check_shifted_start(fixed)
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    reuse = bool(reuse_predictions) and not config.needs_sigma_bar
    x, states, calls = generate_jit(graphdef, state, key, tokens, fixed,
                                    hyperschedule=hyperschedule, schedule=schedule, step=step,
                                    shifted=bool(shifted), reuse=reuse,
                                    return_trajectory=bool(return_trajectory))
    x, states, calls = jax.block_until_ready((x, states, calls))
    seconds = time.perf_counter() - start
    return GenerationResult(tokens=x, nfe=int(calls), seconds=seconds, trajectory=states)
