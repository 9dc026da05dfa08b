"""Sampling a trained run: restore its parameters and pick the driver and reverse step that match
its process, loss and hyperschedule (seed 000 §3.1; the drivers are in
:mod:`hybriddiff.sampling.generate` and :mod:`hybriddiff.sampling.cached`).

    run = restore_run(workdir)                     # config, Setup, params (EMA when on), tokenizer
    step = reverse_step(run.setup, "ancestral")    # ValueError if the model cannot use it
    result = sample(run, step, key, num_samples=8, num_levels=64)

Samplers by model output:

* score models (``loss.kind = "dwdse"``: γ-hybrid, absorb or uniform with scores): ``"analytic"``,
  τ-leaping with the exact reverse of Q_γ, and ``"euler"``, SEDD's Euler step
  (:class:`ScoreReverse`).
* clean-prediction models (``"mdlm"``, ``"hdce"``, ``"ar"``): ``"ancestral"`` (MDLM, seed 000
  Alg. 3), ``"acs"`` (seed 000 Alg. 4 with intensity ``eta``) and every seed 002 unmasking
  strategy (:data:`~hybriddiff.sampling.unmasking.COUNT_STRATEGIES`,
  :data:`~hybriddiff.sampling.unmasking.ADAPTIVE_STRATEGIES`). BD3-LM's first-hitting sampler
  (:func:`~hybriddiff.sampling.steps.first_hitting_step`) on a block run with as many levels as
  the block width (ρ = 1, log-linear) is ``"random"``: MDLM expects exactly one reveal per block
  and step, and the random strategy reveals that one uniformly among the masked positions.

Drivers by hyperschedule: ``flat`` runs :func:`generate` (whole sequence every step); ``block``,
``slide`` and ``quench`` run :func:`generate_cached` with the settled prefix in the KV cache (a
prompt is prefilled into it in one call). SHIFTED layouts need a first token fixed; :func:`sample`
fixes the tokenizer's BOS there (and in every layout when the run frames rows with BOS / EOS).

Conditioning (:func:`conditioning_state`): a prompt is written after that BOS; infilling fixes
token spans at given positions (e.g. a suffix); every fixed position is fed clean and never
changes, the others are generated.

Arbitrary length (``max_length``, ALIGNED block runs: BD3-LM, seed 001 Alg. 2): blocks of the run's
width are generated after the prompt by :func:`generate_blocks` until EOS or ``max_length``, which
may exceed the training length.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hybriddiff import hyperschedules
from hybriddiff.data import Tokenizer, read_manifest
from hybriddiff.data.tokenizers import tokenizer_from_description
from hybriddiff.model.sharding import activate, make_mesh
from hybriddiff.sampling.cached import generate_blocks, generate_cached
from hybriddiff.sampling.categorical import CategoricalConfig
from hybriddiff.sampling.generate import (SCORE_PREDICTORS, GenerationResult, MDLMReverse,
                                          ReverseStep, ScoreReverse, UnmaskReverse, generate)
from hybriddiff.sampling.steps import NoiseLevels, acs_step
from hybriddiff.sampling.unmasking import ADAPTIVE_STRATEGIES, COUNT_STRATEGIES, UnmaskingConfig

__all__ = [
    "SAMPLERS",
    "ACSReverse",
    "RestoredRun",
    "conditioning_state",
    "inference_hyperschedule",
    "restore_run",
    "reverse_step",
    "sample",
]

SAMPLERS = ("ancestral", *SCORE_PREDICTORS, "acs", *COUNT_STRATEGIES, *ADAPTIVE_STRATEGIES)
_SCORE_SAMPLERS = SCORE_PREDICTORS


@dataclasses.dataclass(frozen=True)
class ACSReverse:
    """Adaptive Correction Sampler step (seed 000 §3.4, Alg. 4) with intensity ``eta``."""

    eta: float = 0.0
    sampling: CategoricalConfig = CategoricalConfig()

    def __call__(self, key: jax.Array, x: jax.Array, output: jax.Array, now: NoiseLevels,
                 nxt: NoiseLevels) -> jax.Array:
        return acs_step(key, x, output, now.alpha, nxt.alpha, self.eta, self.sampling)


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A trained run ready to sample or evaluate.

    Attributes:
      workdir: the run directory. config: its ``config.json``. setup: ``core.Setup``.
      params: the EMA parameters when the run keeps an EMA (``train.ema_decay > 0``), else the
        raw parameters. tokenizer: the tokenizer its data was prepared with. step: checkpoint step.
      ema: whether ``params`` are the EMA.
    """

    workdir: Path
    config: ml_collections.ConfigDict
    setup: Any
    params: Any
    tokenizer: Tokenizer
    step: int
    ema: bool

    def model(self) -> Any:
        """The DiT bound to :attr:`params`."""
        from hybriddiff.training import core
        return core.bind_model(self.setup, self.params)


def restore_run(workdir: str | Path, *, ema: bool | None = None) -> RestoredRun:
    """Reads ``<workdir>/config.json``, the prepared data's tokenizer and the newest readable
    checkpoint: the EMA parameters when ``ema`` (default: when the run keeps an EMA), else the raw
    ones. Raises FileNotFoundError naming what is missing."""
    from hybriddiff.training import core
    from hybriddiff.training.checkpoint import load_params
    from hybriddiff.training.loop import CONFIG_FILE, SPLIT_DIRS, prepared_root

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir={str(workdir)!r} does not exist")
    config_path = workdir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"workdir={str(workdir)!r} has no {CONFIG_FILE}: not a training run")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    manifest = read_manifest(prepared_root(config, workdir) / SPLIT_DIRS["train"])
    tokenizer = tokenizer_from_description(manifest.tokenizer)
    mesh = make_mesh(tuple(config.mesh.shape))
    setup = core.build(config, mesh, vocab_size=manifest.vocab_size)
    abstract = core.abstract_train_state(setup, mesh)
    kept = float(config.train.ema_decay) > 0
    use_ema = kept if ema is None else bool(ema)
    if use_ema and not kept:
        raise ValueError(f"ema=True but workdir={str(workdir)!r} keeps no EMA "
                         "(train.ema_decay=0)")
    name = "ema" if use_ema else "params"
    loaded = load_params(workdir, {name: getattr(abstract, name), "step": abstract.step})
    return RestoredRun(workdir=workdir, config=config, setup=setup, params=loaded[name],
                       tokenizer=tokenizer, step=int(loaded["step"]), ema=use_ema)


def reverse_step(setup: Any, sampler: str, *, eta: float = 0.0,
                 sampling: CategoricalConfig = CategoricalConfig(),
                 **unmasking: Any) -> ReverseStep:
    """The reverse step named ``sampler`` (module docstring) for the model of ``setup``;
    ``unmasking``: fields of :class:`UnmaskingConfig` (``threshold``, ``factor``,
    ``entropy_bound``, ``position_decay``, ``confidence_clip``, ``block_width``) for the unmasking
    strategies."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got sampler={sampler!r}")
    objective = setup.objective
    score_model = objective.loss_kind == "dwdse"
    if score_model != (sampler in _SCORE_SAMPLERS):
        allowed = _SCORE_SAMPLERS if score_model else tuple(s for s in SAMPLERS
                                                            if s not in _SCORE_SAMPLERS)
        raise ValueError(f"sampler={sampler!r} does not apply to a loss.kind="
                         f"{objective.loss_kind!r} model; use one of {allowed}")
    if unmasking and sampler in ("ancestral", "acs", *SCORE_PREDICTORS):
        raise ValueError(f"unmasking options {sorted(unmasking)} apply to the unmasking "
                         f"strategies only, not to sampler={sampler!r}")
    if sampler in SCORE_PREDICTORS:
        return ScoreReverse(objective.process, sampling, predictor=sampler)
    if sampler == "ancestral":
        return MDLMReverse(sampling)
    if sampler == "acs":
        return ACSReverse(float(eta), sampling)
    return UnmaskReverse(UnmaskingConfig(strategy=sampler, **unmasking), sampling)


def inference_hyperschedule(setup: Any, num_levels: int | None = None
                            ) -> hyperschedules.Hyperschedule:
    """The run's hyperschedule kind with ``num_levels`` noise levels (default the config's)."""
    from hybriddiff.training import core

    levels = setup.num_levels if num_levels is None else num_levels
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"num_levels must be a positive integer, got num_levels={num_levels!r}")
    return core.objective_hyperschedule(setup.objective, levels)


def _token_ids(name: str, tokens: Sequence[int], num_tokens: int) -> list[int]:
    ids = [int(t) for t in tokens]
    if any(t < 0 or t >= num_tokens for t in ids):
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {num_tokens}): {ids}")
    return ids


def conditioning_state(run: RestoredRun, num_samples: int, *, prompt: Sequence[int] = (),
                       infill: Mapping[int, Sequence[int]] | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """Initial ``tokens [num_samples, L]`` (MASK where generated) and ``fixed [num_samples, L]``.

    The sequence starts with the tokenizer's BOS when the layout is SHIFTED or the run frames its
    rows with BOS / EOS (``data.bos_eos_framing``), then ``prompt``; ``infill`` maps a position to
    the token ids written from it on (spans may not overlap the start or each other).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got num_samples={num_samples!r}")
    objective = run.setup.objective
    length, num_tokens = objective.length, objective.process.num_tokens
    start = [run.tokenizer.bos_id] if (objective.shifted or bool(
        run.config.data.get("bos_eos_framing", False))) else []
    head = start + _token_ids("prompt", prompt, num_tokens)
    if len(head) > length:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's length "
                         f"{length} (after {len(start)} BOS)")
    row = np.full(length, objective.mask_id, np.int32)
    fixed_row = np.zeros(length, bool)
    row[:len(head)], fixed_row[:len(head)] = head, True
    for position, span in sorted((infill or {}).items()):
        ids = _token_ids(f"infill[{position}]", span, num_tokens)
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not (
                0 <= position and position + len(ids) <= length):
            raise ValueError(f"infill span at position {position!r} of {len(ids)} tokens does "
                             f"not fit in [0, {length})")
        if fixed_row[position:position + len(ids)].any():
            raise ValueError(f"infill span at position {position} overlaps the prompt or another "
                             "span")
        row[position:position + len(ids)], fixed_row[position:position + len(ids)] = ids, True
    return (jnp.broadcast_to(jnp.asarray(row), (num_samples, length)),
            jnp.broadcast_to(jnp.asarray(fixed_row), (num_samples, length)))


def sample(run: RestoredRun, step: ReverseStep, key: jax.Array, *, num_samples: int,
           num_levels: int | None = None, prompt: Sequence[int] = (),
           infill: Mapping[int, Sequence[int]] | None = None,
           return_trajectory: bool = False, max_length: int | None = None) -> GenerationResult:
    """``num_samples`` rows from ``run`` with the driver of its hyperschedule (module docstring),
    conditioned on ``prompt`` / ``infill`` token ids (:func:`conditioning_state`);
    ``return_trajectory``: also the states after every step, [T + 1, B, L]; ``max_length``:
    arbitrary-length generation (module docstring), ``lengths`` in the result."""
    setup = run.setup
    objective = setup.objective
    hyperschedule = inference_hyperschedule(setup, num_levels)
    tokens, fixed = conditioning_state(run, num_samples, prompt=prompt, infill=infill)
    model = run.model()
    if max_length is not None:
        if objective.layout_kind != "block" or objective.shifted:
            raise ValueError(f"max_length needs an ALIGNED block run (BD3-LM), got "
                             f"hyperschedule.kind={objective.layout_kind!r} shifted="
                             f"{objective.shifted}")
        if infill or return_trajectory:
            raise ValueError(f"max_length generation takes a prompt only, got infill="
                             f"{dict(infill or {})!r} and return_trajectory={return_trajectory!r}")
        head = int(np.asarray(fixed[0]).sum())
        with activate(setup.mesh, setup.rules):
            return generate_blocks(model, key, block_width=objective.width, max_length=max_length,
                                   schedule=objective.schedule, step=step,
                                   num_levels=hyperschedule.num_levels, prompt=tokens[:, :head],
                                   batch_size=num_samples, eos_id=run.tokenizer.eos_id)
    with activate(setup.mesh, setup.rules):
        if objective.layout_kind == "flat":
            return generate(model, key, hyperschedule, objective.schedule, step, tokens=tokens,
                            fixed=fixed, shifted=objective.shifted,
                            return_trajectory=return_trajectory)
        return generate_cached(model, key, hyperschedule, objective.schedule, step, tokens=tokens,
                               fixed=fixed, shifted=objective.shifted,
                               return_trajectory=return_trajectory)
