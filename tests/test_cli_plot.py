"""`hybriddiff plot`: the figures of a config file (in process, no compilation), of a trained run
(the runs of the quick demo, `test_demo.run_quick_demo`, sampled in process) and the command's
error paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import train_runs
from hybriddiff import cli
from test_demo import MIN_PNG_BYTES, PNG_SIGNATURE, run_quick_demo

CONFIGS = train_runs.REPO / "configs"
CONFIG_FIGURES = ("hyperschedule.png", "training_layout.png")
RUN_FIGURES = CONFIG_FIGURES + ("training_curves.png", "denoising_trajectory.png")


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_quick_demo(tmp_path_factory)[0]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.run(["hybriddiff", "plot", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > MIN_PNG_BYTES, path
    image = imread(path)
    assert image.ndim == 3 and image.std() > 0, path
    return image


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape != b.shape or not np.array_equal(a, b)


def test_config_figures_differ_between_hyperschedules(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    cases = {
        "flat": (f"--config={CONFIGS / 'demo_flat.py'}",),
        "block": (f"--config={CONFIGS / 'demo_block.py'}",),
        "slide": (f"--config={CONFIGS / 'demo_block.py'}", "--config.hyperschedule.kind=slide"),
        "ar": (f"--config={CONFIGS / 'lm1b_ar.py'}",),
    }
    images = {}
    for name, args in cases.items():
        output = tmp_path / name
        code, out, err = run(capsys, *args, f"--output={output}")
        assert code == 0, err
        assert out.splitlines() == [str(output / figure) for figure in CONFIG_FIGURES]
        images[name] = [read_png(output / figure) for figure in CONFIG_FIGURES]
    names = list(images)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            for a, b in zip(images[first], images[second]):
                assert differ(a, b), (first, second)


def test_workdir_figures_into_the_run(demo_workdir: Path, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    workdir = demo_workdir / "block"
    code, out, err = run(capsys, f"--workdir={workdir}")
    assert code == 0, err
    assert out.splitlines() == [str(workdir / "plots" / figure) for figure in RUN_FIGURES]
    images = {figure: read_png(workdir / "plots" / figure) for figure in RUN_FIGURES}
    # The run's config figures are those of its config file with the run's overrides (the quick
    # demo samples with 4 levels), and the ones the demo drew.
    code, _, err = run(capsys, f"--config={CONFIGS / 'demo_block.py'}",
                       "--config.hyperschedule.num_levels=4", f"--output={tmp_path}")
    assert code == 0, err
    for figure in CONFIG_FIGURES:
        np.testing.assert_array_equal(read_png(tmp_path / figure), images[figure])
        np.testing.assert_array_equal(read_png(demo_workdir / "plots" / f"block_{figure}"),
                                      images[figure])


def test_workdir_figures_into_output(demo_workdir: Path, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    output = tmp_path / "figures"
    code, out, err = run(capsys, f"--workdir={demo_workdir / 'flat'}", f"--output={output}")
    assert code == 0, err
    assert out.splitlines() == [str(output / figure) for figure in RUN_FIGURES]
    images = [read_png(output / figure) for figure in RUN_FIGURES]
    for figure, image in zip(CONFIG_FIGURES, images):
        np.testing.assert_array_equal(read_png(demo_workdir / "plots" / f"flat_{figure}"), image)
        assert differ(read_png(demo_workdir / "plots" / f"block_{figure}"), image)


@pytest.mark.parametrize("args, status, message", [
    ((), 1, "plot needs --config=configs/x.py with --output=DIR, or --workdir=DIR"),
    (("--config={config}",), 1, "plot --config needs --output=DIR"),
    (("--config={config}", "--workdir={tmp}"), 1, "plot takes --config or --workdir, not both"),
    (("--workdir={tmp}/missing",), 1, "/missing' does not exist"),
    (("--workdir={tmp}",), 1, "has no config.json: not a training run"),
    (("--config={config}", "--output={tmp}", "--config.hyperschedule.kind=block",
      "--config.hyperschedule.width=5"), 1, "hyperschedule.width=5 does not divide data.seq_len=128"),
    (("--config=missing.py", "--output={tmp}"), 2, "cannot load --config='missing.py'"),
])
def test_plot_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...],
                     status: int, message: str) -> None:
    filled = [a.format(config=CONFIGS / "demo_flat.py", tmp=tmp_path) for a in args]
    code, out, err = run(capsys, *filled)
    assert code == status
    assert message in err, err
    assert out == "" and not list(tmp_path.glob("*.png"))
    if status == 1:
        assert "hybriddiff plot: error:" in err
