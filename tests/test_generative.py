"""Tests for hybriddiff.evaluation.generative: pooled generative perplexity with sliding windows and
EOS handling against a loop, unigram entropy against a hand count, and the optional-package errors.
The hybriddiff AR judge is tested end to end in test_cli_sample_eval.py."""

from __future__ import annotations

import collections
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybriddiff.evaluation import generative, huggingface

V = 7  # toy judge vocabulary


def toy_log_probs(tokens: jax.Array) -> jax.Array:
    """A causal toy judge: the logits at cell c depend on every token of cells 0..c (a running
    sum of one-hot rows) and on the token at c. Returns [M, C, V] log-probabilities."""
    one_hot = jax.nn.one_hot(tokens, V)  # [M, C, V]
    history = jnp.cumsum(one_hot, axis=1)
    logits = 0.7 * history + 1.3 * jnp.roll(one_hot, 1, axis=-1) + 0.1 * jnp.arange(V)
    return jax.nn.log_softmax(logits, axis=-1)


def toy_reference(prefix: list[int], target: int) -> float:
    """-log p(target | prefix) of the toy judge, by explicit loops."""
    counts = [0.0] * V
    for token in prefix:
        counts[token] += 1.0
    last = prefix[-1]
    logits = [0.7 * counts[v] + 1.3 * (v == (last + 1) % V) + 0.1 * v for v in range(V)]
    norm = math.log(sum(math.exp(x) for x in logits))
    return norm - logits[target]


def reference_nll(row: list[int], context: int, stride: int) -> float:
    """Sum over p >= 1 of -log p(row[p] | row[start:p]), where the window that scores p is the
    first window [k*stride, k*stride + context) whose end lies beyond p."""
    total = 0.0
    for p in range(1, len(row)):
        k = 0
        while k * stride + context <= p:
            k += 1
        total += toy_reference(row[k * stride:p], row[p])
    return total


class ToyJudge:
    context_length = 5
    bos_id = None
    eos_id = 6

    def encode(self, text: str) -> list[int]:
        return [int(c) for c in text]

    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(toy_log_probs(jnp.asarray(tokens)))


@pytest.mark.parametrize("length, context, stride", [(4, 5, 2), (5, 5, 2), (12, 5, 2), (13, 5, 4),
                                                     (9, 4, 1)])
def test_window_plan_scores_every_position_once(length: int, context: int, stride: int) -> None:
    index, scored = generative.window_plan(length, context, stride)
    covered = index[:, 1:][scored[:, 1:]]
    assert sorted(covered.tolist()) == list(range(1, length))
    for k in range(index.shape[0]):
        for c in np.flatnonzero(scored[k]):
            assert c >= (1 if k == 0 else context - stride)  # context inside the window


def test_score_tokens_matches_window_loop() -> None:
    rng = np.random.default_rng(0)
    context, stride = 5, 2
    tokens = rng.integers(0, V, size=(3, 12))
    valid = np.ones(tokens.shape, bool)
    valid[1, 8:] = False  # a sample that ends at position 7
    got = np.asarray(generative.score_tokens(toy_log_probs, jnp.asarray(tokens), jnp.asarray(valid),
                                             context, stride))
    want = [reference_nll(tokens[i][valid[i]].tolist(), context, stride) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_eos_mask_keeps_up_to_first_eos() -> None:
    tokens = np.array([[1, 6, 2, 6], [1, 2, 3, 4], [6, 6, 1, 2]])
    want = np.array([[i <= list(row).index(6) if 6 in row else True for i in range(4)]
                     for row in tokens])
    np.testing.assert_array_equal(np.asarray(generative.eos_mask(jnp.asarray(tokens), 6)), want)


def test_generative_perplexity_pools_tokens_and_stops_at_eos() -> None:
    judge = ToyJudge()
    texts = ["01234560", "12", "31462225"]  # EOS (6) inside the first and the last
    result = generative.generative_perplexity(judge, texts, eos_id=6, ended=[False, True, False],
                                              stride=2, batch_size=2)
    rows = [[0, 1, 2, 3, 4, 5, 6], [1, 2, 6], [3, 1, 4, 6]]  # up to and including the first EOS
    per_sample = [reference_nll(row, 5, 2) for row in rows]
    np.testing.assert_allclose(result.per_sample_nll, per_sample, rtol=1e-5)
    assert result.num_tokens == sum(len(r) - 1 for r in rows)
    np.testing.assert_allclose(result.perplexity, math.exp(sum(per_sample) / result.num_tokens),
                               rtol=1e-5)
    mean_of_ppl = np.mean([math.exp(n / (len(r) - 1)) for n, r in zip(per_sample, rows)])
    assert not np.isclose(result.perplexity, mean_of_ppl)  # the published (per-sample) average


def test_unigram_entropy_matches_hand_count() -> None:
    tokens = np.array([[0, 0, 1, 2, 2, 2], [3, 3, 3, 3, 3, 3], [4, 1, 4, 1, 0, 5]])
    valid = np.ones(tokens.shape, bool)
    valid[2, 4:] = False

    def hand(row: list[int]) -> float:
        counts = collections.Counter(row)
        n = len(row)
        return -sum(c / n * math.log(c / n) for c in counts.values())

    want = [hand(tokens[i][valid[i]].tolist()) for i in range(3)]
    got = generative.unigram_entropy(jnp.asarray(tokens), 6, jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    jitted = jax.jit(generative.unigram_entropy, static_argnums=1)(jnp.asarray(tokens), 6)
    np.testing.assert_allclose(np.asarray(jitted)[:2], want[:2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("context, stride, message", [(1, 1, "context must be >= 2, got context=1"),
                                                      (4, 4, "stride must be in"),
                                                      (4, 0, "got stride=0")])
def test_window_plan_rejects_bad_arguments(context: int, stride: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generative.window_plan(10, context, stride)


def test_generative_perplexity_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="texts must hold at least one sample"):
        generative.generative_perplexity(ToyJudge(), [])
    with pytest.raises(ValueError, match="needs eos_id"):
        generative.generative_perplexity(ToyJudge(), ["01"], ended=[True])


def test_mauve_without_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mauve", None)  # as if mauve-text were not installed
    with pytest.raises(ImportError, match="pip install mauve-text"):
        huggingface.mauve_score(["a"], ["b"])


@pytest.mark.parametrize("missing", ["torch", "transformers"])
def test_hugging_face_judge_without_packages_says_how_to_install(
        monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ImportError, match="pip install transformers torch"):
        huggingface.HuggingFaceJudge.load("/nonexistent")


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size must be >= 1, got batch_size=0"),
    ({"batch_size": -3}, "batch_size must be >= 1, got batch_size=-3"),
    ({"ended": [True, False], "eos_id": 6}, r"one flag per text \(1\).*got 2 flags with eos_id=6"),
])
def test_generative_perplexity_names_bad_values(options: dict, message: str) -> None:
    """A non-positive batch_size, or more ended flags than texts."""
    with pytest.raises(ValueError, match=message):
        generative.generative_perplexity(ToyJudge(), ["01"], **options)


def test_reference_texts_need_as_many_rows_as_samples(tmp_path: Path) -> None:
    """A stand-in run (seq_len 8, byte tokenizer) over 24 prepared tokens: 3 validation rows."""
    from data_helpers import ListSource
    from hybriddiff.data import ByteTokenizer, prepare_dataset
    from hybriddiff.evaluation import runs

    prepare_dataset(ListSource(["a short validation text"]), ByteTokenizer(), tmp_path / "validation",
                    progress=False)
    run = SimpleNamespace(config=SimpleNamespace(data=SimpleNamespace(seq_len=8, bos_eos_framing=False)),
                          tokenizer=ByteTokenizer())
    prepared = SimpleNamespace(validation_dir=tmp_path / "validation")
    assert runs.reference_texts(run, prepared, "validation", 3) == ["a short ", "validati", "on text"]
    with pytest.raises(ValueError, match=r"the validation split \(validation\) has 3 rows, fewer than "
                                         "the 5 samples MAUVE compares with"):
        runs.reference_texts(run, prepared, "validation", 5)


def test_evaluate_run_refuses_two_judges_before_any_work(tmp_path: Path) -> None:
    """Both judges named: refused before the run is even looked for (it does not exist here)."""
    from hybriddiff.evaluation import runs

    with pytest.raises(ValueError, match=re.escape(
            f"give one judge, not both: judge_workdir='{tmp_path / 'ar'}' and "
            f"judge_hf='{tmp_path / 'gpt2'}'")):
        runs.evaluate_run(tmp_path / "missing", gen_ppl=True, judge_workdir=str(tmp_path / "ar"),
                          judge_hf=str(tmp_path / "gpt2"))
