"""The `hybriddiff` command: `hybriddiff <command> --config=configs/x.py [--config.key=value ...]`.

Commands:

- `train --workdir=W`: trains, or resumes from the newest checkpoint in `W` (see
  `hybriddiff.training.loop.train`); SIGTERM saves a checkpoint and exits with status 0.
- `prepare (--workdir=W | --output=DIR)`: tokenizes the configured data once, into `DIR`, or into
  `data.prepared_dir` / `W/data` where `train` looks for it.
- `sample --workdir=W [--num_samples --batch_size --sampler --steps --precision --temperature
  --seed --eta --prompt=TEXT --infill=POS:TEXT ... --max_length=N --ema|--noema
  --output=FILE.jsonl]`: generates from the newest checkpoint of a run (EMA parameters when it
  keeps an EMA) with the driver of its hyperschedule, drawing tokens in float64 unless
  `--precision=float32`; one JSON line per sample (default `W/samples.jsonl`). Needs no
  --config: the run's `config.json` is used.
- `eval --workdir=W [--split --num_batches --data_source=S --data_path=P --data_dir=D --gen_ppl
  --entropy --judge_workdir=J | --judge_hf=DIR --mauve_featurizer=DIR --output=FILE.json and the
  sampling flags]`: the negative-ELBO bound on a split of the run's data, or zero-shot on another
  source; optionally the generative perplexity of fresh samples under a judge, their unigram
  entropy and MAUVE against the split; prints and writes JSON (default `W/eval.json`).
- `demo [--workdir=W --quick --noprogress]`: trains two small ε-hybrid models (flat and block
  hyperschedules, `configs/demo_{flat,block}.py`) on the Python reference text that ships with
  CPython, prints samples of the ancestral and ACS samplers and the validation perplexity bounds,
  and writes figures to `W/plots` (default `W = workdirs/demo`, `workdirs/demo_quick` with
  `--quick`, a few-step version for smoke tests); see `hybriddiff.demo`. Needs no --config; run
  again, it resumes.
- `plot (--config=configs/x.py --output=DIR | --workdir=W [--output=DIR])`: writes PNG figures
  and prints their paths: for a config, its hyperschedule heat map and training attention
  layout; for a trained run, also its training curves and the denoising trajectory of one
  sample (default `W/plots`).

Configs are `ml_collections` files whose `get_config()` builds on `configs/base.py`; any key can be
overridden on the command line, e.g. `--config.data.path=../shared/data/shakespeare/
--config.data.seq_len=256 --config.train.batch_size=64 --config.train.num_steps=20000
--config.train.seed=1`. Multi-host: launch the same command on every host; TPU VM slices, Slurm
and Open MPI are detected, or pass `--coordinator_address=HOST:PORT --num_processes=P
--process_id=I`.

Exit status: 0 on success (also after a preemption checkpoint), 1 for a rejected config or missing
input, 2 for a malformed command line.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

_log = logging.getLogger(__name__)

COMMANDS = ("train", "prepare", "sample", "eval", "demo", "plot")
_RUN_COMMANDS = ("sample", "eval")  # read the config from the workdir
USAGE = (f"usage: hybriddiff {{{','.join(COMMANDS)}}} --config=configs/x.py [--config.key=value ...] "
         "(--workdir=DIR | --output=DIR) [flags]  (sample and eval: --workdir=DIR only; demo: "
         "[--workdir=DIR --quick]; plot: --config=configs/x.py --output=DIR or --workdir=DIR)")
_LOG_FORMAT = "%(levelname).1s%(asctime)s %(name)s] %(message)s"


class UserError(Exception):
    """A mistake in the command line or config, reported in one line without a traceback."""


@dataclasses.dataclass(frozen=True)
class _Flags:
    """The parsed command line."""

    command: str
    config: ml_collections.ConfigDict | None  # None: demo, and plot without --config
    workdir: str | None
    output: str | None
    progress: bool
    verbose: bool
    coordinator_address: str
    num_processes: int | None
    process_id: int | None
    distributed: bool
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _parse(argv: Sequence[str]) -> _Flags:
    """Parses `argv` (program name first) with a fresh set of flags, so `run` can be called again
    in the same process. Raises UserError on a bad command, flag or config override."""
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/x.py with get_config()); override keys with "
        "--config.key=value.", flag_values=values, sys_argv=list(argv))
    workdir = flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, data/, metrics.jsonl, "
                                  "tb/, config.json.", flag_values=values)
    output = flags.DEFINE_string("output", None, "prepare: write the prepared data here instead of "
                                 "data.prepared_dir or <workdir>/data; sample: the JSONL file "
                                 "(default <workdir>/samples.jsonl); eval: the JSON file (default "
                                 "<workdir>/eval.json); plot: the folder of the figures (default "
                                 "<workdir>/plots).", flag_values=values)
    progress = flags.DEFINE_bool("progress", True, "Show progress bars (process 0 only).",
                                 flag_values=values)
    verbose = flags.DEFINE_bool("verbose", False, "Also show debug logs and the libraries' INFO logs.",
                                flag_values=values)
    coordinator = flags.DEFINE_string("coordinator_address", "", "Multi-host: HOST:PORT of process 0.",
                                      flag_values=values)
    num_processes = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.",
                                         flag_values=values)
    process_id = flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.",
                                      flag_values=values)
    distributed = flags.DEFINE_bool("distributed", False, "Multi-host: let JAX detect the cluster even "
                                    "when the environment shows no known launcher.", flag_values=values)
    _define_run_flags(values)
    quick = flags.DEFINE_bool("quick", False, "demo: a few steps of tiny models (under a minute on a "
                              "CPU), in workdirs/demo_quick unless --workdir is given.",
                              flag_values=values)
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print(f"{__doc__}\n{USAGE}\n\n{values.get_help()}")
        raise SystemExit(0)
    try:
        rest = values(list(argv))[1:]
    except flags.Error as error:
        raise UserError(str(error)) from None
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # raised by a --config.key
        raise UserError(f"invalid --config override ({type(error).__name__}: {error})") from None
    if len(rest) != 1 or rest[0] not in COMMANDS:
        raise UserError(f"expected one command from {COMMANDS}, got {rest}")
    if rest[0] in _RUN_COMMANDS:
        return _Flags(command=rest[0], config=ml_collections.ConfigDict(), workdir=workdir.value,
                      output=output.value, progress=progress.value, verbose=verbose.value,
                      coordinator_address="", num_processes=None, process_id=None,
                      distributed=False, options={name: values[name].value for name in _RUN_FLAGS})
    if rest[0] == "demo":
        if config.value is not None:
            raise UserError("demo takes no --config: it trains configs/demo_flat.py and "
                            "configs/demo_block.py")
        return _Flags(command="demo", config=None, workdir=workdir.value, output=output.value,
                      progress=progress.value, verbose=verbose.value, coordinator_address="",
                      num_processes=None, process_id=None, distributed=False,
                      options={"quick": quick.value})
    if config.value is None:
        if rest[0] == "plot":
            return _Flags(command="plot", config=None, workdir=workdir.value, output=output.value,
                          progress=progress.value, verbose=verbose.value, coordinator_address="",
                          num_processes=None, process_id=None, distributed=False)
        raise UserError("--config=configs/x.py is required")
    if not isinstance(config.value, ml_collections.ConfigDict):  # the file failed to load
        try:
            config.value.to_dict()
        except Exception as error:  # noqa: BLE001 - whatever loading the file raised
            raise UserError(f"cannot load --config={values['config'].config_filename!r}: {error}") from None
    return _Flags(command=rest[0], config=config.value, workdir=workdir.value, output=output.value,
                  progress=progress.value, verbose=verbose.value,
                  coordinator_address=coordinator.value, num_processes=num_processes.value,
                  process_id=process_id.value, distributed=distributed.value)


_RUN_FLAGS = ("num_samples", "batch_size", "sampler", "steps", "precision", "temperature", "seed",
              "eta", "prompt", "infill", "max_length", "ema", "split", "num_batches", "gen_ppl",
              "entropy", "judge_workdir", "judge_hf", "mauve_featurizer", "data_source",
              "data_path", "data_dir")
_SAMPLING_FLAGS = ("num_samples", "batch_size", "sampler", "steps", "precision", "temperature",
                   "seed", "eta", "prompt", "max_length")


def _define_run_flags(values: flags.FlagValues) -> None:
    """Flags of `sample` and `eval`."""
    flags.DEFINE_integer("num_samples", 8, "sample/eval: number of samples.", flag_values=values)
    flags.DEFINE_integer("batch_size", 8, "sample/eval: samples per generation call.",
                         flag_values=values)
    flags.DEFINE_string("sampler", None, "sample/eval: analytic or euler for score models "
                        "(default analytic); ancestral (default), acs or an unmasking strategy for "
                        "the others.",
                        flag_values=values)
    flags.DEFINE_integer("steps", None, "sample/eval: noise levels of the hyperschedule (default: "
                         "hyperschedule.num_levels of the run).", flag_values=values)
    flags.DEFINE_string("precision", "float64", "sample/eval: token draws in float64 (exact "
                        "Gumbel tails, the default for evaluation), float32_high or float32 (the "
                        "fast path).", flag_values=values)
    flags.DEFINE_float("temperature", 1.0, "sample/eval: sampling temperature.", flag_values=values)
    flags.DEFINE_integer("seed", 0, "sample/eval: sampling seed.", flag_values=values)
    flags.DEFINE_float("eta", 0.0, "sample/eval: correction intensity of --sampler=acs.",
                       flag_values=values)
    flags.DEFINE_string("prompt", "", "sample/eval: text every sample continues (tokenized with "
                        "the run's tokenizer; after BOS when the run frames rows).",
                        flag_values=values)
    flags.DEFINE_multi_string("infill", [], "sample/eval: POS:TEXT fixes TEXT from token position "
                              "POS on (repeat the flag for several spans).", flag_values=values)
    flags.DEFINE_integer("max_length", None, "sample/eval: BD3-LM arbitrary-length generation up to "
                         "this many tokens, stopping at EOS (ALIGNED block runs).",
                         flag_values=values)
    flags.DEFINE_bool("ema", None, "sample/eval: the EMA parameters (--ema) or the raw ones "
                      "(--noema); default: the EMA when the run keeps one.", flag_values=values)
    flags.DEFINE_string("split", "validation", "eval: split of the bound (train or validation).",
                        flag_values=values)
    flags.DEFINE_integer("num_batches", None, "eval: batches of the bound (default "
                         "train.eval_batches of the run).", flag_values=values)
    flags.DEFINE_bool("gen_ppl", False, "eval: generative perplexity of --num_samples samples "
                      "under the judge.", flag_values=values)
    flags.DEFINE_bool("entropy", False, "eval: mean unigram entropy of --num_samples samples.",
                      flag_values=values)
    flags.DEFINE_string("judge_workdir", None, "eval: an autoregressive hybriddiff run as the judge.",
                        flag_values=values)
    flags.DEFINE_string("judge_hf", None, "eval: a local Hugging Face causal LM directory as the "
                        "judge (needs transformers and torch).", flag_values=values)
    flags.DEFINE_string("mauve_featurizer", None, "eval: MAUVE of --num_samples samples against as "
                        "many rows of --split, on the features of this local Hugging Face model "
                        "directory (needs transformers, torch and mauve-text).", flag_values=values)
    flags.DEFINE_string("data_source", None, "eval: the bound zero-shot on another source (text, "
                        "openwebtext, lm1b, tfds:NAME or pydoc) tokenized with the run's tokenizer.",
                        flag_values=values)
    flags.DEFINE_string("data_path", None, "eval: the local files of --data_source (text, "
                        "openwebtext).", flag_values=values)
    flags.DEFINE_string("data_dir", None, "eval: the TFDS data_dir of --data_source.",
                        flag_values=values)


def _configure_logging(verbose: bool) -> None:
    """INFO from hybriddiff on stderr; with `verbose` also its DEBUG (tracebacks of rejected
    commands) and the libraries' INFO (Orbax logs every save)."""
    logging.basicConfig(format=_LOG_FORMAT, stream=sys.stderr, force=True)  # Orbax installs its own
    logging.getLogger("hybriddiff").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        logging.getLogger().setLevel(logging.INFO)


def _train(parsed: _Flags) -> None:
    from hybriddiff.training.distributed import DistributedOptions
    from hybriddiff.training.loop import train

    if not parsed.workdir:
        raise UserError("train needs --workdir")
    options = DistributedOptions(coordinator_address=parsed.coordinator_address,
                                 num_processes=parsed.num_processes, process_id=parsed.process_id,
                                 auto=parsed.distributed)
    result = train(parsed.config, parsed.workdir, distributed=options, progress=parsed.progress)
    if result.preempted:
        _log.warning("stopped at step %d by a signal; the same command resumes from its checkpoint",
                     result.step)
    else:
        _log.info("finished at step %d; validation bound %s", result.step, result.valid_metrics)


def _prepare(parsed: _Flags) -> None:
    from hybriddiff.data import read_manifest
    from hybriddiff.training.loop import prepare_data, prepared_root

    if not (parsed.output or parsed.workdir):
        raise UserError("prepare needs --workdir or --output")
    root = parsed.output or prepared_root(parsed.config, parsed.workdir)
    data = prepare_data(parsed.config, root, progress=parsed.progress)
    for name, directory in (("train", data.train_dir), ("validation", data.validation_dir)):
        manifest = read_manifest(directory)
        print(f"{name}: {manifest.num_documents} documents, {manifest.num_tokens} tokens in {directory}")
    print(f"vocab_size (N): {data.vocab_size}")


def _sample(parsed: _Flags) -> None:
    from hybriddiff.evaluation.runs import sample_run, write_jsonl

    if not parsed.workdir:
        raise UserError("sample needs --workdir")
    records = sample_run(parsed.workdir, ema=parsed.options["ema"],
                         **_sampling_options(parsed.options))
    path = parsed.output or f"{parsed.workdir}/samples.jsonl"
    write_jsonl(path, records)
    print(f"wrote {len(records)} samples to {path}")


def _eval(parsed: _Flags) -> None:
    import json

    from hybriddiff.evaluation.runs import evaluate_run

    if not parsed.workdir:
        raise UserError("eval needs --workdir")
    o = parsed.options
    if o["gen_ppl"] and not (o["judge_workdir"] or o["judge_hf"]):
        raise UserError("eval --gen_ppl needs --judge_workdir or --judge_hf")
    result = evaluate_run(parsed.workdir, split=o["split"], num_batches=o["num_batches"],
                          gen_ppl=o["gen_ppl"], entropy=o["entropy"],
                          judge_workdir=o["judge_workdir"], judge_hf=o["judge_hf"],
                          mauve_featurizer=o["mauve_featurizer"], data=_zero_shot(o),
                          ema=o["ema"], **_sampling_options(o))
    text = json.dumps(result, indent=2, sort_keys=True)
    path = parsed.output or f"{parsed.workdir}/eval.json"
    with open(path, "w", encoding="utf-8") as file:
        file.write(text + "\n")
    print(text)


def _demo(parsed: _Flags) -> None:
    from hybriddiff.demo import format_report, run_demo

    if parsed.output:
        raise UserError("demo takes no --output: it writes its figures to <workdir>/plots")
    result = run_demo(parsed.workdir, quick=parsed.options["quick"], progress=parsed.progress)
    print(format_report(result))


def _plot(parsed: _Flags) -> None:
    from hybriddiff.demo import write_config_plots, write_run_plots

    if parsed.config is not None and parsed.workdir:
        raise UserError("plot takes --config or --workdir, not both")
    if parsed.config is not None:
        if not parsed.output:
            raise UserError("plot --config needs --output=DIR")
        paths = write_config_plots(parsed.config, parsed.output)
    elif parsed.workdir:
        paths = write_run_plots(parsed.workdir, parsed.output)
    else:
        raise UserError("plot needs --config=configs/x.py with --output=DIR, or --workdir=DIR")
    for path in paths:
        print(path)


def _infill(specs: Sequence[str]) -> dict[int, str]:
    """``--infill=POS:TEXT`` flags as ``{POS: TEXT}``."""
    spans: dict[int, str] = {}
    for spec in specs:
        position, sep, text = spec.partition(":")
        if not sep or not position.strip().isdigit() or not text:
            raise UserError(f"--infill={spec!r} is not POS:TEXT (a token position, a colon and "
                            "non-empty text)")
        if int(position) in spans:
            raise UserError(f"--infill gives position {int(position)} twice")
        spans[int(position)] = text
    return spans


def _sampling_options(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``runs.generate_samples``."""
    chosen = {name: options[name] for name in _SAMPLING_FLAGS}
    chosen["infill"] = _infill(options["infill"])
    return chosen


def _zero_shot(options: dict[str, Any]) -> dict[str, str] | None:
    """``--data_source/--data_path/--data_dir`` as ``evaluate_run(data=...)``."""
    given = {key: options[f"data_{key}"] for key in ("source", "path", "dir")
             if options[f"data_{key}"] is not None}
    if not given:
        return None
    if "source" not in given:
        raise UserError("--data_path and --data_dir need --data_source")
    return {("data_dir" if key == "dir" else key): value for key, value in given.items()}


def run(argv: Sequence[str] | None = None, *, configure_logging: bool = False) -> int:
    """Runs one command line (program name first; default `sys.argv`) and returns the exit status.
    `configure_logging`: install the command's log format and levels on the root logger."""
    argv = list(sys.argv if argv is None else argv)
    try:
        parsed = _parse(argv)
    except UserError as error:
        print(f"hybriddiff: error: {error}\n{USAGE}", file=sys.stderr)
        return 2
    if configure_logging:
        _configure_logging(parsed.verbose)
    try:
        {"train": _train, "prepare": _prepare, "sample": _sample, "eval": _eval, "demo": _demo,
         "plot": _plot}[parsed.command](parsed)
    except (UserError, ValueError, FileNotFoundError, ImportError, FloatingPointError) as error:
        _log.debug("%s failed", parsed.command, exc_info=True)
        print(f"hybriddiff {parsed.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """Entry point of the `hybriddiff` console script (and of `python -m hybriddiff`)."""
    sys.exit(run(configure_logging=True))
