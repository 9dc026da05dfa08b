"""`hybriddiff demo`: the `--quick` demo end to end in a subprocess (train_runs.py environment: one
CPU device, unoptimised XLA code, the session's compilation cache), its printout, bounds and
figures, a second run that resumes, and the helpers and error paths in process (no compilation)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from matplotlib.image import imread

import train_runs
from hybriddiff import cli, demo, hyperschedules, masks
from hybriddiff.model.sharding import make_mesh
from hybriddiff.training import config as config_lib
from hybriddiff.training import core

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5_000
QUICK_STEPS = 6
QUICK_SAMPLES = 2
PLOTS = sorted([f"{model}_{name}.png" for model in demo.MODELS
                for name in ("hyperschedule", "training_layout", "training_curves",
                             "denoising_trajectory")] + ["bd3lm_mask.png"])
MODEL_LINE = re.compile(r"^(flat|block) hyperschedule \((.+), step (\d+)\):$")
BOUND_LINE = re.compile(r"^  validation bound (\S+) nats/byte = perplexity <= (\S+) "
                        r"\(step 0: (\S+) nats/byte\)$")
SAMPLER_LINE = re.compile(r"^  (ancestral|acs η = 0\.25) \((\d+) network calls, \S+ s\):$")
SAMPLE_LINE = re.compile(r"^    (\d+)\.  (.*)$")


def run_quick_demo(factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The quick demo's workdir and printout, run once per pytest worker (test_cli_plot.py reuses
    it): a subprocess `python -m hybriddiff demo --quick`."""
    base = factory.getbasetemp() / "quick_demo"
    printout = base / "stdout.txt"
    if not printout.is_file():
        done = demo_subprocess(factory, base / "run")
        printout.write_text(done.stdout)
    return base / "run", printout.read_text()


def demo_subprocess(factory: pytest.TempPathFactory, workdir: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "hybriddiff", "demo", "--quick", f"--workdir={workdir}",
         "--noprogress"], env=train_runs.run_env(factory, devices=1), capture_output=True,
        text=True, timeout=300, cwd=train_runs.REPO)
    assert done.returncode == 0, done.stderr[-5000:]
    return done


def parse_report(text: str) -> dict[str, dict]:
    """{model: {workdir, step, bound, perplexity, initial, samplers: {label: (nfe, [texts])}}}."""
    models: dict[str, dict] = {}
    current = sampler = None
    for line in text.splitlines():
        if match := MODEL_LINE.match(line):
            current = models[match[1]] = {"workdir": Path(match[2]), "step": int(match[3]),
                                          "samplers": {}}
        elif match := BOUND_LINE.match(line):
            current.update(bound=float(match[1]), perplexity=float(match[2]),
                           initial=float(match[3]))
        elif match := SAMPLER_LINE.match(line):
            sampler = match[1]
            current["samplers"][sampler] = (int(match[2]), [])
        elif match := SAMPLE_LINE.match(line):
            current["samplers"][sampler][1].append(match[2])
    return models


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return run_quick_demo(tmp_path_factory)


def test_quick_demo_prints_bounds_and_samples_of_both_models(quick: tuple[Path, str]) -> None:
    workdir, text = quick
    models = parse_report(text)
    assert list(models) == ["flat", "block"]
    levels = {"flat": 8, "block": 4}  # --quick sampling levels
    expected_nfe = {"flat": levels["flat"], "block": (128 // 16) * levels["block"]}
    for name, found in models.items():
        assert found["workdir"] == workdir / name and found["step"] == QUICK_STEPS
        valid = train_runs.records(workdir / name, "valid")
        assert math.isfinite(found["bound"]) and found["bound"] > 0
        assert found["bound"] == pytest.approx(valid[QUICK_STEPS]["nll"], abs=5e-4)
        assert found["initial"] == pytest.approx(valid[0]["nll"], abs=5e-4)
        assert found["bound"] < found["initial"]
        assert found["perplexity"] == pytest.approx(math.exp(found["bound"]), rel=2e-3)
        assert list(found["samplers"]) == ["ancestral", "acs η = 0.25"]
        for nfe, texts in found["samplers"].values():
            assert nfe == expected_nfe[name]
            assert len(texts) == QUICK_SAMPLES
            assert all(text.strip() and text.isprintable() for text in texts)
    # The block run starts from the trained flat model (train.init_from): its step-0 bound is
    # the flat parameters' bound under the block layout.
    block_config = json.loads((workdir / "block" / "config.json").read_text())
    assert block_config["train"]["init_from"] == str((workdir / "flat").absolute())


def test_quick_demo_writes_distinct_png_figures(quick: tuple[Path, str]) -> None:
    workdir, text = quick
    plots = workdir / "plots"
    listed = [line.strip() for line in text.splitlines() if line.strip().endswith(".png")]
    assert listed == [str(plots / name) for name in PLOTS]
    images = {}
    for name in PLOTS:
        path = plots / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > MIN_PNG_BYTES, name
        images[name] = imread(path)
        assert images[name].ndim == 3 and images[name].shape[2] == 4
        assert images[name].std() > 0  # not a blank canvas
    for kind in ("hyperschedule", "training_layout", "denoising_trajectory"):
        flat, block = images[f"flat_{kind}.png"], images[f"block_{kind}.png"]
        assert flat.shape != block.shape or not np.array_equal(flat, block), kind


def test_second_run_resumes_without_training(quick: tuple[Path, str],
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir, text = quick
    metrics = {name: (workdir / name / "metrics.jsonl").read_bytes() for name in demo.MODELS}
    again = demo_subprocess(tmp_path_factory, workdir)
    for name in demo.MODELS:
        assert (workdir / name / "metrics.jsonl").read_bytes() == metrics[name]
    first, second = parse_report(text), parse_report(again.stdout)
    for name in demo.MODELS:
        assert second[name]["step"] == QUICK_STEPS
        assert second[name]["bound"] == first[name]["bound"]
        assert second[name]["samplers"] == first[name]["samplers"]  # same seed, same samples


def test_demo_refuses_a_workdir_of_another_run(quick: tuple[Path, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    workdir, _ = quick
    code = cli.run(["hybriddiff", "demo", f"--workdir={workdir}", "--noprogress"])  # not --quick
    err = capsys.readouterr().err
    assert code == 1
    assert f"hybriddiff demo: error: workdir={str(workdir)!r} holds another demo run (flat differs " \
           "in hyperschedule.num_levels, model.cond_dim" in err and "pass another --workdir" in err


# ----------------------------------------------------------------------------------------------
# Helpers and error paths, in process.


def test_demo_configs_validate_and_quick_shrinks_them() -> None:
    for name in demo.MODELS:
        full, small = demo.demo_config(name), demo.demo_config(name, quick=True)
        for config in (full, small):
            config_lib.validate(config, num_devices=8, num_processes=1)
            config_lib.validate(config, num_devices=1, num_processes=1)
            assert (config.process.name, config.loss.kind) == ("epsilon", "hdce")
            assert (config.data.source, config.data.tokenizer, config.data.seq_len) == \
                ("pydoc", "bytes", 128)
        assert full.hyperschedule.kind == small.hyperschedule.kind == name
        assert small.model.num_layers < full.model.num_layers
        assert small.train.num_steps < full.train.num_steps
        assert small.hyperschedule.num_levels < full.hyperschedule.num_levels
    block = demo.demo_config("block")
    assert (block.hyperschedule.width, block.hyperschedule.alignment) == (16, "aligned")
    with pytest.raises(ValueError, match="name must be one of .* got name='slide'"):
        demo.demo_config("slide")


def _setup(name: str, **changes: dict) -> tuple[object, core.Setup]:
    config = config_lib.load_config_file(train_runs.REPO / "configs" / f"{name}.py")
    for group, values in changes.items():
        config[group].update(values)
    config.model.update(num_layers=1, d_model=32, num_heads=2)
    config.data.seq_len = min(config.data.seq_len, 32)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return config, core.build(config, mesh, vocab_size=50)


@pytest.mark.parametrize("name, changes", [
    ("demo_flat", {}),
    ("demo_block", {"hyperschedule": {"width": 8}}),
    ("demo_block", {"hyperschedule": {"width": 8, "alignment": "shifted"}}),
    ("lm1b_ar", {}),
    ("demo_flat", {"hyperschedule": {"alignment": "shifted"}}),
])
def test_config_figures_show_what_the_trainer_and_sampler_use(name: str, changes: dict) -> None:
    config, setup = _setup(name, **changes)
    np.testing.assert_array_equal(demo.config_hyperschedule(config).tau, setup.hyperschedule.tau)
    layout, expected = demo.config_layout(config), setup.objective.static_layout()
    assert (layout.kind, layout.shifted, layout.width) == (expected.kind, expected.shifted,
                                                          expected.width)
    np.testing.assert_array_equal(layout.mask, expected.mask)
    np.testing.assert_array_equal(layout.input_index, expected.input_index)


def test_slide_config_figures() -> None:
    config, setup = _setup("demo_flat", hyperschedule={"kind": "slide", "width": 8,
                                                       "num_levels": 8})
    hs = demo.config_hyperschedule(config)
    np.testing.assert_array_equal(hs.tau, hyperschedules.slide(32, 8, 8).tau)
    np.testing.assert_array_equal(hs.tau, setup.hyperschedule.tau)
    layout = demo.config_layout(config)
    assert (layout.kind, layout.length, layout.width, layout.num_intervals) == ("slide", 32, 8, 4)
    rebuilt = masks.slide_layout(32, 8, tuple(int(s) for s in layout.interval_start))
    np.testing.assert_array_equal(layout.mask, rebuilt.mask)


def test_config_figures_reject_an_unknown_hyperschedule_kind() -> None:
    config = demo.demo_config("flat")
    config.hyperschedule.kind = "spiral"
    with pytest.raises(ValueError, match="hyperschedule.kind='spiral' is not one of"):
        demo.config_hyperschedule(config)
    with pytest.raises(ValueError, match="hyperschedule.kind='spiral' is not one of"):
        demo.config_layout(config)
    with pytest.raises(ValueError, match="hyperschedule.kind='spiral' is not one of"):
        demo.write_config_plots(config, "unused")


def test_printable_text_keeps_one_line_of_printable_characters() -> None:
    text = "def f(x):\n\treturn x\x1b[2J\x00 é"
    shown = demo.printable_text(text)
    assert shown == "def f(x):⏎ return x·[2J· é"
    assert shown.isprintable() and "\n" not in shown


def test_report_of_a_stopped_demo_lists_what_was_done(tmp_path: Path) -> None:
    model = demo.DemoModel(name="flat", workdir=tmp_path / "flat", step=3, bound=2.5,
                           initial_bound=9.0, ema=False)
    result = demo.DemoResult(workdir=tmp_path, quick=False, models=(model,), samples=(),
                             plots=(), preempted=True, seconds=12.0)
    text = demo.format_report(result)
    assert parse_report(text) == {"flat": {"workdir": tmp_path / "flat", "step": 3, "samplers": {},
                                           "bound": 2.5, "perplexity": pytest.approx(math.exp(2.5),
                                                                                     rel=1e-3),
                                           "initial": 9.0}}
    assert "stopped by a signal while training: run the same command again to resume" in text
    assert "plots" not in text and "block" not in text


def test_run_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got num_samples=0"):
        demo.run_demo(tmp_path, quick=True, num_samples=0)
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\], got eta=1.5"):
        demo.run_demo(tmp_path, quick=True, eta=1.5)


@pytest.mark.parametrize("args, status, message", [
    (("demo", "--config={config}"), 2, "demo takes no --config"),
    (("demo", "--output={tmp}"), 1, "hybriddiff demo: error: demo takes no --output"),
    (("demo", "--quick=maybe"), 2, "flag --quick=maybe"),
])
def test_demo_command_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                  args: tuple[str, ...], status: int, message: str) -> None:
    config = train_runs.REPO / "configs" / "demo_flat.py"
    filled = [a.format(config=config, tmp=tmp_path) for a in args]
    assert cli.run(["hybriddiff", *filled, f"--workdir={tmp_path}"]) == status
    assert message in capsys.readouterr().err


def test_help_lists_demo_and_plot(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.run(["hybriddiff", "--help"])
    text = capsys.readouterr().out
    for word in ("demo [--workdir", "plot (--config", "--quick", "workdirs/demo_quick"):
        assert word in text, word
