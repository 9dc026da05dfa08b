"""Sampling and evaluating a trained run directory (what `hybriddiff sample` and `hybriddiff eval`
call): samples as JSON records, the negative-ELBO bound on a split of the run's data or, zero-shot,
of another source tokenized with the run's tokenizer, generative perplexity under a judge and
unigram entropy (:mod:`hybriddiff.evaluation.generative`).

Evaluation samples draw their tokens in float64 by default (``precision="float64"``, run under
``jax.enable_x64``): float32 Gumbel noise cannot exceed ~15.9 and under-samples the tails of peaked
categoricals (:mod:`hybriddiff.sampling.categorical`); ``"float32"`` is the fast path.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hybriddiff.evaluation import generative, huggingface
from hybriddiff.sampling.categorical import CategoricalConfig
from hybriddiff.sampling.drive import RestoredRun, restore_run, reverse_step, sample

__all__ = ["evaluate_run", "generate_samples", "reference_texts", "sample_run", "write_jsonl",
           "zero_shot_data"]

_SPLITS = ("train", "validation")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    return value


def generate_samples(run: RestoredRun, *, num_samples: int = 8, batch_size: int = 8,
                     sampler: str | None = None, steps: int | None = None,
                     precision: str = "float64", temperature: float = 1.0, seed: int = 0,
                     eta: float = 0.0, prompt: str = "", infill: Mapping[int, str] | None = None,
                     max_length: int | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``tokens [num_samples, L]`` and one record per generation call (nfe, seconds).

    ``sampler`` defaults to ``"analytic"`` for score models and ``"ancestral"`` otherwise; batch
    ``b`` uses ``fold_in(key(seed), b)``; the last call is padded to ``batch_size`` rows (one
    compilation) and cut. ``prompt``: text every sample continues; ``infill``: position -> text
    fixed from that position on (both tokenized with the run's tokenizer,
    :func:`hybriddiff.sampling.drive.conditioning_state`). ``max_length``: BD3-LM arbitrary-length
    generation up to that many tokens (``L = max_length``; past a row's EOS the tokens are EOS).
    """
    _positive("num_samples", num_samples)
    _positive("batch_size", batch_size)
    if sampler is None:
        sampler = "analytic" if run.setup.objective.loss_kind == "dwdse" else "ancestral"
    sampling = CategoricalConfig(temperature=temperature, precision=precision)
    step = reverse_step(run.setup, sampler, eta=eta, sampling=sampling)
    prompt_ids = [int(t) for t in run.tokenizer.encode(prompt)] if prompt else []
    infill_ids = {int(position): [int(t) for t in run.tokenizer.encode(text)]
                  for position, text in (infill or {}).items()}
    key = jax.random.key(seed)
    rows, calls = [], []
    with jax.enable_x64(precision == "float64"):
        for index in range(math.ceil(num_samples / batch_size)):
            result = sample(run, step, jax.random.fold_in(key, index), num_samples=batch_size,
                            num_levels=steps, prompt=prompt_ids, infill=infill_ids,
                            max_length=max_length)
            rows.append(np.asarray(jax.device_get(result.tokens)))
            calls.append({"nfe": int(result.nfe), "seconds": float(result.seconds)})
    settings = {"sampler": sampler, "steps": steps or run.setup.num_levels, "precision": precision,
                "temperature": temperature, "seed": seed, "eta": eta, "checkpoint_step": run.step,
                "ema": run.ema}
    if prompt:
        settings["prompt"] = prompt
    if infill:
        settings["infill"] = {str(position): text for position, text in infill.items()}
    if max_length is not None:
        settings["max_length"] = max_length
    for call in calls:
        call.update(settings)
    return np.concatenate(rows)[:num_samples], calls


def sample_run(workdir: str | Path, *, ema: bool | None = None, **options: Any
               ) -> list[dict[str, Any]]:
    """Samples of a run as JSON records ``{text, tokens, nfe, seconds, sampler settings}``
    (options of :func:`generate_samples`; ``ema`` of :func:`restore_run`); with ``max_length``
    each row is cut after its first EOS (``length`` says where)."""
    run = restore_run(workdir, ema=ema)
    tokens, calls = generate_samples(run, **options)
    batch_size = options.get("batch_size", 8)
    records = []
    for index, row in enumerate(tokens):
        extra: dict[str, Any] = {}
        if options.get("max_length") is not None:
            row = row[np.asarray(generative.eos_mask(row[None], run.tokenizer.eos_id))[0]]
            extra["length"] = len(row)
        records.append({"text": run.tokenizer.decode(row), "tokens": [int(t) for t in row],
                        **extra, **calls[index // batch_size]})
    return records


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def zero_shot_data(run: RestoredRun, data: Mapping[str, Any], *, progress: bool = False) -> Any:
    """Another source tokenized with the run's tokenizer, prepared once into
    ``<workdir>/zeroshot/<name>``; ``data`` overrides keys of the run's ``data`` config (``source``,
    ``path``, ``data_dir``, ``validation_fraction``). Returns ``loop.PreparedData``."""
    from hybriddiff.training.config import validate_data
    from hybriddiff.training.loop import prepare_data

    allowed = ("source", "path", "data_dir", "validation_fraction")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"zero-shot data keys must be among {allowed}, got {unknown}")
    config = run.config.copy_and_resolve_references()
    config.data.update(dict(data))
    if "path" not in data:
        config.data.path = ""
    validate_data(config)
    described = json.dumps({k: config.data.get(k) for k in allowed}, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(config.data.source))
    name = f"{slug}-{hashlib.sha256(described.encode()).hexdigest()[:10]}"
    return prepare_data(config, run.workdir / "zeroshot" / name, progress=progress,
                        tokenizer=run.tokenizer)


def _bound(run: RestoredRun, prepared: Any, split: str, num_batches: int | None
           ) -> dict[str, float]:
    from hybriddiff.training import core
    from hybriddiff.training.loop import Evaluator, make_pipelines

    num_batches = _positive("num_batches", run.config.train.eval_batches if num_batches is None
                            else num_batches)
    setup = run.setup
    rows = core.batch_sharding(setup).spec[0]
    batch_axes = () if rows is None else ((rows,) if isinstance(rows, str) else tuple(rows))
    pipelines = make_pipelines(run.config, prepared, setup.mesh, batch_axes)
    pipeline = pipelines[_SPLITS.index(split)]
    bound = Evaluator(setup, setup.mesh, pipeline, num_batches).bound(run.params)
    tokens = num_batches * run.config.train.batch_size * int(
        np.asarray(setup.objective.eval_layout().denoise_slots).sum()
        if setup.objective.loss_kind != "ar" else setup.objective.length - 1)
    return {"nll_per_token": bound["nll"], "perplexity_bound": bound["ppl"], "num_tokens": tokens}


def reference_texts(run: RestoredRun, prepared: Any, split: str, count: int) -> list[str]:
    """``count`` rows of a prepared split, evenly spaced, decoded up to their first EOS like the
    samples (the human side of MAUVE)."""
    from hybriddiff.data import PackedRows, TokenStore
    from hybriddiff.training.loop import SPLIT_DIRS

    store = TokenStore(getattr(prepared, f"{'train' if split == 'train' else 'validation'}_dir"))
    rows = PackedRows(store, run.config.data.seq_len,
                      bos_eos_framing=bool(run.config.data.bos_eos_framing))
    if len(rows) < count:
        raise ValueError(f"the {split} split ({SPLIT_DIRS[split]}) has {len(rows)} rows, fewer than "
                         f"the {count} samples MAUVE compares with")
    tokens = rows.rows(np.linspace(0, len(rows) - 1, count).round().astype(np.int64))
    valid = np.asarray(generative.eos_mask(tokens, run.tokenizer.eos_id))
    return [run.tokenizer.decode(row[keep]) for row, keep in zip(tokens, valid)]


def _judge(judge_workdir: str | None, judge_hf: str | None) -> Any:
    if judge_hf:
        return huggingface.HuggingFaceJudge.load(judge_hf)
    return generative.ARJudge.from_workdir(judge_workdir)


def evaluate_run(workdir: str | Path, *, split: str = "validation", num_batches: int | None = None,
                 data: Mapping[str, Any] | None = None, gen_ppl: bool = False,
                 entropy: bool = False, judge_workdir: str | None = None,
                 judge_hf: str | None = None, mauve_featurizer: str | None = None,
                 ema: bool | None = None, **sampling: Any) -> dict[str, Any]:
    """``{nll_per_token, perplexity_bound, num_tokens}`` of the run's bound on ``split`` (of the
    run's data, or zero-shot of ``data``: overrides of the data config, :func:`zero_shot_data`),
    plus, for fresh samples when asked, ``gen_ppl`` (with ``gen_nll_per_token``,
    ``gen_num_tokens``) under the judge, ``entropy`` (mean unigram entropy, nats), and ``mauve`` /
    ``mauve_star`` against as many rows of ``split`` (:func:`reference_texts`) on the features of
    the local Hugging Face model directory ``mauve_featurizer`` (``sampling``: options of
    :func:`generate_samples`; ``ema`` of :func:`restore_run`)."""
    from hybriddiff.training.loop import ensure_prepared

    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got split={split!r}")
    if judge_workdir and judge_hf:  # before any work
        raise ValueError(f"give one judge, not both: judge_workdir={judge_workdir!r} and "
                         f"judge_hf={judge_hf!r}")
    run = restore_run(workdir, ema=ema)
    prepared = (ensure_prepared(run.config, run.workdir, progress=False) if data is None
                else zero_shot_data(run, data))
    result: dict[str, Any] = {"split": split, "checkpoint_step": run.step, "ema": run.ema,
                              **_bound(run, prepared, split, num_batches)}
    if data is not None:
        result["data"] = dict(data)
    if not (gen_ppl or entropy or mauve_featurizer):
        return result
    judge = _judge(judge_workdir, judge_hf) if gen_ppl else None
    tokens, _ = generate_samples(run, **sampling)
    eos = run.tokenizer.eos_id
    valid = np.asarray(generative.eos_mask(tokens, eos))
    if entropy:
        per_sample = generative.unigram_entropy(tokens, run.setup.objective.process.num_tokens,
                                                valid)
        result["entropy"] = float(np.mean(np.asarray(per_sample)))
    texts = [run.tokenizer.decode(row[keep]) for row, keep in zip(tokens, valid)]
    if gen_ppl:
        ended = [bool(np.any(row == eos)) for row in tokens]
        scored = generative.generative_perplexity(judge, texts, eos_id=judge.eos_id, ended=ended)
        result.update(gen_ppl=scored.perplexity, gen_nll_per_token=scored.nll_sum
                      / max(scored.num_tokens, 1), gen_num_tokens=scored.num_tokens)
    if mauve_featurizer:
        human = reference_texts(run, prepared, split, len(texts))
        compared = huggingface.mauve_score(human, texts, featurizer=mauve_featurizer)
        result.update(mauve=compared.mauve, mauve_star=compared.mauve_star,
                      mauve_num_buckets=compared.num_buckets)
    return result
