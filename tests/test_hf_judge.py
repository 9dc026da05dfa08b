"""Tests for hybriddiff.evaluation.huggingface.HuggingFaceJudge: generative perplexity of a tiny,
randomly initialised local GPT-2 (context 32, so long texts need sliding windows) against a direct
torch reference, offline loading, and the error paths. The model comes from tiny_gpt2.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from pydoc_data.topics import topics  # noqa: E402
from tiny_gpt2 import CONTEXT, offline, tiny  # noqa: E402,F401 (fixtures)

from hybriddiff.evaluation import HuggingFaceJudge, generative_perplexity  # noqa: E402
from hybriddiff.evaluation import huggingface  # noqa: E402


def reference_nll(model: Any, row: list[int], context: int, stride: int) -> float:
    """Sum over p >= 1 of -log p(row[p] | row[start:p]) (float64), where the scoring window is the
    first window [k*stride, k*stride + context) whose end lies beyond p; each window is run
    unpadded."""
    by_window: dict[int, list[int]] = {}
    for p in range(1, len(row)):
        k = 0
        while k * stride + context <= p:
            k += 1
        by_window.setdefault(k, []).append(p)
    total = 0.0
    for k, positions in by_window.items():
        start = k * stride
        window = torch.tensor([row[start:start + context]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(window).logits[0].double(), dim=-1)
        total -= sum(log_probs[p - start - 1, row[p]].item() for p in positions)
    return total


def reference_row(tiny: SimpleNamespace, text: str, ended: bool) -> list[int]:
    """<bos> + the text's ids (+ <eos> when it ended), cut after the first <eos>."""
    row = [tiny.bos] + tiny.raw.encode(text).ids + ([tiny.eos] if ended else [])
    return row[:row.index(tiny.eos, 1) + 1] if tiny.eos in row[1:] else row


TEXTS = ["a", "", "The quick brown fox jumps over the lazy dog.", topics["assert"][:600],
         "break <eos> whatever comes after an EOS is not scored", topics["if"][:300]]
ENDED = [False, True, True, False, False, True]


@pytest.mark.parametrize("context_length, stride", [(None, None), (20, 7)])
def test_generative_perplexity_matches_torch_reference(tiny: SimpleNamespace,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       context_length: int | None,
                                                       stride: int | None) -> None:
    calls = []
    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = auto.from_pretrained

        def spy(*args: Any, original: Any = original, **kwargs: Any) -> Any:
            calls.append(kwargs.get("local_files_only"))
            return original(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    judge = HuggingFaceJudge.load(tiny.directory, context_length=context_length)
    assert calls == [True, True]
    context = CONTEXT if context_length is None else context_length
    assert (judge.context_length, judge.bos_id, judge.eos_id) == (context, tiny.bos, tiny.eos)
    result = generative_perplexity(judge, TEXTS, eos_id=judge.eos_id, ended=ENDED, stride=stride,
                                   batch_size=2)
    rows = [reference_row(tiny, text, stop) for text, stop in zip(TEXTS, ENDED)]
    assert max(len(r) for r in rows) > 2 * CONTEXT and min(len(r) for r in rows) < context
    want = [reference_nll(tiny.model, row, context, stride or context // 2) for row in rows]
    np.testing.assert_allclose(result.per_sample_nll, want, rtol=1e-5)
    assert result.num_tokens == sum(len(row) - 1 for row in rows)
    np.testing.assert_allclose(result.perplexity, np.exp(sum(want) / result.num_tokens), rtol=1e-5)


def test_log_probs_are_normalised_float32_and_causal(tiny: SimpleNamespace) -> None:
    judge = HuggingFaceJudge.load(tiny.directory)
    tokens = np.random.default_rng(0).integers(0, len(judge.tokenizer), size=(3, 10))
    changed = tokens.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % len(judge.tokenizer)
    out, out_changed = judge.log_probs(tokens), judge.log_probs(changed)
    assert out.shape == (3, 10, len(judge.tokenizer)) and out.dtype == np.float32
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out[:, :6], out_changed[:, :6], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, 6:], out_changed[:, 6:])


@pytest.mark.parametrize("fields, want", [({"max_position_embeddings": 64, "n_ctx": 8}, 64),
                                          ({"n_positions": 48}, 48), ({"n_ctx": 16}, 16),
                                          ({"seq_length": 24, "max_position_embeddings": None},
                                           24)])
def test_context_length_read_from_any_config_field(fields: dict[str, Any], want: int) -> None:
    model = SimpleNamespace(config=SimpleNamespace(**fields))
    assert huggingface._resolve_context(model, None, Path("m"), "context_length") == want


def test_load_rejects_bad_arguments(tiny: SimpleNamespace, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError, match=f"path='{missing}' is not a directory"):
        HuggingFaceJudge.load(missing)
    with pytest.raises(ValueError, match=r"context_length must be in \[2, 32\].*"
                                         r"context_length=64"):
        HuggingFaceJudge.load(tiny.directory, context_length=64)
    with pytest.raises(ValueError, match="got dtype='int8'"):
        HuggingFaceJudge.load(tiny.directory, dtype="int8")
    with pytest.raises(ValueError, match="stores no context length.*pass context_length"):
        huggingface._resolve_context(SimpleNamespace(config=SimpleNamespace()), None, Path("m"),
                                     "context_length")


def test_judge_whose_bos_is_its_eos_scores_every_token(tiny: SimpleNamespace,
                                                        tmp_path: Path) -> None:
    """GPT-2 opens and ends texts with the same <|endoftext|>: the prepended BOS must not count as
    the text's end."""
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tiny.directory)
    tokenizer.bos_token = "<eos>"
    tokenizer.save_pretrained(tmp_path)
    tiny.model.save_pretrained(tmp_path)
    judge = HuggingFaceJudge.load(tmp_path)
    assert judge.bos_id == judge.eos_id == tiny.eos
    texts, ended = ["The quick brown fox.", "jumps <eos> not scored"], [True, False]
    result = generative_perplexity(judge, texts, eos_id=judge.eos_id, ended=ended)
    rows = [[tiny.eos] + tiny.raw.encode(text).ids + ([tiny.eos] if stop else [])
            for text, stop in zip(texts, ended)]
    rows[1] = rows[1][:rows[1].index(tiny.eos, 1) + 1]
    assert result.num_tokens == sum(len(row) - 1 for row in rows) > 0
    want = [reference_nll(tiny.model, row, CONTEXT, CONTEXT // 2) for row in rows]
    np.testing.assert_allclose(result.per_sample_nll, want, rtol=1e-5)
