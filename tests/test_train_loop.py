"""Tests for hybriddiff.training.loop and .metrics: training through the CLI on the embedded corpus
and on Shakespeare, keep-N / keep-every-K checkpoints, exact resume after SIGKILL, a checkpoint on
SIGTERM, skipping a truncated checkpoint, stage-2 initialisation, and the metric files."""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import train_runs as tr
from hybriddiff.training.metrics import MetricsWriter, Throughput, mean_scalars, read_metrics

NUM_STEPS = 12
# Checkpoints at 4, 8, 12; keep the newest one and every multiple of 8; evaluate at 0, 6, 12.
REFERENCE_ARGS = (f"--config.train.num_steps={NUM_STEPS}", "--config.train.checkpoint_every=4",
                  "--config.train.keep_checkpoints=1", "--config.train.keep_period=8",
                  "--config.train.eval_every=6")
BOUND_MARGIN = 1.0  # nats per token the validation bound must fall by


def read_events(directory: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TensorBoard event files under `directory`, parsed
    from the TFRecord framing (length, crc, payload, crc) without TensorBoard's reader."""
    from tensorboardX.proto import event_pb2

    scalars = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            scalars.extend((v.tag, event.step, v.simple_value) for v in event.summary.value)
    return scalars


def test_metrics_writer_jsonl_tensorboard_and_resume(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.write(step, "train", {"loss": 1.0 / step})
        writer.write(3, "valid", {"nll": 2.5})
    with MetricsWriter(tmp_path, resume_step=2) as writer:  # steps after 2 are trained again
        writer.write(3, "train", {"loss": 0.25})
    assert read_metrics(tmp_path) == [{"step": 1, "split": "train", "loss": 1.0},
                                      {"step": 2, "split": "train", "loss": 0.5},
                                      {"step": 3, "split": "train", "loss": 0.25}]
    events = read_events(tmp_path / "tb")
    assert {("train/loss", 2, 0.5), ("valid/nll", 3, 2.5), ("train/loss", 3, 0.25)} <= set(events)


def test_metrics_writer_disabled_and_errors(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "quiet", enabled=False) as writer:
        writer.write(1, "train", {"loss": 1.0})
    assert not (tmp_path / "quiet").exists()
    with MetricsWriter(tmp_path) as writer, pytest.raises(ValueError, match="split must be one of"):
        writer.write(1, "test", {"loss": 1.0})
    with pytest.raises(ValueError, match="resume_step must be None or >= 0; got -1"):
        MetricsWriter(tmp_path, resume_step=-1)


def test_throughput_and_mean_scalars() -> None:
    speed = Throughput(steps=4, seconds=2.0, tokens_per_step=1000, flops_per_step=3 * 10**12,
                       num_devices=2)
    assert speed.scalars() == {"tokens_per_s": 2000.0, "tflops_per_s": 6.0,
                               "tflops_per_s_per_device": 3.0, "seconds_per_step": 0.5}
    history = [{"loss": jnp.float32(1.0), "n": 1}, {"loss": jnp.float32(2.0), "n": 3}]
    assert mean_scalars(history) == {"loss": 1.5, "n": 2.0}
    assert mean_scalars([]) == {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of NUM_STEPS steps on the embedded corpus."""
    workdir = tmp_path_factory.mktemp("reference")
    tr.train(tmp_path_factory, workdir, *REFERENCE_ARGS)
    return workdir


def assert_learns(workdir: Path) -> None:
    """The training loss falls and the validation bound at the end is below the one at step 0."""
    train = tr.records(workdir, "train")
    valid = tr.records(workdir, "valid")
    assert sorted(train) == list(range(1, NUM_STEPS + 1))
    losses = [train[s]["loss"] for s in sorted(train)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    assert sorted(valid) == [0, NUM_STEPS // 2, NUM_STEPS]
    assert valid[NUM_STEPS]["nll"] < valid[0]["nll"] - BOUND_MARGIN, valid
    assert valid[NUM_STEPS]["bits_per_token"] == pytest.approx(valid[NUM_STEPS]["nll"] / np.log(2))


def test_demo_trains_and_writes_its_workdir(reference: Path) -> None:
    assert_learns(reference)
    assert tr.checkpoint_steps(reference) == [8, 12]  # keep-N = 1 plus every multiple of 8
    config = json.loads((reference / "config.json").read_text())
    assert config["train"]["num_steps"] == NUM_STEPS and config["model"]["num_layers"] == 1
    assert (reference / "data" / "train" / "manifest.json").is_file()
    train = tr.records(reference, "train")
    speed = [train[s]["tokens_per_s"] for s in range(2, NUM_STEPS + 1)]  # step 1 compiles: not timed
    assert "tokens_per_s" not in train[1] and min(speed) > 0 and train[2]["tflops_per_s"] > 0
    tags = {(tag, step) for tag, step, _ in read_events(reference / "tb")}
    assert ("train/loss", NUM_STEPS) in tags and ("valid/nll", 0) in tags
    state = tr.read_state(reference, NUM_STEPS)
    assert int(state["['step']"]) == NUM_STEPS


def test_sigkill_and_sigterm_then_resume_is_bit_identical(
    reference: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("interrupted")
    # 1. Killed without warning once a checkpoint exists.
    proc = tr.start(tmp_path_factory, workdir, *REFERENCE_ARGS)
    tr.read_until_step(proc, lambda step: step >= 6 and 4 in tr.checkpoint_steps(workdir))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # 2. Resumed, then preempted: SIGTERM saves the current step and exits with status 0.
    proc = tr.start(tmp_path_factory, workdir, *REFERENCE_ARGS)
    resumed = tr.checkpoint_steps(workdir)[-1]
    _, lines = tr.read_until_step(proc, lambda step: step > resumed)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-5000:]
    assert f"resumed from the checkpoint at step {resumed}" in log
    stopped = int(log.split("preempted: saved the checkpoint of step ")[1].split(";")[0])
    assert resumed < stopped < NUM_STEPS
    assert tr.checkpoint_steps(workdir)[-1] == stopped
    # 3. Resumed to the end: the same state, bit for bit, as the uninterrupted run.
    done = tr.train(tmp_path_factory, workdir, *REFERENCE_ARGS)
    assert f"resumed from the checkpoint at step {stopped}" in done.stderr
    tr.assert_states_equal(tr.read_state(workdir, NUM_STEPS), tr.read_state(reference, NUM_STEPS))
    # The metric log reads as one run: every train step once, the same final bound.
    assert sorted(tr.records(workdir, "train")) == list(range(1, NUM_STEPS + 1))
    assert tr.records(workdir, "valid")[NUM_STEPS] == tr.records(reference, "valid")[NUM_STEPS]


def test_truncated_checkpoint_is_skipped_for_the_previous_one(
    reference: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("truncated")
    shutil.copytree(reference, workdir, dirs_exist_ok=True)
    for path in (workdir / "checkpoints" / str(NUM_STEPS) / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            with open(path, "r+b") as handle:
                handle.truncate(path.stat().st_size // 2)
    done = tr.train(tmp_path_factory, workdir, *REFERENCE_ARGS)
    assert f"skipping checkpoint at step {NUM_STEPS}" in done.stderr
    assert "resumed from the checkpoint at step 8" in done.stderr
    assert (workdir / "corrupt_checkpoints" / str(NUM_STEPS)).is_dir()
    tr.assert_states_equal(tr.read_state(workdir, NUM_STEPS), tr.read_state(reference, NUM_STEPS))


def test_init_from_starts_with_the_other_runs_parameters(
    reference: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("stage2")
    tr.train(tmp_path_factory, workdir, "--config.train.num_steps=2", "--config.train.eval_every=6",
             f"--config.train.init_from={reference}")
    start = tr.records(workdir, "valid")[0]  # the same parameters on the same batches and keys
    end_of_reference = tr.records(reference, "valid")[NUM_STEPS]
    assert start["nll"] == end_of_reference["nll"]
    assert int(tr.read_state(workdir, 2)["['step']"]) == 2  # the optimizer and step start afresh


def error_line(stderr: str) -> str:
    """The command's error line (log lines of background checkpoint threads may share its line)."""
    found = re.search(r"hybriddiff train: error: .*", stderr)
    assert found, stderr[-3000:]
    return found.group(0)


@pytest.mark.parametrize("args, message", [
    ((), r"no checkpoint found in .*/nowhere/checkpoints"),
    (("--config.model.num_layers=2",),
     r"no value for 20 of the 58 arrays asked for, e\.g\. \['ema'\]\['blocks'\]\[1\].*written by "
     r"a different model"),  # 10 arrays per block, in the parameters and the EMA
    (("--config.model.d_model=64",),
     r"holds 30 of the 38 arrays asked for with other shapes, e\.g\. \['ema'\]\['blocks'\]\[0\]"
     r"\['attention_out'\]\.value \(4, 16, 64\) saved as \(4, 32, 128\)"),
])
def test_init_from_errors_name_the_source_and_the_arrays(
        reference: Path, tmp_path_factory: pytest.TempPathFactory, args: tuple[str, ...],
        message: str) -> None:
    """A stage-2 source without checkpoints, or a stage-2 model with arrays the source run never
    saved (here a second layer) or of other shapes, stops before training with the source and
    the offending arrays named."""
    workdir = tmp_path_factory.mktemp("mismatch")
    source = reference.parent / "nowhere" if not args else reference
    done = subprocess.run(tr.command(workdir, "--config.train.num_steps=2",
                                     f"--config.train.init_from={source}", *args),
                          env=tr.run_env(tmp_path_factory), capture_output=True, text=True,
                          timeout=300, cwd=tr.REPO)
    assert done.returncode == 1, done.stderr[-3000:]
    line = error_line(done.stderr)
    assert f"train.init_from='{source}': cannot load its parameters" in line
    assert re.search(message, line), line
    saved = (workdir / "checkpoints").glob("*") if (workdir / "checkpoints").exists() else []
    assert not [path.name for path in saved if path.name.isdigit()]  # no step was trained


def test_a_diverging_run_stops_with_a_message_and_keeps_its_checkpoints(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A non-finite training loss ends `hybriddiff train` with exit status 1 and one error line
    naming the step and the keys to change; the checkpoint written before it stays readable."""
    workdir = tmp_path_factory.mktemp("diverging")
    done = subprocess.run(tr.command(workdir, "--config.train.num_steps=8",
                                     "--config.train.checkpoint_every=1",
                                     "--config.train.learning_rate=1e35"),
                          env=tr.run_env(tmp_path_factory), capture_output=True, text=True,
                          timeout=300, cwd=tr.REPO)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = error_line(done.stderr)
    found = re.search(r"the training loss is (nan|inf) at step (\d+) .*train\.learning_rate", line)
    assert found, line
    diverged = int(found.group(2))
    kept = sorted(int(path.name) for path in (workdir / "checkpoints").iterdir()
                  if path.name.isdigit())
    assert kept and max(kept) < diverged
    assert int(tr.read_state(workdir, max(kept))["['step']"]) == max(kept)


@pytest.mark.skipif(not tr.SHAKESPEARE.is_dir(), reason="shared/data/shakespeare is not beside the repo")
def test_trains_on_a_local_text_directory(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("shakespeare")
    tr.train(tmp_path_factory, workdir, *REFERENCE_ARGS, f"--config.data.path={tr.SHAKESPEARE}/")
    assert_learns(workdir)
    train_documents = json.loads((workdir / "data" / "train" / "manifest.json").read_text())["num_documents"]
    valid_documents = json.loads((workdir / "data" / "validation" / "manifest.json").read_text())["num_documents"]
    assert train_documents + valid_documents == len(list(tr.SHAKESPEARE.glob("*.txt")))


def test_url_workdir_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from hybriddiff.training.config import load_config_file
    from hybriddiff.training.loop import train

    config = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    with pytest.raises(ValueError, match="workdir='gs://bucket/run' is a URL"):
        train(config, "gs://bucket/run")
    assert not Path("gs:").exists()
