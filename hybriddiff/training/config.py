"""Experiment configuration: loading ``configs/*.py`` files and validating them before any compile.

A config is an ``ml_collections.ConfigDict`` with the groups ``model``, ``process``, ``loss``,
``schedule``, ``hyperschedule``, ``data``, ``train`` and ``mesh`` (``configs/base.py`` lists every
key with its meaning). Experiment files build on ``configs/base.py`` by deltas: they load it with
:func:`load_config_file` (by path, so ``configs/`` needs no package) and change a few keys.

:func:`validate` rejects bad combinations once, before any array is allocated, with a ValueError
that names the offending key and its value (DESIGN §6). Only factories read configs
(``hybriddiff.training.core.build``); everything downstream takes typed fields.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from hybriddiff import schedules

__all__ = [
    "ALIGNMENTS",
    "HYPERSCHEDULE_KINDS",
    "LOSS_KINDS",
    "LOSS_PROCESSES",
    "PROCESS_NAMES",
    "load_config_file",
    "resolve_mesh_shape",
    "validate",
    "validate_data",
]

PROCESS_NAMES = ("absorb", "uniform", "gamma", "epsilon")
LOSS_KINDS = ("mdlm", "dwdse", "hdce", "ar")
SCHEDULE_NAMES = ("loglinear", "geometric", "cosine")
HYPERSCHEDULE_KINDS = ("flat", "block", "slide", "quench")
ALIGNMENTS = ("aligned", "shifted")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
DECAYS = ("constant", "cosine")
SOURCES = ("pydoc", "text", "lm1b", "openwebtext")

# Which forward processes each loss is defined for (seed 000 Eq. 10; DESIGN §2).
LOSS_PROCESSES: dict[str, tuple[str, ...]] = {
    "dwdse": ("absorb", "uniform", "gamma"),  # SEDD score entropy for any γ-hybrid rate matrix
    "hdce": ("epsilon",),  # seed 000 Eq. 8-9
    "mdlm": ("absorb",),  # MDLM / BD3-LM (SUBS parametrisation)
    "ar": ("absorb",),  # causal LM: the quench hyperschedule, no forward noise is drawn
}

_GROUPS = ("model", "process", "loss", "schedule", "hyperschedule", "data", "train", "mesh")


def load_config_file(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """Imports the Python file at ``path`` and returns its ``get_config()``.

    Used by the experiment files to build on ``configs/base.py`` (or on another experiment) by
    path, and by tools that take ``--config=configs/x.py``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    name = "hybriddiff_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {path!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return module.get_config()


def _fail(key: str, value: Any, why: str) -> None:
    raise ValueError(f"{key}={value!r} {why}")


def _check_choice(config: ml_collections.ConfigDict, key: str, choices: Sequence[str]) -> str:
    value = _get(config, key)
    if value not in choices:
        _fail(key, value, f"is not one of {tuple(choices)}")
    return value


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if part not in node:
            raise ValueError(f"{key} is missing from the config")
        node = node[part]
    return node


def _check_int(config: ml_collections.ConfigDict, key: str, minimum: int) -> int:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(key, value, "must be an integer")
    if value < minimum:
        _fail(key, value, f"must be >= {minimum}")
    return int(value)


def _check_real(config: ml_collections.ConfigDict, key: str, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> float:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(key, value, "must be a finite real number")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        _fail(key, value, f"must lie in {interval}")
    return float(value)


def _check_bool(config: ml_collections.ConfigDict, key: str) -> bool:
    value = _get(config, key)
    if not isinstance(value, bool):
        _fail(key, value, "must be a bool")
    return value


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) mesh shape with its ``-1`` entry filled in for ``num_devices``."""
    shape = tuple(shape)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral)
                              for s in shape):
        _fail("mesh.shape", shape, "must be three integers (data, fsdp, tensor)")
    if sum(1 for s in shape if s == -1) > 1 or any(s == 0 or s < -1 for s in shape):
        _fail("mesh.shape", shape, "must hold positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            _fail("mesh.shape", shape, f"does not divide the {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        _fail("mesh.shape", shape, f"needs {math.prod(shape)} devices, but there are {num_devices}")
    return shape  # type: ignore[return-value]


def _validate_model(config: ml_collections.ConfigDict) -> None:
    for key in ("num_layers", "d_model", "num_heads", "mlp_ratio", "cond_dim",
                "frequency_embedding_size", "vocab_multiple"):
        _check_int(config, f"model.{key}", 1)
    d_model, num_heads = config.model.d_model, config.model.num_heads
    if d_model % num_heads:
        _fail("model.num_heads", num_heads, f"does not divide model.d_model={d_model}")
    if (d_model // num_heads) % 2:
        _fail("model.num_heads", num_heads,
              f"gives an odd head dimension d_model/num_heads={d_model // num_heads} (rotary "
              "embeddings need an even one)")
    if config.model.frequency_embedding_size % 2:
        _fail("model.frequency_embedding_size", config.model.frequency_embedding_size,
              "must be even")
    _check_real(config, "model.dropout_rate", 0.0, 1.0, high_open=True)
    for key in ("time_conditioning", "weighted_embedding", "tied_embedding", "remat"):
        _check_bool(config, f"model.{key}")
    impl = _check_choice(config, "model.attention_impl", ATTENTION_IMPLS)
    dtype = _check_choice(config, "model.dtype", DTYPES)
    _check_choice(config, "model.param_dtype", ("float32", "bfloat16"))
    if impl == "cudnn" and dtype == "float32":
        _fail("model.dtype", dtype, "must be bfloat16 or float16 with model.attention_impl='cudnn'")
    chunk = _get(config, "model.attention_query_chunk")
    if chunk != 0:
        _check_int(config, "model.attention_query_chunk", 1)


def _validate_process_and_loss(config: ml_collections.ConfigDict) -> tuple[str, str]:
    process = _check_choice(config, "process.name", PROCESS_NAMES)
    loss = _check_choice(config, "loss.kind", LOSS_KINDS)
    if process not in LOSS_PROCESSES[loss]:
        _fail("loss.kind", loss, f"needs process.name in {LOSS_PROCESSES[loss]}, got "
              f"process.name={process!r}")
    if process == "gamma":
        _check_real(config, "process.gamma", 0.0, 1.0, low_open=True, high_open=True)
    if process == "epsilon":
        _check_real(config, "process.epsilon", 0.0, 1.0, low_open=True, high_open=True)
        _check_real(config, "process.lam", 0.0, math.inf, high_open=True)
    if config.model.weighted_embedding and process != "gamma":
        _fail("model.weighted_embedding", True,
              f"needs process.name='gamma' (seed 000 Eq. 12), got process.name={process!r}")
    beta1 = _check_real(config, "loss.beta1", 0.0, math.inf, high_open=True)
    beta2 = _check_real(config, "loss.beta2", 0.0, math.inf, high_open=True)
    if beta1 == 0.0 and beta2 == 0.0 and loss != "ar":
        _fail("loss.beta2", beta2, "and loss.beta1=0.0 leave no loss term (Eq. 10)")
    return process, loss


def _validate_schedule(config: ml_collections.ConfigDict, loss: str) -> None:
    name = _check_choice(config, "schedule.name", SCHEDULE_NAMES)
    params = ({"eta": config.schedule.eta} if name in ("loglinear", "cosine")
              else {"sigma_min": config.schedule.sigma_min, "sigma_max": config.schedule.sigma_max})
    try:
        schedules.get_schedule(name, **params)
    except ValueError as error:
        raise ValueError(f"schedule.{error}") from None
    low = _check_real(config, "schedule.clip_low", 0.0, 1.0)
    high = _check_real(config, "schedule.clip_high", 0.0, 1.0)
    if not low < high:
        _fail("schedule.clip_low", low, f"must be < schedule.clip_high={high}")
    clip_search = _check_bool(config, "schedule.clip_search")
    if loss != "mdlm" and ((low, high) != (0.0, 1.0) or clip_search):
        _fail("schedule.clip_search" if clip_search else "schedule.clip_low",
              clip_search if clip_search else low,
              f"clips BD3-LM mask rates and needs loss.kind='mdlm', got loss.kind={loss!r}")
    _check_real(config, "schedule.clip_grid_step", 0.0, 0.5, low_open=True)
    _check_real(config, "schedule.clip_min_width", 0.0, 1.0, low_open=True)


def _validate_hyperschedule(config: ml_collections.ConfigDict, loss: str) -> None:
    kind = _check_choice(config, "hyperschedule.kind", HYPERSCHEDULE_KINDS)
    alignment = _check_choice(config, "hyperschedule.alignment", ALIGNMENTS)
    seq_len = _check_int(config, "data.seq_len", 2)
    _check_int(config, "hyperschedule.num_levels", 1)
    if kind in ("block", "slide"):
        width = _check_int(config, "hyperschedule.width", 1)
        if width > seq_len:
            _fail("hyperschedule.width", width, f"exceeds data.seq_len={seq_len}")
        if kind == "block" and seq_len % width:
            _fail("hyperschedule.width", width, f"does not divide data.seq_len={seq_len}")
        if kind == "slide":
            intervals = _get(config, "hyperschedule.num_intervals")
            if intervals != 0:
                count = _check_int(config, "hyperschedule.num_intervals", 1)
                if count > seq_len - (alignment == "shifted"):
                    _fail("hyperschedule.num_intervals", count,
                          f"exceeds the {seq_len - (alignment == 'shifted')} possible slide starts")
            if config.model.attention_impl == "splash":
                _fail("model.attention_impl", "splash",
                      "needs static masks, but hyperschedule.kind='slide' draws a new mask every "
                      "step")
    if (kind == "quench") != (loss == "ar"):
        _fail("loss.kind", loss, f"and hyperschedule.kind={kind!r} do not match: the causal LM "
              "objective is exactly the quench hyperschedule (loss.kind='ar' with kind='quench')")
    if kind == "quench" and alignment != "shifted":
        _fail("hyperschedule.alignment", alignment,
              "must be 'shifted' with kind='quench' (an ALIGNED quench is block width 1)")


def validate_data(config: ml_collections.ConfigDict) -> None:
    """The ``data`` section of ``config`` (also checked alone for a zero-shot source)."""
    source = _get(config, "data.source")
    if not isinstance(source, str) or not (source in SOURCES or
                                           (source.startswith("tfds:") and len(source) > 5)):
        _fail("data.source", source, f"is not one of {SOURCES} or 'tfds:NAME'")
    if source in ("text", "openwebtext") and not config.data.path:
        _fail("data.path", config.data.path, f"must name local files for data.source={source!r}")
    framing = _check_bool(config, "data.bos_eos_framing")
    if framing:
        _check_int(config, "data.seq_len", 3)
    _check_real(config, "data.validation_fraction", 0.0, 1.0, low_open=True, high_open=True)
    tokenizer = _get(config, "data.tokenizer")
    if not isinstance(tokenizer, str) or not tokenizer:
        _fail("data.tokenizer", tokenizer, "must be a non-empty string")
    for key in ("path", "data_dir", "prepared_dir"):
        if not isinstance(_get(config, f"data.{key}"), str):
            _fail(f"data.{key}", _get(config, f"data.{key}"), "must be a string")


def _validate_train(config: ml_collections.ConfigDict) -> None:
    num_steps = _check_int(config, "train.num_steps", 1)
    _check_int(config, "train.batch_size", 1)
    _check_int(config, "train.seed", 0)
    _check_real(config, "train.learning_rate", 0.0, math.inf, low_open=True, high_open=True)
    warmup = _check_int(config, "train.warmup_steps", 0)
    decay = _check_choice(config, "train.decay", DECAYS)
    accum = _check_int(config, "train.grad_accum_steps", 1)
    if num_steps % accum:
        _fail("train.grad_accum_steps", accum, f"does not divide train.num_steps={num_steps}")
    updates = num_steps // accum
    if warmup > updates or (decay == "cosine" and warmup >= updates):
        _fail("train.warmup_steps", warmup, f"must be below the {updates} optimizer updates")
    _check_real(config, "train.weight_decay", 0.0, math.inf, high_open=True)
    _check_real(config, "train.b1", 0.0, 1.0, high_open=True)
    _check_real(config, "train.b2", 0.0, 1.0, high_open=True)
    _check_real(config, "train.eps", 0.0, math.inf, low_open=True, high_open=True)
    _check_real(config, "train.grad_clip_norm", 0.0, math.inf, high_open=True)
    _check_real(config, "train.ema_decay", 0.0, 1.0, high_open=True)
    for key in ("log_every", "eval_every", "eval_batches", "checkpoint_every"):
        _check_int(config, f"train.{key}", 1)
    for key in ("keep_checkpoints", "keep_period"):
        _check_int(config, f"train.{key}", 0)
    _check_bool(config, "train.async_checkpoint")
    if not isinstance(config.train.init_from, str):
        _fail("train.init_from", config.train.init_from, "must be a string ('' = none)")


def _validate_parallelism(config: ml_collections.ConfigDict, num_devices: int,
                          num_processes: int) -> None:
    data, fsdp, tensor = resolve_mesh_shape(config.mesh.shape, num_devices)
    batch = config.train.batch_size
    if batch % (data * fsdp):
        _fail("train.batch_size", batch,
              f"is not divisible by the data-parallel size data*fsdp={data * fsdp} of "
              f"mesh.shape={tuple(config.mesh.shape)}")
    if batch % num_processes:
        _fail("train.batch_size", batch, f"is not divisible by the {num_processes} processes")
    if config.model.num_heads % tensor:
        _fail("model.num_heads", config.model.num_heads,
              f"is not divisible by the tensor-parallel size {tensor}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
    """Rejects a bad config before anything compiles; the ValueError names the key and its value.

    Checks every group of ``configs/base.py``: value ranges (e.g. γ, ε in (0, 1)), enumerations,
    loss/process/hyperschedule compatibility (DWDSE only with γ-hybrid processes, HDCE only
    with ε-hybrid, the causal LM only with quench + SHIFTED, BD3 clipping only with MDLM), the
    block width dividing ``data.seq_len``, the optimizer and schedule settings, and
    the parallel layout: ``mesh.shape`` against ``num_devices`` and ``train.batch_size`` divisible
    by the data-parallel size ``data * fsdp`` and by ``num_processes``. ``None`` means the
    current ``jax.device_count()`` / ``jax.process_count()``.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"config must be an ml_collections.ConfigDict, got {type(config).__name__}")
    for group in _GROUPS:
        if group not in config:
            raise ValueError(f"{group} is missing from the config (groups: {_GROUPS})")
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    _validate_model(config)
    _, loss = _validate_process_and_loss(config)
    _validate_schedule(config, loss)
    _validate_hyperschedule(config, loss)
    validate_data(config)
    _validate_train(config)
    _validate_parallelism(config, num_devices, num_processes)
