"""The tiny local Hugging Face model of the judge and MAUVE tests: a byte-level BPE tokenizer and a
random two-layer GPT-2 (context 32), saved in a temporary directory; the tests run offline."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import tokenizers
import torch
import transformers
from pydoc_data.topics import topics

CONTEXT = 32  # n_positions of the tiny GPT-2


def corpus() -> list[str]:
    """A few KB of English-like text (the pydoc topic help of the standard library)."""
    return [topics[key] for key in sorted(topics)[:6]]


def build_tiny_gpt2(directory: Path) -> SimpleNamespace:
    """Trains a byte-level BPE tokenizer (special tokens <bos>, <eos>, <pad>) and builds a random
    two-layer GPT-2 (seed 0, dropout left on so evaluation mode matters), saved in ``directory``.
    Returns the raw ``tokenizers.Tokenizer`` and the in-memory model for the references."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(corpus(), trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>",
                                                     eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=CONTEXT,
                                     vocab_size=len(tokenizer),
                                     bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    model = transformers.GPT2LMHeadModel(config)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return SimpleNamespace(directory=directory, raw=raw, model=model.eval(),
                           bos=raw.token_to_id("<bos>"), eos=raw.token_to_id("<eos>"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
