"""`hybriddiff sample` and `hybriddiff eval` end to end: two tiny demo runs are trained in
subprocesses (train_runs.py; a γ-hybrid flat model and an autoregressive judge), then sampled and
evaluated in process with `cli.run`."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_runs
from hybriddiff import cli
from hybriddiff.evaluation import generative
from hybriddiff.evaluation import runs as runs_lib
from hybriddiff.evaluation.likelihood import negative_elbo
from hybriddiff.model.sharding import activate
from hybriddiff.sampling import drive
from hybriddiff.training import core

SMALL = ("--config.train.num_steps=2", "--config.train.eval_batches=1",
         "--config.hyperschedule.num_levels=4")
AR = ("--config.loss.kind=ar", "--config.hyperschedule.kind=quench",
      "--config.hyperschedule.alignment=shifted", "--config.process.name=absorb",
      "--config.model.weighted_embedding=False")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    train_runs.train(tmp_path_factory, base / "gamma", *SMALL)
    train_runs.train(tmp_path_factory, base / "ar", *SMALL, *AR)
    return {"gamma": base / "gamma", "ar": base / "ar"}


@pytest.fixture(scope="module")
def shifted_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """γ-hybrid score models in the SHIFTED configuration (seed 000 Fig. 5b): flat and block."""
    base = tmp_path_factory.mktemp("shifted")
    shifted = "--config.hyperschedule.alignment=shifted"
    train_runs.train(tmp_path_factory, base / "flat", *SMALL, shifted)
    train_runs.train(tmp_path_factory, base / "block", *SMALL, shifted,
                     "--config.hyperschedule.kind=block", "--config.hyperschedule.width=32")
    return {"flat": base / "flat", "block": base / "block"}


@pytest.fixture(scope="module")
def block_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BD3-LM run (absorb, mdlm, block width 32) that keeps an EMA."""
    workdir = tmp_path_factory.mktemp("runs") / "block"
    train_runs.train(tmp_path_factory, workdir, *SMALL, "--config.train.ema_decay=0.5",
                     "--config.loss.kind=mdlm", "--config.hyperschedule.kind=block",
                     "--config.hyperschedule.width=32", "--config.process.name=absorb",
                     "--config.model.weighted_embedding=False")
    return workdir


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.run(["hybriddiff", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_writes_jsonl(runs: dict[str, Path], capsys: pytest.CaptureFixture[str],
                             tmp_path: Path) -> None:
    output = tmp_path / "s.jsonl"
    code, out, err = run(capsys, "sample", f"--workdir={runs['gamma']}", "--num_samples=3",
                         "--batch_size=2", "--steps=4", "--seed=3", f"--output={output}")
    assert code == 0, err
    assert f"wrote 3 samples to {output}" in out
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert len(line["tokens"]) == 128 and all(0 <= t < 259 for t in line["tokens"])
        assert isinstance(line["text"], str)
        assert line["nfe"] == 4 and line["seconds"] > 0
        assert line["sampler"] == "analytic" and line["steps"] == 4 and line["seed"] == 3
        assert line["checkpoint_step"] == 2
    assert lines[0]["tokens"] != lines[2]["tokens"]


def test_euler_sampler_on_a_score_model(runs: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    output = tmp_path / "euler.jsonl"
    code, out, err = run(capsys, "sample", f"--workdir={runs['gamma']}", "--num_samples=2",
                         "--batch_size=2", "--steps=4", "--sampler=euler", "--precision=float32",
                         f"--output={output}")
    assert code == 0, err
    for line in map(json.loads, output.read_text().splitlines()):
        assert line["sampler"] == "euler" and line["nfe"] == 4
        assert len(line["tokens"]) == 128 and all(0 <= t < 259 for t in line["tokens"])


def test_autoregressive_run_samples_after_bos(runs: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    output = tmp_path / "ar.jsonl"
    code, _, err = run(capsys, "sample", f"--workdir={runs['ar']}", "--num_samples=2",
                       "--batch_size=2", f"--output={output}")
    assert code == 0, err
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert all(line["tokens"][0] == 256 and line["sampler"] == "ancestral" for line in lines)
    assert all(line["nfe"] == 127 for line in lines)  # one call per position after BOS


def test_eval_reports_finite_bound_gen_ppl_and_entropy(runs: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    output = tmp_path / "eval.json"
    code, out, err = run(capsys, "eval", f"--workdir={runs['gamma']}", "--num_batches=1",
                         "--num_samples=2", "--batch_size=2", "--steps=4", "--gen_ppl",
                         "--entropy", f"--judge_workdir={runs['ar']}", f"--output={output}")
    assert code == 0, err
    result = json.loads(output.read_text())
    assert json.loads(out) == result
    for key in ("nll_per_token", "perplexity_bound", "gen_ppl", "gen_nll_per_token", "entropy"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["num_tokens"] == 8 * 128 and result["gen_num_tokens"] > 0
    np.testing.assert_allclose(result["perplexity_bound"], math.exp(result["nll_per_token"]))
    np.testing.assert_allclose(result["gen_ppl"], math.exp(result["gen_nll_per_token"]), rtol=1e-6)
    assert result["entropy"] <= math.log(259)


@pytest.mark.parametrize("kind, nfe", [("flat", 4), ("block", 16)])
def test_shifted_score_runs_sample_after_bos_and_bound_the_rest(
        shifted_runs: dict[str, Path], kind: str, nfe: int, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """SHIFTED γ runs: samples start with the BOS that no cell predicts (block: 4 blocks of 32
    with 4 levels each, from the KV cache), and the bound covers the other 127 tokens per row."""
    samples, result = tmp_path / "s.jsonl", tmp_path / "eval.json"
    code, _, err = run(capsys, "sample", f"--workdir={shifted_runs[kind]}", "--num_samples=2",
                       "--batch_size=2", "--steps=4", f"--output={samples}")
    assert code == 0, err
    for line in map(json.loads, samples.read_text().splitlines()):
        assert line["tokens"][0] == 256 and line["sampler"] == "analytic" and line["nfe"] == nfe
        assert len(line["tokens"]) == 128 and all(0 <= t < 259 for t in line["tokens"])
    code, _, err = run(capsys, "eval", f"--workdir={shifted_runs[kind]}", "--num_batches=1",
                       f"--output={result}")
    assert code == 0, err
    bound = json.loads(result.read_text())
    assert bound["num_tokens"] == 8 * 127 and 0 < bound["nll_per_token"] < 20


def test_ar_judge_equals_the_exact_autoregressive_nll(runs: dict[str, Path]) -> None:
    judge = generative.ARJudge.from_workdir(runs["ar"])
    text = ("def f(x):\n    return x + 1\n" * 6)[:128]
    tokens = np.asarray(judge.encode(text))
    assert tokens.shape == (128,)
    scored = generative.generative_perplexity(judge, [text])
    setup = judge.setup
    with activate(setup.mesh, setup.rules):
        apply = core.make_apply_fn(setup, judge.params)
        exact = negative_elbo(setup.objective, apply, jnp.tile(jnp.asarray(tokens)[None], (8, 1)),
                              jax.random.key(0))
    assert scored.num_tokens == 127 and float(exact.num_tokens) == 8 * 127
    np.testing.assert_allclose(scored.nll_sum, float(exact.per_sequence[0]), rtol=1e-4)
    longer = generative.generative_perplexity(judge, [text + text[:40]], stride=64)
    assert longer.num_tokens == 167 and math.isfinite(longer.nll_sum)


def test_reverse_step_rejects_unknown_and_mismatched_samplers(runs: dict[str, Path]) -> None:
    restored = drive.restore_run(runs["gamma"])
    with pytest.raises(ValueError, match="sampler must be one of .* got sampler='nope'"):
        drive.reverse_step(restored.setup, "nope")
    with pytest.raises(ValueError, match="sampler='ancestral' does not apply to a loss.kind='dwdse'"):
        drive.reverse_step(restored.setup, "ancestral")
    with pytest.raises(ValueError, match=r"unmasking options \['threshold'\] apply to the unmasking"):
        drive.reverse_step(restored.setup, "euler", threshold=0.5)


@pytest.mark.parametrize("args, message", [
    (("sample",), "sample needs --workdir"),
    (("eval",), "eval needs --workdir"),
    (("sample", "--workdir={tmp}/missing"), "/missing' does not exist"),
    (("sample", "--workdir={tmp}"), "has no config.json: not a training run"),
    (("sample", "--workdir={nockpt}"), "no checkpoint found in"),
    (("sample", "--workdir={gamma}", "--sampler=bogus"), "got sampler='bogus'"),
    (("sample", "--workdir={gamma}", "--num_samples=0"), "num_samples=0"),
    (("eval", "--workdir={gamma}", "--gen_ppl"), "eval --gen_ppl needs --judge_workdir or --judge_hf"),
    (("eval", "--workdir={gamma}", "--gen_ppl", "--judge_workdir={gamma}", "--num_batches=1"),
     "a judge must be an autoregressive run"),
    (("eval", "--workdir={gamma}", "--split=test"), "split must be one of"),
    (("sample", "--workdir={gamma}", "--infill=world"), "--infill='world' is not POS:TEXT"),
    (("sample", "--workdir={gamma}", "--infill=x:world"), "--infill='x:world' is not POS:TEXT"),
    (("sample", "--workdir={gamma}", "--infill=3:"), "--infill='3:' is not POS:TEXT"),
    (("sample", "--workdir={gamma}", "--infill=3:a", "--infill=3:b"), "gives position 3 twice"),
    (("sample", "--workdir={gamma}", "--ema"), "ema=True but workdir="),
    (("sample", "--workdir={gamma}", "--precision=float16"), "float16"),
    (("eval", "--workdir={gamma}", "--data_path=x"), "--data_path and --data_dir need --data_source"),
    (("eval", "--workdir={gamma}", "--data_source=text"), "data.path='' must name local files for data.source='text'"),
    (("eval", "--workdir={gamma}", "--data_source=wiki"), "data.source='wiki' is not one of"),
])
def test_error_paths_exit_1(runs: dict[str, Path], capsys: pytest.CaptureFixture[str],
                            tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    nockpt = tmp_path / "nockpt"
    nockpt.mkdir()
    shutil.copy(runs["gamma"] / "config.json", nockpt / "config.json")
    (nockpt / "data").symlink_to(runs["gamma"] / "data")
    filled = [a.format(tmp=tmp_path, gamma=runs["gamma"], nockpt=nockpt) for a in args]
    code, _, err = run(capsys, *filled)
    assert code == 1
    assert f"hybriddiff {filled[0]}: error:" in err and message in err, err


def test_command_line_lists_sample_and_eval(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "predict")
    assert code == 2
    assert ("expected one command from ('train', 'prepare', 'sample', 'eval', 'demo', 'plot'), "
            "got ['predict']") in err
    with pytest.raises(SystemExit):
        cli.run(["hybriddiff", "--help"])
    text = capsys.readouterr().out
    for word in ("sample --workdir", "eval --workdir", "--sampler", "--judge_workdir", "--gen_ppl",
                 "--prompt", "--infill", "--max_length", "--mauve_featurizer", "--data_source"):
        assert word in text, word


@pytest.mark.parametrize("sampler", ["acs", "top_prob"])
def test_block_run_restores_ema_and_samples_with_the_cache(block_run: Path, sampler: str) -> None:
    restored = drive.restore_run(block_run)
    assert restored.ema and restored.step == 2
    saved = train_runs.read_state(block_run, 2)
    leaves = jax.tree_util.tree_leaves_with_path(restored.params)
    assert len(leaves) == sum(key.startswith("['ema']") for key in saved)
    for path, leaf in leaves:  # nnx paths: [0] and .value; saved (plain tree): ['0'] and ['value']
        key = re.sub(r"\[(\d+)\]", r"['\1']", jax.tree_util.keystr(path)).replace(".value",
                                                                                  "['value']")
        np.testing.assert_array_equal(np.asarray(leaf), saved["['ema']" + key])
    step = drive.reverse_step(restored.setup, sampler, eta=0.5)
    result = drive.sample(restored, step, jax.random.key(1), num_samples=2, num_levels=4)
    tokens = np.asarray(result.tokens)
    assert tokens.shape == (2, 128) and np.all((tokens >= 0) & (tokens < 259))
    assert result.nfe == 4 * 4  # 4 blocks of 32, 4 levels each


def test_conditioning_state_places_prompt_and_infill(block_run: Path) -> None:
    restored = drive.restore_run(block_run)  # rows framed BOS ... EOS: the prompt follows BOS
    tokens, fixed = drive.conditioning_state(restored, 2, prompt=[5, 6, 7], infill={120: [8, 9]})
    tokens, fixed = np.asarray(tokens), np.asarray(fixed)
    expected_fixed = np.zeros(128, bool)
    expected_fixed[[0, 1, 2, 3, 120, 121]] = True
    np.testing.assert_array_equal(fixed, np.broadcast_to(expected_fixed, (2, 128)))
    np.testing.assert_array_equal(tokens[:, [0, 1, 2, 3, 120, 121]], [[256, 5, 6, 7, 8, 9]] * 2)
    assert np.all(tokens[~fixed] == restored.setup.objective.mask_id)


@pytest.mark.parametrize("options, message", [
    ({"prompt": [1] * 128}, r"prompt of 128 tokens does not fit the model's length 128 \(after 1 BOS"),
    ({"prompt": [1, 2], "infill": {2: [3]}}, "infill span at position 2 overlaps the prompt"),
    ({"infill": {127: [3, 4]}}, r"infill span at position 127 of 2 tokens does not fit in \[0, 128\)"),
    ({"infill": {-1: [3]}}, "infill span at position -1"),
    ({"prompt": [259]}, r"prompt holds ids outside the vocabulary \[0, 259\)"),
])
def test_conditioning_state_errors(block_run: Path, options: dict, message: str) -> None:
    restored = drive.restore_run(block_run)
    with pytest.raises(ValueError, match=message):
        drive.conditioning_state(restored, 1, **options)


def test_prompted_infilled_and_long_samples(block_run: Path, runs: dict[str, Path]) -> None:
    records = runs_lib.sample_run(block_run, num_samples=2, batch_size=2, steps=4,
                                  prompt="Hello", infill={100: "world"})
    for record in records:
        assert record["tokens"][:6] == [256, *b"Hello"] and record["tokens"][100:105] == list(b"world")
        assert record["precision"] == "float64"  # evaluation samples draw in float64 by default
        assert record["prompt"] == "Hello" and record["infill"] == {"100": "world"}
    long = runs_lib.sample_run(block_run, num_samples=4, batch_size=4, steps=2, prompt="Hi",
                               max_length=200, precision="float32")
    eos = 257
    for record in long:
        tokens = record["tokens"]
        assert tokens[:3] == [256, *b"Hi"] and record["length"] == len(tokens) <= 200
        assert (tokens[-1] == eos and eos not in tokens[:-1]) or len(tokens) == 200
        assert record["max_length"] == 200
    assert max(record["length"] for record in long) > 128 or all(
        record["tokens"][-1] == eos for record in long)
    with pytest.raises(ValueError, match="max_length needs an ALIGNED block run.*'flat'"):
        runs_lib.sample_run(runs["gamma"], num_samples=1, batch_size=1, max_length=200)


def test_zero_shot_bound_on_another_source(runs: dict[str, Path]) -> None:
    own = runs_lib.evaluate_run(runs["gamma"], num_batches=1)
    other = runs_lib.evaluate_run(runs["gamma"], num_batches=1,
                                  data={"source": "text", "path": str(train_runs.SHAKESPEARE)})
    assert other["data"]["path"] == str(train_runs.SHAKESPEARE)
    assert math.isfinite(other["nll_per_token"]) and other["nll_per_token"] != own["nll_per_token"]
    assert other["num_tokens"] == own["num_tokens"]
    prepared = list((runs["gamma"] / "zeroshot").iterdir())
    assert len(prepared) == 1 and prepared[0].name.startswith("text-"), prepared
    with pytest.raises(ValueError, match=r"zero-shot data keys must be among .* got \['seq_len'\]"):
        runs_lib.evaluate_run(runs["gamma"], num_batches=1, data={"seq_len": 64})


def test_restore_raw_parameters_and_unmasking_options(block_run: Path,
                                                      runs: dict[str, Path]) -> None:
    raw = drive.restore_run(block_run, ema=False)
    saved = train_runs.read_state(block_run, 2)
    assert not raw.ema
    first = jax.tree_util.tree_leaves(raw.params)[0]
    assert any(np.array_equal(np.asarray(first), value) for key, value in saved.items()
               if key.startswith("['params']"))
    with pytest.raises(ValueError, match="ema=True but workdir=.* keeps no EMA"):
        drive.restore_run(runs["gamma"], ema=True)
    step = drive.reverse_step(raw.setup, "threshold", threshold=0.5, block_width=16)
    assert step.config.threshold == 0.5 and step.config.block_width == 16
    with pytest.raises(ValueError, match=r"unmasking options \['threshold'\] apply to the unmasking"):
        drive.reverse_step(raw.setup, "acs", threshold=0.5)
    with pytest.raises(ValueError, match="threshold must lie in"):
        drive.reverse_step(raw.setup, "threshold", threshold=2.0)


def test_sample_flags_prompt_infill_length_and_raw_parameters(
        block_run: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output = tmp_path / "p.jsonl"
    code, out, err = run(capsys, "sample", f"--workdir={block_run}", "--num_samples=2",
                         "--batch_size=2", "--steps=4", "--prompt=Hello", "--infill=100:world",
                         "--infill=110:!", "--noema", f"--output={output}")
    assert code == 0, err
    for line in map(json.loads, output.read_text().splitlines()):
        assert line["tokens"][:6] == [256, *b"Hello"] and line["tokens"][100:105] == list(b"world")
        assert line["tokens"][110] == ord("!")
        assert line["prompt"] == "Hello" and line["infill"] == {"100": "world", "110": "!"}
        assert line["precision"] == "float64" and line["ema"] is False
    code, out, err = run(capsys, "sample", f"--workdir={block_run}", "--num_samples=2",
                         "--batch_size=2", "--steps=2", "--max_length=160", "--precision=float32",
                         f"--output={output}")
    assert code == 0, err
    for line in map(json.loads, output.read_text().splitlines()):
        assert line["length"] == len(line["tokens"]) <= 160 and line["max_length"] == 160
        assert line["precision"] == "float32" and line["ema"] is True


def test_eval_zero_shot_flags(runs: dict[str, Path], capsys: pytest.CaptureFixture[str],
                              tmp_path: Path) -> None:
    output = tmp_path / "zero.json"
    code, out, err = run(capsys, "eval", f"--workdir={runs['gamma']}", "--num_batches=1",
                         "--data_source=text", f"--data_path={train_runs.SHAKESPEARE}",
                         f"--output={output}")
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result["data"] == {"source": "text", "path": str(train_runs.SHAKESPEARE)}
    direct = runs_lib.evaluate_run(runs["gamma"], num_batches=1, data=result["data"])
    assert result["nll_per_token"] == direct["nll_per_token"]


def test_eval_with_a_hugging_face_judge_and_mauve(runs: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mauve")
    tiny_gpt2 = pytest.importorskip("tiny_gpt2")  # needs torch and transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = tiny_gpt2.build_tiny_gpt2(tmp_path / "gpt2")
    output = tmp_path / "eval.json"
    code, out, err = run(capsys, "eval", f"--workdir={runs['gamma']}", "--num_batches=1",
                         "--split=train", "--num_samples=20", "--batch_size=10", "--steps=4",
                         "--gen_ppl",
                         f"--judge_hf={tiny.directory}", f"--mauve_featurizer={tiny.directory}",
                         f"--output={output}")
    assert code == 0, err
    result = json.loads(output.read_text())
    assert math.isfinite(result["gen_ppl"]) and result["gen_ppl"] > 1 and result["gen_num_tokens"] > 0
    assert 0 < result["mauve"] <= 1 and 0 < result["mauve_star"] <= 1
    assert result["mauve_num_buckets"] == 2  # max(2, round(20 / 10))
