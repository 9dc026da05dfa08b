"""`hybriddiff demo` and `hybriddiff plot`: train, sample and draw small runs on a CPU.

The demo (:func:`run_demo`) trains two small ε-hybrid models (HDCE, seed 000 Eq. 8-9) on the
Python language reference that ships with CPython (``pydoc_data.topics``: no download), one per
hyperschedule:

* ``flat`` (``configs/demo_flat.py``): every position at the same noise level (seed 000 Fig. 2b);
* ``block`` (``configs/demo_block.py``): ω = 16, ALIGNED, efficient BD3-LM training (Fig. 2c),
  started from the trained flat model (``train.init_from``, the paper's second stage).

Both train in ``<workdir>/<name>`` with the ordinary train loop (a run that is already trained or
was interrupted resumes from its checkpoint). Each model then samples with the MDLM ancestral
sampler and with ACS (seed 000 §3.4, intensity η); the validation bound is the negative ELBO the
train loop logs at its last step. The figures go to ``<workdir>/plots``: both hyperschedules
(Fig. 2), both training layouts (Fig. 8 / the BD3-LM 2L mask) and the BD3-LM mask of its paper's
appendix (L = 6, ω = 2), the training curves, and the denoising trajectory of one sample of each.

:func:`write_config_plots` and :func:`write_run_plots` are what ``hybriddiff plot`` writes for a
config file or a trained run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from hybriddiff import hyperschedules, masks, plotting
from hybriddiff.data import Tokenizer
from hybriddiff.training import config as config_lib

__all__ = [
    "ACS_ETA",
    "DEFAULT_WORKDIR",
    "MODELS",
    "QUICK_WORKDIR",
    "SAMPLERS",
    "DemoModel",
    "DemoResult",
    "DemoSamples",
    "config_hyperschedule",
    "config_layout",
    "demo_config",
    "format_report",
    "printable_text",
    "run_demo",
    "write_config_plots",
    "write_run_plots",
]

_log = logging.getLogger(__name__)

MODELS = ("flat", "block")
SAMPLERS = ("ancestral", "acs")
ACS_ETA = 0.25  # seed 000 Table 10: the η with the best generative perplexity of ε-hybrid blocks
DEFAULT_WORKDIR = "workdirs/demo"
QUICK_WORKDIR = "workdirs/demo_quick"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PLOTS_SUBDIR = "plots"

# `--quick`: the same two runs shrunk until compilation dominates (tests and smoke checks).
_QUICK_MODEL = dict(num_layers=1, d_model=64, num_heads=2, cond_dim=32, frequency_embedding_size=32)
_QUICK_TRAIN = dict(batch_size=8, num_steps=6, warmup_steps=1, log_every=3, eval_every=6,
                    eval_batches=1, checkpoint_every=6)
_QUICK_LEVELS = {"flat": 8, "block": 4}
_NUM_SAMPLES = {False: 4, True: 2}
# Settings that may differ between two invocations on the same run directory.
_PATH_KEYS = (("train", "init_from"),)


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """One trained demo model.

    ``bound``: the validation negative ELBO in nats per token (one byte each with the byte
    tokenizer; the BOS / EOS of the rows count as tokens) at ``step``, of the parameters that
    were sampled (the EMA when ``ema``); ``initial_bound``: the same at step 0 (the untrained
    network, or the flat model for ``block``).
    """

    name: str
    workdir: Path
    step: int
    bound: float
    initial_bound: float
    ema: bool

    @property
    def perplexity(self) -> float:
        """The perplexity bound ``exp(bound)``."""
        return math.exp(min(self.bound, 700.0))


@dataclasses.dataclass(frozen=True)
class DemoSamples:
    """Samples of one model with one sampler: decoded ``texts`` (one row each, see
    :func:`printable_text`), the network calls ``nfe`` and the wall ``seconds`` of the call
    (compilation included)."""

    model: str
    sampler: str
    eta: float
    texts: tuple[str, ...]
    nfe: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` did; ``preempted``: stopped by SIGTERM while training (the models,
    samples and plots after that point are missing; running the demo again resumes)."""

    workdir: Path
    quick: bool
    models: tuple[DemoModel, ...]
    samples: tuple[DemoSamples, ...]
    plots: tuple[Path, ...]
    preempted: bool
    seconds: float


# ----------------------------------------------------------------------------------------------
# Configs and their figures.


def demo_config(name: str, *, quick: bool = False) -> ml_collections.ConfigDict:
    """``configs/demo_<name>.py`` (``name`` in :data:`MODELS`); ``quick`` shrinks the model, the
    number of steps and the sampling levels so the whole demo takes well under a minute."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got name={name!r}")
    path = CONFIG_DIR / f"demo_{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: the demo runs from a source checkout "
                                "(pip install -e .)")
    config = config_lib.load_config_file(path)
    if quick:
        config.model.update(_QUICK_MODEL)
        config.train.update(_QUICK_TRAIN)
        config.hyperschedule.num_levels = _QUICK_LEVELS[name]
    return config


def config_hyperschedule(config: ml_collections.ConfigDict) -> hyperschedules.Hyperschedule:
    """The hyperschedule a run of ``config`` samples with (``hyperschedule.kind`` over
    ``data.seq_len`` positions with ``hyperschedule.num_levels`` levels; the same as
    ``training.core.objective_hyperschedule`` of the built run)."""
    hs, length = config.hyperschedule, int(config.data.seq_len)
    if hs.kind == "flat":
        return hyperschedules.flat(length, hs.num_levels)
    if hs.kind == "block":
        return hyperschedules.block(length, hs.width, hs.num_levels)
    if hs.kind == "slide":
        return hyperschedules.slide(length, hs.width, hs.num_levels)
    if hs.kind == "quench":
        return hyperschedules.quench(length)
    raise ValueError(f"hyperschedule.kind={hs.kind!r} is not one of "
                     f"{config_lib.HYPERSCHEDULE_KINDS}")


def config_layout(config: ml_collections.ConfigDict) -> masks.TrainingLayout:
    """The efficient-training layout of ``config`` (the one its train step uses; for ``slide``
    the windows of a step are random, and these are drawn from ``train.seed``)."""
    from hybriddiff.training import objective as objective_lib

    hs, length = config.hyperschedule, int(config.data.seq_len)
    shifted = hs.alignment == "shifted"
    if hs.kind == "flat":
        return objective_lib.flat_layout(length, shifted)
    if hs.kind == "block":
        return masks.block_layout(length, hs.width, shifted)
    if hs.kind == "slide":
        rng = np.random.default_rng(int(config.train.seed))
        starts = masks.draw_slide_starts(length, hs.width, rng, shifted, hs.num_intervals or None)
        return masks.slide_layout(length, hs.width, starts, shifted)
    if hs.kind == "quench":
        return objective_lib.causal_layout(length)
    raise ValueError(f"hyperschedule.kind={hs.kind!r} is not one of "
                     f"{config_lib.HYPERSCHEDULE_KINDS}")


def _validate_for_plots(config: ml_collections.ConfigDict) -> None:
    """``config_lib.validate`` on the devices its mesh names (a plot needs no accelerator)."""
    shape = config.get("mesh", {}).get("shape", ())
    fixed = [s for s in shape if isinstance(s, int) and not isinstance(s, bool) and s > 0]
    config_lib.validate(config, num_devices=math.prod(fixed), num_processes=1)


def _title(config: ml_collections.ConfigDict) -> str:
    hs = config.hyperschedule
    width = f" ω = {hs.width}" if hs.kind in ("block", "slide") else ""
    return f"{config.process.name} / {config.loss.kind}, {hs.kind}{width}, {hs.alignment}"


def write_config_plots(config: ml_collections.ConfigDict, directory: str | Path, *,
                       prefix: str = "") -> list[Path]:
    """Writes ``<prefix>hyperschedule.png`` (seed 000 Fig. 2) and ``<prefix>training_layout.png``
    (Fig. 7-10; the BD3-LM 2L mask for ALIGNED blocks) of a validated ``config``."""
    _validate_for_plots(config)
    directory = Path(directory)
    title = _title(config)
    return [
        plotting.save_png(plotting.plot_hyperschedule(config_hyperschedule(config), title=title),
                          directory / f"{prefix}hyperschedule.png"),
        plotting.save_png(plotting.plot_training_layout(config_layout(config), title=title),
                          directory / f"{prefix}training_layout.png"),
    ]


def _token_label(tokenizer: Tokenizer, token: int) -> str:
    """A short cell label of one token for the trajectory figure (no mathtext)."""
    names = {tokenizer.bos_id: "BOS", tokenizer.eos_id: "EOS", tokenizer.pad_id: "PAD"}
    if token in names:
        return names[token]
    return printable_text(tokenizer.decode([token])).replace("$", r"\$")


def _write_trajectory(states: np.ndarray, tokenizer: Tokenizer, mask_id: int, path: Path,
                      title: str) -> Path:
    """The denoising trajectory ``states [T + 1, L]``, tokens written in when they fit."""
    states = np.asarray(states)
    fits = states.size <= 64 * 64
    figure = plotting.plot_denoising_trajectory(
        states, mask_id, token_text=(lambda t: _token_label(tokenizer, t)) if fits else None,
        title=title)
    return plotting.save_png(figure, path)


def write_run_plots(workdir: str | Path, directory: str | Path | None = None, *,
                    sampler: str | None = None, seed: int = 0) -> list[Path]:
    """The figures of a trained run into ``directory`` (default ``<workdir>/plots``): those of its
    config (:func:`write_config_plots`), ``training_curves.png`` from its ``metrics.jsonl`` and
    ``denoising_trajectory.png`` of one fresh sample (``sampler``: default ``analytic`` for score
    models, else ``ancestral``)."""
    from hybriddiff.sampling.drive import restore_run, reverse_step, sample

    workdir = Path(workdir)
    directory = workdir / PLOTS_SUBDIR if directory is None else Path(directory)
    run = restore_run(workdir)
    paths = write_config_plots(run.config, directory)
    curves = plotting.plot_training_curves(workdir, title=f"{workdir.name}: {_title(run.config)}")
    paths.append(plotting.save_png(curves, directory / "training_curves.png"))
    if sampler is None:
        sampler = "analytic" if run.setup.objective.loss_kind == "dwdse" else "ancestral"
    result = sample(run, reverse_step(run.setup, sampler), jax.random.key(seed), num_samples=1,
                    return_trajectory=True)
    paths.append(_write_trajectory(
        np.asarray(result.trajectory)[:, 0], run.tokenizer, run.setup.objective.mask_id,
        directory / "denoising_trajectory.png",
        f"{sampler} sampler, {run.config.hyperschedule.kind}, step {run.step}"))
    return paths


# ----------------------------------------------------------------------------------------------
# The demo.


def printable_text(text: str) -> str:
    """``text`` on one line: newlines as ``⏎``, tabs as spaces, other unprintable characters as
    ``·`` (a sample of a byte model may hold terminal control bytes)."""
    shown = text.replace("\n", "⏎").replace("\t", " ")
    return "".join(c if c.isprintable() else "·" for c in shown)


def _sample_text(tokenizer: Tokenizer, row: np.ndarray) -> str:
    """One generated row as printable text; the documents it holds are separated by ``<eos>``."""
    row = np.asarray(row)
    ends = np.flatnonzero(row == tokenizer.eos_id)
    pieces = np.split(row, ends)
    return " <eos> ".join(printable_text(tokenizer.decode(piece)) for piece in pieces)


def _check_same_run(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """A demo run directory may only be resumed with the config that created it."""
    from hybriddiff.training.loop import CONFIG_FILE

    path = workdir / CONFIG_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    wanted = json.loads(config.to_json_best_effort())
    for group, key in _PATH_KEYS:
        saved.get(group, {}).pop(key, None)
        wanted.get(group, {}).pop(key, None)
    differ = sorted(f"{group}.{key}" for group in wanted for key in wanted[group]
                    if saved.get(group, {}).get(key) != wanted[group][key])
    if differ:
        raise ValueError(f"workdir={str(workdir.parent)!r} holds another demo run ({workdir.name}"
                         f" differs in {', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}"
                         "): pass another --workdir")


def _logged_bound(workdir: Path, step: int, key: str) -> float:
    """The validation bound ``key`` the train loop wrote to ``metrics.jsonl`` at ``step``."""
    records = [r for r in plotting.read_metrics_records(workdir)
               if r["split"] == "valid" and r["step"] == step and key in r]
    if not records:
        raise ValueError(f"{str(workdir / plotting.METRICS_FILE)!r} has no validation {key!r} at "
                         f"step {step}")
    return float(records[-1][key])


def _train(name: str, config: ml_collections.ConfigDict, workdir: Path, progress: bool
           ) -> DemoModel | None:
    """Trains (or resumes) one demo model; None when a signal stopped it."""
    from hybriddiff.training.loop import train

    _check_same_run(config, workdir)
    _log.info("demo: training the %s model in %s (%d steps)", name, workdir, config.train.num_steps)
    result = train(config, workdir, progress=progress)
    if result.preempted:
        return None
    ema = float(config.train.ema_decay) > 0
    key = "nll_ema" if ema else "nll"
    return DemoModel(name=name, workdir=workdir, step=result.step,
                     bound=_logged_bound(workdir, result.step, key),
                     initial_bound=_logged_bound(workdir, 0, key), ema=ema)


def _sample(model: DemoModel, *, num_samples: int, eta: float, seed: int, plots: Path,
            paths: list[Path]) -> list[DemoSamples]:
    """Both samplers on one model; the first ancestral sample's trajectory is drawn."""
    from hybriddiff.sampling.drive import restore_run, reverse_step, sample

    run = restore_run(model.workdir)
    key = jax.random.fold_in(jax.random.key(seed), MODELS.index(model.name))
    found = []
    for index, sampler in enumerate(SAMPLERS):
        step = reverse_step(run.setup, sampler, eta=eta)
        trajectory = sampler == "ancestral"
        result = sample(run, step, jax.random.fold_in(key, index), num_samples=num_samples,
                        return_trajectory=trajectory)
        tokens = np.asarray(jax.device_get(result.tokens))
        found.append(DemoSamples(model=model.name, sampler=sampler,
                                 eta=eta if sampler == "acs" else 0.0,
                                 texts=tuple(_sample_text(run.tokenizer, row) for row in tokens),
                                 nfe=int(result.nfe), seconds=float(result.seconds)))
        if trajectory:
            paths.append(_write_trajectory(
                np.asarray(result.trajectory)[:, 0], run.tokenizer, run.setup.objective.mask_id,
                plots / f"{model.name}_denoising_trajectory.png",
                f"{model.name} model, ancestral sampler"))
    return found


def run_demo(workdir: str | Path | None = None, *, quick: bool = False, progress: bool = True,
             num_samples: int | None = None, eta: float = ACS_ETA, seed: int = 0) -> DemoResult:
    """Trains the flat and block demo models, samples both with both samplers and writes the
    figures (module docstring).

    Args:
      workdir: run directory (default :data:`DEFAULT_WORKDIR`, :data:`QUICK_WORKDIR` with
        ``quick``); the models train in ``<workdir>/flat`` and ``<workdir>/block``.
      quick: the shrunk settings of :func:`demo_config`.
      progress: show the progress bars of training.
      num_samples: samples per (model, sampler); default 4 (2 with ``quick``).
      eta: the ACS correction intensity η in [0, 1].
      seed: sampling seed.
    Raises ValueError when a run directory holds a run of another config.
    """
    started = time.perf_counter()
    workdir = Path((QUICK_WORKDIR if quick else DEFAULT_WORKDIR) if workdir is None else workdir)
    if num_samples is None:
        num_samples = _NUM_SAMPLES[bool(quick)]
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got num_samples={num_samples!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got eta={eta!r}")
    configs = {name: demo_config(name, quick=quick) for name in MODELS}
    configs["block"].train.init_from = str((workdir / "flat").absolute())
    models: list[DemoModel] = []
    for name in MODELS:
        model = _train(name, configs[name], workdir / name, progress)
        if model is None:
            return DemoResult(workdir=workdir, quick=quick, models=tuple(models), samples=(),
                              plots=(), preempted=True, seconds=time.perf_counter() - started)
        models.append(model)

    plots = workdir / PLOTS_SUBDIR
    paths: list[Path] = []
    samples: list[DemoSamples] = []
    for model in models:
        _log.info("demo: sampling the %s model", model.name)
        samples += _sample(model, num_samples=num_samples, eta=eta, seed=seed, plots=plots,
                           paths=paths)
    _log.info("demo: writing the figures to %s", plots)
    for model in models:
        paths += write_config_plots(configs[model.name], plots, prefix=f"{model.name}_")
        curves = plotting.plot_training_curves(model.workdir, title=f"{model.name} model")
        paths.append(plotting.save_png(curves, plots / f"{model.name}_training_curves.png"))
    bd3 = plotting.plot_training_layout(masks.block_layout(6, 2), title="BD3-LM")
    paths.append(plotting.save_png(bd3, plots / "bd3lm_mask.png"))
    return DemoResult(workdir=workdir, quick=quick, models=tuple(models), samples=tuple(samples),
                      plots=tuple(sorted(paths)), preempted=False,
                      seconds=time.perf_counter() - started)


def _wrap(text: str, width: int, indent: str) -> list[str]:
    return [indent + text[i:i + width] for i in range(0, max(len(text), 1), width)]


def format_report(result: DemoResult, width: int = 96) -> str:
    """The demo's printout: per model its bound and samples, then the figures written."""
    lines = [f"hybriddiff demo{' --quick' if result.quick else ''}: ε-hybrid models on "
             "pydoc_data.topics (bytes, 128 per row) in " + str(result.workdir)]
    for model in result.models:
        lines += ["", f"{model.name} hyperschedule ({model.workdir}, step {model.step}"
                      f"{', EMA' if model.ema else ''}):",
                  f"  validation bound {model.bound:.3f} nats/byte = perplexity <= "
                  f"{model.perplexity:.4g} (step 0: {model.initial_bound:.3f} nats/byte)"]
        for samples in (s for s in result.samples if s.model == model.name):
            label = samples.sampler + (f" η = {samples.eta:g}" if samples.sampler == "acs" else "")
            lines.append(f"  {label} ({samples.nfe} network calls, {samples.seconds:.1f} s):")
            for number, text in enumerate(samples.texts, start=1):
                wrapped = _wrap(text, width - 8, "        ")
                lines += [f"    {number}.  {wrapped[0].lstrip()}", *wrapped[1:]]
    if result.preempted:
        lines += ["", "stopped by a signal while training: run the same command again to resume"]
    if result.plots:
        lines += ["", f"plots ({len(result.plots)}):", *(f"  {path}" for path in result.plots)]
    lines += ["", f"finished in {result.seconds:.0f} s"]
    return "\n".join(lines)

