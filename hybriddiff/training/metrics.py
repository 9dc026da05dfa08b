"""Training metrics on disk and on screen: `metrics.jsonl`, TensorBoard events, throughput, progress.

Layout in the workdir (only process 0 writes):

- `metrics.jsonl`: one JSON object per line, `{"step": int, "split": "train" | "valid", "<name>": float}`;
- `tb/`: TensorBoard event files (tags `"<split>/<name>"`), written with `tensorboardX`.

A resumed run first drops the records of steps after the checkpoint it restored (those steps are
trained again) and tells TensorBoard to purge them, so both logs read as one uninterrupted run.

Throughput comes from analytic FLOPs (`core.train_flops_per_step`, which counts only the attention
entries the mask allows, DESIGN.md §5) and wall-clock windows that exclude compilation, evaluation
and checkpointing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tb"
SPLITS = ("train", "valid")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a `metrics.jsonl` (or of the one inside a workdir), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def mean_scalars(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-name mean over a list of metric dicts of scalars (device arrays are fetched at once)."""
    if not history:
        return {}
    fetched = jax.device_get(list(history))
    names = fetched[0].keys()
    return {name: float(np.mean([np.asarray(m[name], np.float64) for m in fetched])) for name in names}


class MetricsWriter:
    """Appends scalars to `<workdir>/metrics.jsonl` and TensorBoard; a no-op unless `enabled`.

    Args:
      workdir: the run's directory.
      enabled: write files (True on process 0 only).
      resume_step: the step a resumed run restored; records of later steps are removed from
        `metrics.jsonl` and purged from TensorBoard.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool = True,
                 resume_step: int | None = None) -> None:
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be None or >= 0; got {resume_step}")
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._handle = None
        self._tensorboard = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            temporary = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
            temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(temporary, self.path)
        self._handle = open(self.path, "a")
        purge = None if resume_step is None else resume_step + 1
        # The suffix keeps event files of runs started within the same second apart.
        self._tensorboard = SummaryWriter(logdir=str(Path(workdir) / TENSORBOARD_SUBDIR),
                                          purge_step=purge, flush_secs=30,
                                          filename_suffix=f".{os.getpid()}.from{purge or 0}")

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        """Records `scalars` of `split` ("train" or "valid") at `step`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
        self._handle.write(json.dumps(record) + "\n")
        self._sync()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))

    def _sync(self) -> None:
        """Flushes `metrics.jsonl` to the file system: a gcsfuse-mounted bucket uploads a file only
        when it is fsynced or closed, so each record reaches the bucket when written."""
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def flush(self) -> None:
        if self.enabled:
            self._sync()
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled and self._handle is not None:
            self._handle.close()
            self._tensorboard.close()
            self._handle = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Speed over a window of `steps` train steps that took `seconds` of wall-clock time."""

    steps: int
    seconds: float
    tokens_per_step: int
    flops_per_step: int
    num_devices: int

    @property
    def tokens_per_second(self) -> float:
        return self.steps * self.tokens_per_step / self.seconds

    @property
    def flops_per_second(self) -> float:
        """Model FLOP/s from the analytic count (allowed attention entries only)."""
        return self.steps * self.flops_per_step / self.seconds

    def scalars(self) -> dict[str, float]:
        """`tokens_per_s`, `tflops_per_s` (all devices) and `tflops_per_s_per_device`."""
        return {
            "tokens_per_s": self.tokens_per_second,
            "tflops_per_s": self.flops_per_second / 1e12,
            "tflops_per_s_per_device": self.flops_per_second / 1e12 / self.num_devices,
            "seconds_per_step": self.seconds / self.steps,
        }


class StepTimer:
    """Wall-clock windows of train steps; `pause()` around work that is not training."""

    def __init__(self, tokens_per_step: int, flops_per_step: int, num_devices: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self._start: float | None = None
        self._steps = 0
        self._excluded = 0.0

    def restart(self) -> None:
        """Opens a new window now (call after the step outputs are ready)."""
        self._start = time.perf_counter()
        self._steps = 0
        self._excluded = 0.0

    def count(self, steps: int = 1) -> None:
        self._steps += steps

    def exclude(self, seconds: float) -> None:
        """Removes `seconds` spent on other work (e.g. starting a checkpoint) from the window."""
        self._excluded += seconds

    def read(self) -> Throughput | None:
        """Throughput of the window so far (call after the step outputs are ready); None if empty."""
        if self._start is None or self._steps == 0:
            return None
        seconds = max(time.perf_counter() - self._start - self._excluded, 1e-9)
        return Throughput(self._steps, seconds, self.tokens_per_step, self.flops_per_step,
                          self.num_devices)


class ProgressBar:
    """A tqdm bar over train steps showing the loss and tokens/s; silent unless `enabled`."""

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self._bar = tqdm(total=total, initial=initial, unit="step", disable=not enabled,
                         dynamic_ncols=True, desc="train")

    def update(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def show(self, scalars: Mapping[str, float]) -> None:
        """Shows the loss and the speed next to the bar."""
        shown = {}
        if "loss" in scalars:
            shown["loss"] = f"{scalars['loss']:.4f}"
        if "tokens_per_s" in scalars and math.isfinite(scalars["tokens_per_s"]):
            shown["tok/s"] = f"{scalars['tokens_per_s']:.3g}"
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()
