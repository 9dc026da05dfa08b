"""Checkpoints for exact resume: train state and data-iterator position saved together.

The published implementations restore the weights only (DESIGN.md §5); here one step directory
holds everything a run needs to continue bit for bit:

- ``state``: the whole train-state pytree as the trainer gives it (parameters, optimizer state,
  EMA, step, RNG key; any pytree of ``jax.Array``, typed ``jax.random.key`` arrays included,
  which Orbax >= 0.12 stores as their raw key data and re-wraps on restore);
- ``data``: the position of a Grain iterator (``MapDataset``/``IterDataset`` iterators or a
  ``DataLoader`` iterator), written by Grain's own Orbax handler, one file per process.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``; checkpoints found unreadable by
:meth:`CheckpointManager.restore_latest` are moved to ``<workdir>/corrupt_checkpoints/<step>``.
Saving is asynchronous by default: :meth:`CheckpointManager.save` returns once the arrays are
copied off the devices and the iterator state is taken, and the files are written in the
background. A step directory only appears once complete (Orbax writes to a temporary name and
renames it), so a process killed mid-write leaves no half checkpoint behind under a step name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any

_log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"
_STATE = "state"
_DATA = "data"


def _check_optional_positive(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


def _all_processes_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a host-level all-gather when multi-process)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
    return bool(np.all(flags))


def _absolute(workdir: str | epath.PathLike) -> epath.Path:
    """Local paths made absolute (Orbax requires it on multi-host); URLs (gs://...) unchanged."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _describe(err: BaseException) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first_line[:500]}"


class CheckpointManager:
    """Saves and restores ``(train state, data iterator)`` pairs under ``<workdir>/checkpoints``.

    Args:
      workdir: the run's directory (created if missing).
      max_to_keep: keep the newest ``max_to_keep`` checkpoints (None keeps all).
      keep_period: also keep forever every checkpoint whose step is a multiple of this.
      save_interval_steps: :meth:`save` without ``force`` writes only at multiples of this (and
        at a multi-host preemption sync point).
      async_save: write files in a background thread.

    All processes of a multi-host job must make the same calls in the same order.
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        *,
        max_to_keep: int | None = 3,
        keep_period: int | None = None,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ) -> None:
        _check_optional_positive("max_to_keep", max_to_keep)
        _check_optional_positive("keep_period", keep_period)
        if save_interval_steps is None:
            raise ValueError("save_interval_steps must be an integer >= 1, got None")
        _check_optional_positive("save_interval_steps", save_interval_steps)
        self.workdir = _absolute(workdir)
        self.directory = self.workdir / CHECKPOINT_SUBDIR
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_period,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(int(save_interval_steps)),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints on disk, ascending (unreadable ones included)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        state: PyTree,
        data_iterator: Iterator[Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Checkpoints ``state`` and the iterator position as step ``step``; True if it saved.

        Without ``force`` it saves only when ``step`` is a multiple of ``save_interval_steps`` or
        a multi-host preemption sync point. A step that already has a checkpoint is never
        rewritten (returns False), so a preemption save right after a periodic one is harmless.
        The iterator state is read now; the iterator may advance as soon as this returns.
        """
        _check_step(step)
        if int(step) in self._manager.all_steps():
            return False
        items: dict[str, ocp.args.CheckpointArgs] = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = grain_checkpoint.CheckpointSave(data_iterator)
        return bool(self._manager.save(int(step), args=ocp.args.Composite(**items), force=force))

    def restore(
        self,
        step: int,
        abstract_state: PyTree,
        data_iterator: Iterator[Any] | None = None,
    ) -> PyTree:
        """Restores step ``step`` into the structure, dtypes and shardings of ``abstract_state``.

        ``abstract_state`` is typically ``jax.eval_shape(init)`` with every leaf a
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``: arrays are read straight into those
        shardings, never gathered on one host. ``data_iterator``, if given, is moved in place to
        the saved position. Raises if the checkpoint is missing or unreadable.
        """
        _check_step(step)
        items: dict[str, ocp.args.CheckpointArgs] = {
            _STATE: ocp.args.StandardRestore(abstract_state)
        }
        if data_iterator is not None:
            items[_DATA] = grain_checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored[_STATE]

    def restore_latest(
        self,
        abstract_state: PyTree,
        data_iterator: Iterator[Any] | None = None,
    ) -> tuple[PyTree, int] | None:
        """Restores the newest readable checkpoint; returns ``(state, step)``, or None if none exist.

        Newer checkpoints that fail to restore (a file deleted, truncated or corrupted) are
        skipped with a warning naming the step and the error, and moved to
        ``<workdir>/corrupt_checkpoints`` once an older one restored, so later saves can reuse
        their step numbers. If every checkpoint fails, nothing is moved (the cause is more likely
        a wrong ``abstract_state`` than corruption of all of them) and RuntimeError is raised.
        On several processes a step counts as readable only if it restored on all of them.
        """
        failures: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, abstract_state, data_iterator)
                reason = ""
            except Exception as err:  # noqa: BLE001 - any read failure makes the step unusable
                state, reason = None, _describe(err)
            if _all_processes_agree(not reason):
                for bad_step, _ in failures:
                    self._quarantine(bad_step)
                return state, step
            reason = reason or "failed to restore on another process"
            _log.warning("skipping checkpoint at step %d in %s: %s", step, self.directory, reason)
            failures.append((step, reason))
        if failures:
            listing = "; ".join(f"step {s}: {r}" for s, r in failures)
            raise RuntimeError(f"no checkpoint in {self.directory} could be restored ({listing})")
        return None

    def _quarantine(self, step: int) -> None:
        """Moves an unreadable step directory out of the manager's way (primary process only)."""
        source = self.directory / str(step)
        if jax.process_index() == 0 and source.exists():
            target_root = self.workdir / CORRUPT_SUBDIR
            target_root.mkdir(parents=True, exist_ok=True)
            target = target_root / str(step)
            suffix = 1
            while target.exists():
                target = target_root / f"{step}.{suffix}"
                suffix += 1
            source.rename(target)
            _log.warning("moved unreadable checkpoint at step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"hybriddiff_quarantine_{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_params(
    workdir: str | epath.PathLike,
    target: Mapping[str, PyTree],
    *,
    step: int | None = None,
) -> dict[str, PyTree]:
    """Reads selected sub-trees of another run's train state, e.g. to start stage 2 from stage 1.

    ``target`` maps top-level names of the saved state to abstract sub-trees with shardings, e.g.
    ``{"params": abstract_params}`` or ``{"params": ..., "ema": ...}``; only those sub-trees are
    read (the optimizer state and data position are ignored). ``step=None`` takes the newest
    checkpoint that restores, skipping unreadable ones; nothing in ``workdir`` is modified.
    """
    if not isinstance(target, Mapping) or len(target) == 0:
        raise ValueError(f"target must be a non-empty mapping of sub-tree names, got {target!r}")
    directory = _absolute(workdir) / CHECKPOINT_SUBDIR
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    )
    try:
        available = sorted(manager.all_steps())
        if step is not None:
            _check_step(step)
            if int(step) not in available:
                raise ValueError(f"step {step} has no checkpoint in {directory}; found {available}")
            candidates = [int(step)]
        else:
            candidates = list(reversed(available))
        if not candidates:
            raise FileNotFoundError(f"no checkpoint found in {directory}")
        target = dict(target)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            }
        )
        failures: list[str] = []
        for candidate in candidates:
            try:
                _check_compatible(directory, candidate, target)
                restored = dict(manager.restore(candidate, args=args)[_STATE])
            except IncompatibleCheckpoint:
                raise
            except Exception as err:  # noqa: BLE001 - try the next older checkpoint
                if step is not None:
                    raise
                _log.warning("skipping checkpoint at step %d in %s: %s", candidate, directory,
                             _describe(err))
                failures.append(f"step {candidate}: {_describe(err)}")
                continue
            _check_complete(restored, directory, candidate)
            return restored
        raise RuntimeError(f"no checkpoint in {directory} could be read ({'; '.join(failures)})")
    finally:
        manager.close()


class IncompatibleCheckpoint(ValueError):
    """A checkpoint written by another model than the one asking for its arrays."""


def _different_model(directory: epath.Path, step: int, what: str) -> IncompatibleCheckpoint:
    return IncompatibleCheckpoint(f"the checkpoint at step {step} in {directory} {what}: it was "
                                  "written by a different model (compare the model sections of "
                                  "the two configs)")


def _lacking(directory: epath.Path, step: int, missing: list[str], total: int
             ) -> IncompatibleCheckpoint:
    return _different_model(directory, step, f"has no value for {len(missing)} of the {total} "
                            f"arrays asked for, e.g. {', '.join(missing[:3])}")


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A tree path as plain names, whatever kind of key (dict, sequence, attribute) holds it."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _saved_shapes(path: epath.Path) -> dict[tuple[str, ...], tuple[int, ...]] | None:
    """The shapes of the arrays saved under ``path`` from Orbax's tree metadata (no array is
    read), or None when the metadata cannot be read or understood."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint fails (and is skipped) in restore
        return None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping):
        return None
    return {_path_key(p): tuple(leaf.shape) for p, leaf in
            jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def _check_compatible(directory: epath.Path, step: int, target: PyTree) -> None:
    """Refuses, before reading, a checkpoint that lacks some of ``target``'s arrays or holds them
    with other shapes, naming a few (skipped when the saved names are not understood)."""
    saved = _saved_shapes(directory / str(step) / _STATE)
    leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    keys = [_path_key(path) for path, _ in leaves]
    if not saved or not any(key in saved for key in keys):
        return
    missing = [jax.tree_util.keystr(path) for (path, _), key in zip(leaves, keys)
               if key not in saved]
    if missing:
        raise _lacking(directory, step, missing, len(leaves))
    reshaped = [f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} saved as {saved[key]}"
                for (path, leaf), key in zip(leaves, keys) if tuple(leaf.shape) != saved[key]]
    if reshaped:
        raise _different_model(directory, step, f"holds {len(reshaped)} of the {len(leaves)} "
                               f"arrays asked for with other shapes, e.g. "
                               f"{', '.join(reshaped[:3])}")


def _check_complete(restored: PyTree, directory: epath.Path, step: int) -> None:
    """A partial restore leaves the target's leaves that the checkpoint lacks abstract: refuse
    them, naming a few, rather than train on placeholders."""
    leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    missing = [jax.tree_util.keystr(path) for path, leaf in leaves
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise _lacking(directory, step, missing, len(leaves))
