"""The training core: from a validated config to jitted, sharded train and evaluation steps.

    setup = build(config, mesh, vocab_size=N)       # typed, frozen; no arrays
    state = create_train_state(setup, mesh)         # TrainState created sharded on the mesh
    train_step = make_train_step(setup, mesh)       # state, metrics = train_step(state, batch)
    eval_step = make_eval_step(setup, mesh)         # eval_step(params, batch, key) ->
                                                    #     {"nll_sum", "num_tokens"}

The train step is one pure function ``(state, batch, layout) -> (state, metrics)`` jitted with
explicit in/out shardings (state by the rules, batch over the mesh axes of the logical ``batch``
axis, metrics replicated) and the state donated. Its randomness is ``fold_in(state.rng,
state.step)``: noise levels (stratified over the batch), forward noise and dropout. Slide layouts
are drawn on the host from ``(train.seed, step)`` and passed as a pytree argument (no recompiles;
exact on resume). The optimizer is AdamW with warmup + constant/cosine learning rate, global-norm
clipping and optional ``optax.MultiSteps`` accumulation (``training.optim``); the EMA moves only
on steps that apply an update.

BD3-LM's variance-minimising clip search (seed 001 §5.3) runs at evaluation time:
:func:`search_clip` scores every ``(clip_low, clip_high)`` of a grid by the variance over batches
of the training NELBO estimator and :func:`set_clip` writes the minimiser into the state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybriddiff import hyperschedules, schedules
from hybriddiff.evaluation import likelihood
from hybriddiff.model import DiT, DiTConfig, axes
from hybriddiff.model.flops import forward_flops
from hybriddiff.model.sharding import DEFAULT_RULES, Rules, activate
from hybriddiff.processes import EpsilonHybrid, GammaHybrid
from hybriddiff.training import optim
from hybriddiff.training.objective import ApplyFn, Objective, draw_levels, objective_loss
from hybriddiff.training.state import (TrainState, abstract_train_state, create_train_state,
                                       placeholder_rest, train_state_shardings)

__all__ = [
    "AnchoredSchedule",
    "ClipSearch",
    "EvalStep",
    "Setup",
    "TrainState",
    "TrainStep",
    "abstract_train_state",
    "batch_sharding",
    "bind_model",
    "build",
    "clip_grid",
    "create_train_state",
    "make_apply_fn",
    "make_eval_step",
    "make_train_step",
    "search_clip",
    "set_clip",
    "train_flops_per_step",
    "train_state_shardings",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AnchoredSchedule(schedules.NoiseSchedule):
    """``base`` shifted so that ``sigma_bar(0) = 0``: ``sigma_bar(u) = base(u) - base(0)``.

    The geometric schedule starts at ``sigma_min > 0``; anchoring it makes the forward process
    start at the data (``alpha(0) = 1``), which the likelihood bound needs (no reconstruction
    term). ``dsigma_bar`` is unchanged. :func:`build` anchors only schedules with
    ``sigma_bar(0) != 0``.
    """

    base: schedules.NoiseSchedule
    offset: float

    def _sigma_bar(self, u: jax.Array) -> jax.Array:
        return self.base._sigma_bar(u) - self.offset

    def _dsigma_bar(self, u: jax.Array) -> jax.Array:
        return self.base._dsigma_bar(u)

    def _u_from_mask_rate(self, p: jax.Array) -> jax.Array:
        base_rate = -jnp.expm1(jnp.log1p(-p) - self.offset)  # 1 - (1 - p) e^{-offset}
        return self.base._u_from_mask_rate(jnp.clip(base_rate, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the steps need, built once from a config by :func:`build` (no arrays).

    Attributes:
      model_config: the DiT architecture (output "score" for DWDSE, else "log_probs").
      objective: process, schedule, loss and hyperschedule (``training.objective.Objective``).
      mesh, rules: the device mesh and the logical-axis rules.
      optimizer, lr_schedule: the optax transformation and its learning rate per update.
      batch_size: global rows per train step. seed: init / RNG / slide seed.
      ema_decay: EMA decay (0: the EMA follows the parameters). grad_accum_steps: micro-batches
        per optimizer update.
      clip_low, clip_high: initial BD3-LM mask-rate range. clip_search: search it at evaluation.
      clip_grid: ``((clip_low, clip_high), ...)`` candidates of :func:`search_clip`.
      num_levels: noise levels of the sampling hyperschedule.
      graphdef, abstract_params, abstract_rest: the DiT split into parameters and the rest.
    """

    model_config: DiTConfig
    objective: Objective
    mesh: Mesh
    rules: Rules
    optimizer: optax.GradientTransformation
    lr_schedule: Callable[[Any], jax.Array]
    batch_size: int
    seed: int
    ema_decay: float
    grad_accum_steps: int
    clip_low: float
    clip_high: float
    clip_search: bool
    clip_grid: tuple[tuple[float, float], ...]
    num_levels: int
    graphdef: nnx.GraphDef = dataclasses.field(compare=False, repr=False)
    abstract_params: nnx.State = dataclasses.field(compare=False, repr=False)
    abstract_rest: nnx.State = dataclasses.field(compare=False, repr=False)

    @functools.cached_property
    def hyperschedule(self) -> hyperschedules.Hyperschedule:
        """The inference hyperschedule ``tau`` of the objective (for samplers)."""
        return objective_hyperschedule(self.objective, self.num_levels)


def objective_hyperschedule(objective: Objective, num_levels: int) -> hyperschedules.Hyperschedule:
    """The hyperschedule a sampler runs for ``objective`` with ``num_levels`` noise levels: the
    objective's layout kind (flat, block, slide; quench for the causal AR layout)."""
    if objective.layout_kind == "flat":
        return hyperschedules.flat(objective.length, num_levels)
    if objective.layout_kind == "block":
        return hyperschedules.block(objective.length, objective.width, num_levels)
    if objective.layout_kind == "slide":
        return hyperschedules.slide(objective.length, objective.width, num_levels)
    return hyperschedules.quench(objective.length)


def clip_grid(step: float, min_width: float) -> tuple[tuple[float, float], ...]:
    """All ``(low, high)`` on multiples of ``step`` in [0, 1] with ``high - low >= min_width``."""
    values = np.round(np.arange(0.0, 1.0 + 1e-9, step), 6)
    return tuple((float(low), float(high)) for low in values for high in values
                 if high - low >= min_width - 1e-9)


def _process(config: ml_collections.ConfigDict, num_tokens: int) -> GammaHybrid | EpsilonHybrid:
    name = config.process.name
    if name == "epsilon":
        return EpsilonHybrid(num_tokens, config.process.epsilon)
    gamma = {"absorb": 0.0, "uniform": 1.0}.get(name, config.process.gamma)
    return GammaHybrid(num_tokens, gamma)


def _schedule(config: ml_collections.ConfigDict) -> schedules.NoiseSchedule:
    sc = config.schedule
    params = ({"eta": sc.eta} if sc.name in ("loglinear", "cosine")
              else {"sigma_min": sc.sigma_min, "sigma_max": sc.sigma_max})
    schedule = schedules.get_schedule(sc.name, **params)
    offset = float(schedule.sigma_bar(0.0))
    return schedule if offset == 0.0 else AnchoredSchedule(schedule, offset)


def _model_config(config: ml_collections.ConfigDict, num_tokens: int, process: Any) -> DiTConfig:
    m = config.model
    return DiTConfig(
        num_tokens=num_tokens, num_layers=m.num_layers, d_model=m.d_model,
        num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, cond_dim=m.cond_dim,
        frequency_embedding_size=m.frequency_embedding_size,
        time_conditioning=m.time_conditioning, weighted_embedding=m.weighted_embedding,
        gamma=process.gamma if m.weighted_embedding else None, tied_embedding=m.tied_embedding,
        output="score" if config.loss.kind == "dwdse" else "log_probs",
        dropout_rate=m.dropout_rate, attention_impl=m.attention_impl,
        attention_query_chunk=m.attention_query_chunk or None, remat=m.remat,
        dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
        vocab_multiple=m.vocab_multiple)


def build(config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int,
          rules: Rules = DEFAULT_RULES) -> Setup:
    """The :class:`Setup` of a validated config (``training.config.validate``) for
    ``N = vocab_size`` ordinary tokens (the model's input vocabulary is ``N + 1`` with MASK = N)."""
    data_parallel = 1
    for name in _batch_axes(rules, mesh):
        data_parallel *= mesh.shape[name]
    if config.train.batch_size % data_parallel:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                         f"data-parallel size {data_parallel} of the mesh {dict(mesh.shape)}")
    process = _process(config, vocab_size)
    hs, tc = config.hyperschedule, config.train
    kind, length = hs.kind, config.data.seq_len
    width = {"flat": length, "quench": 1}.get(kind, hs.width)
    objective = Objective(
        process=process, schedule=_schedule(config), loss_kind=config.loss.kind,
        layout_kind=kind, length=length, width=width, shifted=hs.alignment == "shifted",
        beta1=config.loss.beta1, beta2=config.loss.beta2, lam=config.process.lam,
        num_intervals=hs.num_intervals, seed=tc.seed)
    model_config = _model_config(config, vocab_size, process)
    updates = tc.num_steps // tc.grad_accum_steps
    schedule_args = dict(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                         decay=tc.decay, total_steps=updates)
    optimizer = optim.make_optimizer(
        **schedule_args, weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2, eps=tc.eps,
        grad_clip_norm=tc.grad_clip_norm or None, grad_accum_steps=tc.grad_accum_steps)
    with activate(mesh, rules):
        abstract = nnx.eval_shape(lambda: DiT(model_config, rngs=nnx.Rngs(tc.seed)))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    sc = config.schedule
    return Setup(
        model_config=model_config, objective=objective, mesh=mesh, rules=rules,
        optimizer=optimizer, lr_schedule=optim.make_lr_schedule(**schedule_args),
        batch_size=tc.batch_size, seed=tc.seed, ema_decay=tc.ema_decay,
        grad_accum_steps=tc.grad_accum_steps, clip_low=sc.clip_low, clip_high=sc.clip_high,
        clip_search=sc.clip_search, clip_grid=clip_grid(sc.clip_grid_step, sc.clip_min_width),
        num_levels=hs.num_levels, graphdef=graphdef, abstract_params=abstract_params,
        abstract_rest=abstract_rest)


def _batch_axes(rules: Rules, mesh: Mesh) -> tuple[str, ...]:
    for logical, mesh_axes in rules:
        if logical == axes.BATCH:
            chosen = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
            return tuple(a for a in chosen if a in mesh.axis_names)
    return ()


def batch_sharding(setup: Setup, mesh: Mesh | None = None) -> NamedSharding:
    """Sharding of a ``[batch, seq_len]`` batch: rows over the mesh axes of the logical batch
    axis."""
    mesh = setup.mesh if mesh is None else mesh
    return NamedSharding(mesh, PartitionSpec(_batch_axes(setup.rules, mesh) or None, None))


def make_apply_fn(setup: Setup, params: PyTree, *, deterministic: bool = True,
                  dropout_key: jax.Array | None = None) -> ApplyFn:
    """The DiT with ``params`` as an ``objective.ApplyFn`` (what objectives and bounds call); it
    drops ``sigma_bar`` when the network reads no noise level and passes the score context of
    SHIFTED score networks through. Usable inside ``jax.jit``."""
    model = nnx.merge(setup.graphdef, params, placeholder_rest(setup.abstract_rest))
    needs_sigma = setup.model_config.needs_sigma_bar

    def apply(tokens: jax.Array, positions: jax.Array, sigma_bar: jax.Array, mask: Any,
              **score_context: jax.Array) -> jax.Array:
        return model(tokens, positions, sigma_bar if needs_sigma else None, mask=mask,
                     deterministic=deterministic, dropout_key=dropout_key, **score_context)

    return apply


def bind_model(setup: Setup, params: PyTree) -> DiT:
    """The DiT with ``params`` (e.g. ``state.params`` or ``state.ema``), for samplers."""
    return nnx.merge(setup.graphdef, params, placeholder_rest(setup.abstract_rest))


def _train_step(setup: Setup, state: TrainState, batch: jax.Array, layout: Any
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One pure train step (module docstring); ``layout`` is None unless the objective is
    dynamic (slides)."""
    objective = setup.objective
    layout = objective.static_layout() if layout is None else layout
    rng = jax.random.fold_in(state.rng, state.step)
    key_levels, key_noise, key_dropout = jax.random.split(rng, 3)
    u = draw_levels(objective, key_levels, (batch.shape[0], layout.num_intervals),
                    state.clip_low, state.clip_high)

    def loss_fn(params: PyTree) -> tuple[jax.Array, dict[str, jax.Array]]:
        apply = make_apply_fn(setup, params, deterministic=False, dropout_key=key_dropout)
        return objective_loss(objective, apply, batch, layout, u, key_noise)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accum = setup.grad_accum_steps
    applied = (state.step + 1) % accum == 0
    moved = optim.ema_update(state.ema, params, setup.ema_decay)
    ema = jax.tree.map(lambda new, old: jnp.where(applied, new, old), moved, state.ema)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": setup.lr_schedule(state.step // accum), **parts}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    return new_state, metrics


def _place(batch: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(batch, jax.Array) and batch.sharding.is_equivalent_to(sharding, batch.ndim):
        return batch
    return jax.device_put(batch, sharding)


class TrainStep:
    """``state, metrics = train_step(state, batch)``; the jitted pure step is ``.jitted``.

    For slide objectives the layout of step ``s`` is drawn on the host
    (``objective.layout_for_step(s)``). The step number is read from the state once (a host
    sync) and then counted on the host as long as each call receives the state the previous call
    returned, so the loop never waits on the device for it.
    """

    def __init__(self, setup: Setup, mesh: Mesh | None = None) -> None:
        self.setup = setup
        self.mesh = setup.mesh if mesh is None else mesh
        self.state_shardings = train_state_shardings(setup, self.mesh)
        self.batch_sharding = batch_sharding(setup, self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        out_shardings = (self.state_shardings, replicated)
        if setup.objective.dynamic:
            fn = functools.partial(_train_step, setup)
            in_shardings = (self.state_shardings, self.batch_sharding, replicated)
        else:
            def fn(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
                return _train_step(setup, state, batch, None)
            in_shardings = (self.state_shardings, self.batch_sharding)
        self.jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                              donate_argnums=0)
        self._last_step: jax.Array | None = None
        self._host_step = 0

    def host_step(self, state: TrainState) -> int:
        """``int(state.step)``, without a device sync for the state this object last returned."""
        if self._last_step is not None and state.step is self._last_step:
            return self._host_step
        return int(jax.device_get(state.step))

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        args: tuple[Any, ...] = (state, _place(batch, self.batch_sharding))
        step = 0
        if self.setup.objective.dynamic:
            step = self.host_step(state)
            args += (self.setup.objective.layout_for_step(step),)
        with activate(self.mesh, self.setup.rules):
            new_state, metrics = self.jitted(*args)
        if self.setup.objective.dynamic:
            self._last_step, self._host_step = new_state.step, step + 1
        return new_state, metrics


def make_train_step(setup: Setup, mesh: Mesh | None = None) -> TrainStep:
    """The jitted, sharded train step of ``setup`` (:class:`TrainStep`); the state is donated."""
    return TrainStep(setup, mesh)


class EvalStep:
    """``{"nll_sum", "num_tokens"} = eval_step(params, batch, key)``: the Monte-Carlo negative-ELBO
    bound of ``evaluation.likelihood.negative_elbo`` (deterministic network)."""

    def __init__(self, setup: Setup, mesh: Mesh | None = None) -> None:
        self.setup = setup
        self.mesh = setup.mesh if mesh is None else mesh
        self.batch_sharding = batch_sharding(setup, self.mesh)
        params_shardings = train_state_shardings(setup, self.mesh).params
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def fn(params: PyTree, batch: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
            apply = make_apply_fn(setup, params, deterministic=True)
            out = likelihood.negative_elbo(setup.objective, apply, batch, key)
            return {"nll_sum": out.nll_sum, "num_tokens": out.num_tokens}

        self.jitted = jax.jit(fn, in_shardings=(params_shardings, self.batch_sharding, replicated),
                              out_shardings=replicated)

    def __call__(self, params: PyTree, batch: Any, key: jax.Array) -> dict[str, jax.Array]:
        with activate(self.mesh, self.setup.rules):
            return self.jitted(params, _place(batch, self.batch_sharding), key)


def make_eval_step(setup: Setup, mesh: Mesh | None = None) -> EvalStep:
    """The jitted evaluation step of ``setup`` (:class:`EvalStep`)."""
    return EvalStep(setup, mesh)


def train_flops_per_step(setup: Setup) -> int:
    """Analytic FLOPs of one train step (forward + backward) over the objective's layout, counting
    only the attention entries its mask allows (``model.flops``; slides: the layout of step 0)."""
    objective = setup.objective
    layout = objective.layout_for_step(0)
    mask = objective.attention_mask(layout)
    return forward_flops(setup.model_config, setup.batch_size, layout.num_slots,
                         None if mask is None else np.asarray(mask)).train_step


class ClipSearch(NamedTuple):
    """Result of :func:`search_clip`."""

    clip_low: float
    clip_high: float
    grid: np.ndarray  # [K, 2] candidates
    variances: np.ndarray  # [K] variance over batches of the NELBO estimate
    estimates: np.ndarray  # [num_batches, K]


@functools.lru_cache(maxsize=8)
def _clip_estimator(setup: Setup) -> Callable[..., jax.Array]:
    objective = setup.objective
    layout = objective.layout_for_step(0)

    def estimate(params: PyTree, batch: jax.Array, key: jax.Array, grid: jax.Array) -> jax.Array:
        apply = make_apply_fn(setup, params, deterministic=True)
        key_levels, key_noise = jax.random.split(key)

        def one(bounds: jax.Array) -> jax.Array:
            u = draw_levels(objective, key_levels, (batch.shape[0], layout.num_intervals),
                            bounds[0], bounds[1])
            return objective_loss(objective, apply, batch, layout, u, key_noise)[1]["diffusion"]

        return jax.lax.map(one, grid)  # [K]

    return jax.jit(estimate, out_shardings=NamedSharding(setup.mesh, PartitionSpec()))


def search_clip(setup: Setup, params: PyTree, batches: Iterable[Any], key: jax.Array,
                grid: Iterable[tuple[float, float]] | None = None) -> ClipSearch:
    """BD3-LM's data-driven clipped schedule (seed 001 §5.3): ``argmin_{low, high} Var[L(X)]``.

    For each batch ``X`` of ``batches`` (at least two) and each candidate ``(low, high)`` of
    ``grid`` (default ``setup.clip_grid``), ``L(X)`` is the training NELBO estimate (the MDLM
    term per block with mask rates ``U[low, high]``); every candidate sees the same batches and
    the same random numbers, so the variances differ only through the clipping.
    """
    if setup.objective.loss_kind != "mdlm":
        raise ValueError(f"search_clip needs loss.kind='mdlm' (BD3-LM), got "
                         f"loss.kind={setup.objective.loss_kind!r}")
    candidates = np.asarray(setup.clip_grid if grid is None else tuple(grid), np.float32)
    if candidates.ndim != 2 or candidates.shape[1] != 2 or len(candidates) == 0:
        raise ValueError(f"grid must be a non-empty list of (clip_low, clip_high) pairs, got "
                         f"shape {candidates.shape}")
    if not np.all((0.0 <= candidates[:, 0]) & (candidates[:, 0] < candidates[:, 1])
                  & (candidates[:, 1] <= 1.0)):
        raise ValueError("grid pairs must satisfy 0 <= clip_low < clip_high <= 1")
    estimator = _clip_estimator(setup)
    sharding = batch_sharding(setup)
    rows = []
    with activate(setup.mesh, setup.rules):
        for index, batch in enumerate(batches):
            rows.append(estimator(params, _place(batch, sharding), jax.random.fold_in(key, index),
                                  jnp.asarray(candidates)))
    if len(rows) < 2:
        raise ValueError(f"batches must hold at least 2 batches to estimate a variance, got "
                         f"{len(rows)}")
    estimates = np.asarray(jax.device_get(rows), np.float64)  # [M, K]
    variances = estimates.var(axis=0, ddof=1)
    best = int(np.argmin(variances))
    return ClipSearch(float(candidates[best, 0]), float(candidates[best, 1]), candidates,
                      variances, estimates)


def set_clip(state: TrainState, clip_low: float, clip_high: float) -> TrainState:
    """``state`` with BD3-LM's mask-rate range set (read by the jitted step, no recompile)."""
    if not 0.0 <= clip_low < clip_high <= 1.0:
        raise ValueError(f"clip_low and clip_high must satisfy 0 <= clip_low < clip_high <= 1, "
                         f"got clip_low={clip_low}, clip_high={clip_high}")
    low = jax.device_put(jnp.asarray(clip_low, jnp.float32), state.clip_low.sharding)
    high = jax.device_put(jnp.asarray(clip_high, jnp.float32), state.clip_high.sharding)
    return state.replace(clip_low=low, clip_high=high)
