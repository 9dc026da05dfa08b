"""The training loop: data preparation, exact resume, evaluation, logging and preemption (DESIGN.md §6).

`train(config, workdir)` runs one experiment end to end:

1. validates the config against the devices and processes of the run;
2. prepares the data once into `data.prepared_dir` (default `<workdir>/data/{train,validation}`;
   process 0 prepares, the others wait at a barrier);
3. builds the mesh, the Grain pipelines (per-host rows, global arrays on the mesh) and the jitted
   train and evaluation steps (`hybriddiff.training.core`);
4. restores the newest readable checkpoint of `<workdir>/checkpoints` (train state and data
   position, straight into the mesh shardings; unreadable ones are skipped with a warning), or
   creates a fresh sharded state, optionally with the parameters of another run (`train.init_from`,
   stage 2);
5. trains to `train.num_steps`: metrics to `metrics.jsonl` and TensorBoard every `log_every` steps,
   the validation bound every `eval_every` steps (and at step 0 of a fresh run, and at the end),
   checkpoints every `checkpoint_every` steps (asynchronous, keep-N and keep-every-K) and at the end;
   SIGTERM (preemption) saves the current step and returns cleanly.

The validation bound is the Monte-Carlo negative ELBO of `core.make_eval_step` summed over the same
`train.eval_batches` validation batches with the same keys at every evaluation, so successive
values differ only through the parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybriddiff.data import (
    DataPipeline, DocumentSource, Manifest, PipelineConfig, Tokenizer, load_tokenizer, open_source,
    prepare_dataset, read_manifest, train_sentencepiece,
)
from hybriddiff.data.store import MANIFEST_NAME, write_atomic
from hybriddiff.data.tokenizers import SentencePieceTokenizer
from hybriddiff.model.sharding import make_mesh
from hybriddiff.training import config as config_lib
from hybriddiff.training import core
from hybriddiff.training.checkpoint import CheckpointManager, load_params
from hybriddiff.training.distributed import DistributedOptions, initialize
from hybriddiff.training.metrics import MetricsWriter, ProgressBar, StepTimer, mean_scalars
from hybriddiff.training.preemption import PreemptionGuard

_log = logging.getLogger(__name__)

DATA_SUBDIR = "data"
CONFIG_FILE = "config.json"
SPLIT_DIRS = {"train": "train", "validation": "validation"}
SENTENCEPIECE_PREFIX = "sentencepiece:"
_EVAL_SEED = 0x65766C  # the evaluation keys: the same for every run, whatever train.seed


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A prepared data directory: one token store per split, and the tokenizer's vocabulary size."""

    root: Path
    train_dir: Path
    validation_dir: Path
    manifest: Manifest

    @property
    def vocab_size(self) -> int:
        """N, the number of ordinary token ids (the model's input vocabulary is N + 1)."""
        return self.manifest.vocab_size


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """How a call to `train` ended.

    `step`: the step reached; `preempted`: stopped by a signal before `train.num_steps` (a checkpoint
    of `step` was saved); `train_metrics`: the last logged train scalars; `valid_metrics`: the last
    validation bound (`nll` in nats per token, `bits_per_token`, `ppl`, and the same for the EMA
    parameters with an `_ema` suffix when EMA is on); `initial_valid_metrics`: the bound at step 0
    (fresh runs only).
    """

    step: int
    preempted: bool
    train_metrics: dict[str, float]
    valid_metrics: dict[str, float]
    initial_valid_metrics: dict[str, float]


def prepared_root(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> Path:
    """`data.prepared_dir`, or `<workdir>/data` when it is empty."""
    return Path(config.data.prepared_dir) if config.data.prepared_dir else Path(workdir) / DATA_SUBDIR


def open_split(config: ml_collections.ConfigDict, split: str) -> DocumentSource:
    """The document source of one split ("train" or "validation") that the config names.

    A non-empty `data.path` reads local text files (`"openwebtext"` keeps its last-100k split,
    every other `data.source` becomes `"text"`); otherwise `data.source` is opened as named.
    """
    data = config.data
    if data.path:
        name = "openwebtext" if data.source == "openwebtext" else "text"
        path: str | None = data.path
    else:
        name, path = data.source, None
    return open_source(name, split, path=path, data_dir=data.data_dir or None,
                       validation_fraction=data.validation_fraction)


def resolve_tokenizer(spec: str, root: Path, train_source: DocumentSource) -> Tokenizer:
    """The tokenizer `data.tokenizer` names; `"sentencepiece:<vocab_size>"` trains one on the training
    documents into `<root>/sentencepiece_<vocab_size>.model` (once; later runs reuse the file)."""
    if not spec.startswith(SENTENCEPIECE_PREFIX):
        return load_tokenizer(spec)
    size = spec.removeprefix(SENTENCEPIECE_PREFIX)
    if not size.isdigit():
        raise ValueError(f"data.tokenizer={spec!r}: expected 'sentencepiece:<vocab_size>' with an integer size")
    model = root / f"sentencepiece_{size}.model"
    if model.is_file():
        return SentencePieceTokenizer(model)
    _log.info("training a SentencePiece tokenizer with %s pieces on the training documents", size)
    documents = (train_source[i] for i in range(len(train_source)))
    return train_sentencepiece(documents, model, int(size))


def prepare_data(config: ml_collections.ConfigDict, root: str | os.PathLike[str], *,
                 progress: bool = True, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Tokenizes both splits of the configured source into `root/{train,validation}` (a no-op check
    when they are already prepared with the same settings; an error when the settings differ).
    `tokenizer`: use this one instead of `data.tokenizer` (zero-shot data for a trained model)."""
    root = Path(root).absolute()  # the manifests record the tokenizer file by this path
    root.mkdir(parents=True, exist_ok=True)
    train_source = open_split(config, "train")
    if tokenizer is None:
        tokenizer = resolve_tokenizer(config.data.tokenizer, root, train_source)
    prepare_dataset(train_source, tokenizer, root / SPLIT_DIRS["train"], progress=progress)
    prepare_dataset(open_split(config, "validation"), tokenizer, root / SPLIT_DIRS["validation"],
                    progress=progress)
    return _read_prepared(root)


def _read_prepared(root: Path) -> PreparedData:
    train_dir, validation_dir = root / SPLIT_DIRS["train"], root / SPLIT_DIRS["validation"]
    manifest = read_manifest(train_dir)
    if read_manifest(validation_dir).tokenizer != manifest.tokenizer:
        raise ValueError(f"{str(root)!r}: the train and validation splits use different tokenizers")
    return PreparedData(root=root, train_dir=train_dir, validation_dir=validation_dir, manifest=manifest)


def ensure_prepared(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
                    progress: bool = True) -> PreparedData:
    """Process 0 prepares the data while the others wait; every process then reads the manifests.

    With several hosts the prepared directory must be visible to all of them (a shared file system),
    or prepared beforehand on each with `hybriddiff prepare`.
    """
    root = prepared_root(config, workdir)
    failure: BaseException | None = None
    if jax.process_index() == 0:
        try:
            prepare_data(config, root, progress=progress)
        except BaseException as error:  # noqa: BLE001 - re-raised after the barrier below
            failure = error
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("hybriddiff_prepare_data")
    if failure is not None:
        raise failure
    missing = [d for d in SPLIT_DIRS.values() if not (root / d / MANIFEST_NAME).is_file()]
    if missing:
        raise FileNotFoundError(
            f"process {jax.process_index()} finds no prepared {missing} in {str(root)!r}: put "
            "data.prepared_dir on a file system shared by all hosts, or run `hybriddiff prepare` on each"
        )
    return _read_prepared(root)


def _batch_axes(setup: core.Setup, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes of the rows of a batch (those the rules give the logical batch axis)."""
    rows = core.batch_sharding(setup, mesh).spec[0]
    return () if rows is None else ((rows,) if isinstance(rows, str) else tuple(rows))


def make_pipelines(config: ml_collections.ConfigDict, data: PreparedData, mesh: Mesh,
                   batch_axes: tuple[str, ...]) -> tuple[DataPipeline, DataPipeline]:
    """(train, validation) pipelines of global `[batch_size, seq_len]` arrays on `mesh`; each host
    reads only its own rows. Validation is shuffled with a fixed seed and rewound at every evaluation."""
    common = dict(seq_len=config.data.seq_len, global_batch_size=config.train.batch_size,
                  bos_eos_framing=config.data.bos_eos_framing)
    train = DataPipeline(PipelineConfig(data_dir=str(data.train_dir), seed=config.train.seed, **common),
                         mesh=mesh, batch_axes=batch_axes)
    valid = DataPipeline(PipelineConfig(data_dir=str(data.validation_dir), seed=0, **common),
                         mesh=mesh, batch_axes=batch_axes)
    for name, pipeline in (("train", train), ("validation", valid)):
        stats = pipeline.stats
        _log.info("%s data: %d documents, %d tokens, %d rows of %d (%d tokens and %d rows dropped)",
                  name, stats.num_documents, stats.num_tokens, stats.num_rows, stats.seq_len,
                  stats.dropped_tokens, stats.dropped_rows)
    return train, valid


class Evaluator:
    """The validation bound over fixed batches and fixed keys (`core.make_eval_step`); both are the
    same for every run on the same data, so bounds of different runs are directly comparable."""

    def __init__(self, setup: core.Setup, mesh: Mesh, pipeline: DataPipeline, num_batches: int) -> None:
        self.setup = setup
        self._step = core.make_eval_step(setup, mesh)
        self._pipeline = pipeline
        self._start = pipeline.get_state()
        self._num_batches = num_batches
        replicated = NamedSharding(mesh, PartitionSpec())
        # Made by a jitted function on every process, so the keys are one global replicated array.
        self._keys = jax.jit(
            lambda: jax.random.split(jax.random.key(_EVAL_SEED), num_batches + 1),
            out_shardings=replicated)()

    def batches(self) -> Iterator[jax.Array]:
        """The validation batches of every evaluation, from the start of the validation stream."""
        self._pipeline.set_state(self._start)
        for _ in range(self._num_batches):
            yield next(self._pipeline)

    def bound(self, params: Any) -> dict[str, float]:
        """`nll` (nats per token), `bits_per_token` and `ppl` upper bounds for `params`."""
        nll_sum, num_tokens = [], []
        for index, batch in enumerate(self.batches()):
            out = self._step(params, batch, self._keys[index])
            nll_sum.append(out["nll_sum"])
            num_tokens.append(out["num_tokens"])
        nll_sum, num_tokens = jax.device_get((nll_sum, num_tokens))
        nll = float(np.sum(nll_sum, dtype=np.float64) / np.sum(num_tokens, dtype=np.float64))
        return {"nll": nll, "bits_per_token": nll / math.log(2), "ppl": math.exp(min(nll, 700.0))}

    def __call__(self, state: core.TrainState) -> tuple[core.TrainState, dict[str, float]]:
        """The bound of the parameters (and of the EMA when it is on); with `schedule.clip_search`,
        first BD3-LM's variance-minimising clip search over the same batches (seed 001 §5.3),
        whose result is written into the returned state and used by the following train steps."""
        scalars: dict[str, float] = {}
        if self.setup.clip_search:
            found = core.search_clip(self.setup, state.params, self.batches(), self._keys[-1])
            state = core.set_clip(state, found.clip_low, found.clip_high)
            scalars.update(clip_low=found.clip_low, clip_high=found.clip_high)
        scalars.update(self.bound(state.params))
        if self.setup.ema_decay > 0:
            scalars.update({f"{k}_ema": v for k, v in self.bound(state.ema).items()})
        return state, scalars


def _init_from(state: core.TrainState, source: str, abstract: core.TrainState) -> core.TrainState:
    """Stage 2: the parameters and EMA of another run's newest readable checkpoint; the optimizer,
    step and data position start afresh."""
    try:
        loaded = load_params(source, {"params": abstract.params, "ema": abstract.ema})
    except Exception as error:
        raise ValueError(f"train.init_from={source!r}: cannot load its parameters ({error})") from error
    _log.info("initialised the parameters and EMA from %s", source)
    return state.replace(params=loaded["params"], ema=loaded["ema"])


def _write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    if jax.process_index() == 0:
        text = config.to_json_best_effort(indent=2, sort_keys=True)
        write_atomic(workdir / CONFIG_FILE, text.encode())


def _log_scalars(step: int, split: str, scalars: dict[str, float]) -> None:
    shown = " ".join(f"{k}={v:.5g}" for k, v in scalars.items())
    _log.info("step %d %s: %s", step, split, shown)


def _check_finite(step: int, scalars: dict[str, float]) -> None:
    if not math.isfinite(scalars.get("loss", 0.0)):
        raise FloatingPointError(
            f"the training loss is {scalars['loss']} at step {step} (mean since the last log "
            "line); the checkpoints written before it are kept: lower train.learning_rate or "
            "raise train.warmup_steps / train.grad_clip_norm before training again")


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
          distributed: DistributedOptions = DistributedOptions(), progress: bool = True) -> TrainResult:
    """Trains (or resumes training of) the model the config describes in `workdir`.

    `distributed`: how this process joins a multi-host run (nothing to do on one host).
    `progress`: show a progress bar (process 0).
    Raises ValueError for a URL workdir (``gs://...``): metrics, config and prepared data are
    written with local file I/O, so such a path must be a mounted directory (e.g. gcsfuse).
    """
    if "://" in os.fspath(workdir):
        raise ValueError(
            f"workdir={os.fspath(workdir)!r} is a URL; the train loop writes with local file I/O: "
            "mount the bucket (e.g. gcsfuse) and pass the mounted directory")
    initialize(distributed)
    config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chief = jax.process_index() == 0
    mesh = make_mesh(tuple(config.mesh.shape))
    data = ensure_prepared(config, workdir, progress=progress and chief)
    setup = core.build(config, mesh, vocab_size=data.vocab_size)
    train_data, valid_data = make_pipelines(config, data, mesh, _batch_axes(setup, mesh))
    _write_config(config, workdir)
    tc = config.train
    abstract = core.abstract_train_state(setup, mesh)
    train_step = core.make_train_step(setup, mesh)
    evaluator = Evaluator(setup, mesh, valid_data, tc.eval_batches)
    timer = StepTimer(tokens_per_step=tc.batch_size * config.data.seq_len,
                      flops_per_step=core.train_flops_per_step(setup), num_devices=jax.device_count())
    manager = CheckpointManager(workdir, max_to_keep=tc.keep_checkpoints or None,
                                keep_period=tc.keep_period or None,
                                save_interval_steps=tc.checkpoint_every, async_save=tc.async_checkpoint)
    with PreemptionGuard() as guard, manager as ckpt:
        restored = ckpt.restore_latest(abstract, train_data.iterator)
        if restored is not None:
            state, step = restored
            _log.info("resumed from the checkpoint at step %d in %s", step, ckpt.directory)
            if step >= tc.num_steps:
                _log.info("nothing to train: step %d already reaches train.num_steps=%d", step,
                          tc.num_steps)
        else:
            state, step = core.create_train_state(setup, mesh), 0
            if tc.init_from:
                state = _init_from(state, tc.init_from, abstract)
        return _run(config, workdir, state, step, restored is not None, train_step, train_data,
                    evaluator, timer, ckpt, guard, progress=progress and chief, chief=chief)


def _run(config: ml_collections.ConfigDict, workdir: Path, state: core.TrainState, step: int,
         resumed: bool, train_step: core.TrainStep, train_data: DataPipeline,
         evaluator: Evaluator, timer: StepTimer, ckpt: CheckpointManager, guard: PreemptionGuard, *,
         progress: bool, chief: bool) -> TrainResult:
    """The step loop of `train`, from `step` to `train.num_steps` or a preemption."""
    tc = config.train
    total = tc.num_steps
    initial_valid: dict[str, float] = {}
    valid: dict[str, float] = {}
    last_train: dict[str, float] = {}
    history: list[dict[str, jax.Array]] = []
    preempted = False
    with MetricsWriter(workdir, enabled=chief, resume_step=step if resumed else None) as writer:
        if not resumed and step < total:
            state, valid = evaluator(state)
            initial_valid = valid
            writer.write(step, "valid", valid)
            _log_scalars(step, "valid", valid)
        bar = ProgressBar(total, step, enabled=progress)
        first = True
        while step < total:
            state, metrics = train_step(state, next(train_data))
            step += 1
            history.append(metrics)
            bar.update()
            if first:  # the first step of a process includes compilation: time from its end
                jax.block_until_ready(metrics)
                timer.restart()
                first = False
            else:
                timer.count()
            if step % tc.log_every == 0 or step == total:
                scalars = mean_scalars(history)
                history.clear()
                throughput = timer.read()
                if throughput is not None:
                    scalars.update(throughput.scalars())
                _check_finite(step, scalars)
                writer.write(step, "train", scalars)
                _log_scalars(step, "train", scalars)
                bar.show(scalars)
                last_train = scalars
                timer.restart()
            if step % tc.eval_every == 0 or step == total:
                # Before the checkpoint: the clip search may change the state that is saved.
                state, valid = evaluator(state)
                writer.write(step, "valid", valid)
                _log_scalars(step, "valid", valid)
                timer.restart()
            started = time.perf_counter()
            if ckpt.save(step, state, train_data.iterator):
                timer.exclude(time.perf_counter() - started)
            if guard.should_stop(step):
                ckpt.save(step, state, train_data.iterator, force=True)
                _log.warning("preempted: saved the checkpoint of step %d; run again to resume", step)
                preempted = True
                break
        bar.close()
        if not preempted:
            ckpt.save(step, state, train_data.iterator, force=True)
    return TrainResult(step=step, preempted=preempted, train_metrics=last_train, valid_metrics=valid,
                       initial_valid_metrics=initial_valid)

