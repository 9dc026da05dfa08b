"""Tokenizers (SentencePiece, Hugging Face `tokenizers`, bytes) and the LM1B/PTB detokenizers."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybriddiff.data.detokenize import lm1b_detokenize, ptb_detokenize
from hybriddiff.data.tokenizers import (
    ByteTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer, load_tokenizer,
    tokenizer_from_description, train_sentencepiece,
)

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shakespeare"
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.is_dir(), reason=f"shakespeare corpus not found at {SHAKESPEARE} (shared/ beside the repo)"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizers! Numbers 12345 and symbols #@%.",
    "A tiny corpus for a tiny tokenizer; it has to learn something.",
]


@pytest.fixture(scope="module")
def shakespeare_sp(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    if not SHAKESPEARE.is_dir():
        pytest.skip(f"shakespeare corpus not found at {SHAKESPEARE} (shared/ beside the repo)")
    plays = sorted(SHAKESPEARE.glob("*.txt"))[:3]
    model = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    return train_sentencepiece((p.read_text() for p in plays), model, 512, max_lines=20_000)


@needs_shakespeare
def test_sentencepiece_on_shakespeare_has_vocab_and_round_trips(shakespeare_sp: SentencePieceTokenizer) -> None:
    tokenizer = shakespeare_sp
    assert tokenizer.vocab_size == 512
    assert tokenizer.mask_id == 512
    assert len({tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}) == 3
    held_out = sorted(SHAKESPEARE.glob("*.txt"))[-1].read_text()[10_000:14_000]
    samples = [held_out, "  Leading, double  spaces\n\nand é, 中文, \t tabs ", ""]
    encoded = tokenizer.encode_batch(samples)
    for text, ids in zip(samples, encoded):
        assert ids.dtype == np.int32
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tokenizer.vocab_size)
        assert tokenizer.decode(ids) == tokenizer.normalize(text) == text
    # Learned pieces compress the text well below one token per character.
    assert encoded[0].size < 0.75 * len(held_out)
    # Special ids inside a sequence are dropped by decode.
    framed = np.concatenate([[tokenizer.bos_id], encoded[0], [tokenizer.eos_id]])
    assert tokenizer.decode(framed) == held_out


@needs_shakespeare
def test_sentencepiece_nfkc_round_trips_after_normalisation(tmp_path: Path) -> None:
    play = sorted(SHAKESPEARE.glob("*.txt"))[0].read_text()
    tokenizer = train_sentencepiece([play], tmp_path / "nfkc.model", 400, max_lines=3000,
                                    normalization="nmt_nfkc")
    text = "  ﬁne ① Ａ  double  spaces \nline"
    assert tokenizer.decode(tokenizer.encode(text)) == tokenizer.normalize(text)
    assert tokenizer.normalize(text) != text


def test_sentencepiece_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="vocab_size must be >= 262.*got 100"):
        train_sentencepiece(CORPUS, tmp_path / "a.model", 100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_sentencepiece(["", "\n \n"], tmp_path / "a.model", 310)
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(CORPUS, tmp_path / "a.model", 300, model_type="word2vec")


def test_sentencepiece_description_round_trip_and_changed_file(tmp_path: Path) -> None:
    tokenizer = train_sentencepiece(CORPUS * 20, tmp_path / "a.model", 310)
    description = tokenizer.describe()
    again = tokenizer_from_description(description)
    assert again.encode("hello fox").tolist() == tokenizer.encode("hello fox").tolist()
    assert isinstance(load_tokenizer(tmp_path / "a.model"), SentencePieceTokenizer)
    train_sentencepiece(CORPUS * 20, tmp_path / "a.model", 315)
    with pytest.raises(ValueError, match="changed since the data was prepared"):
        tokenizer_from_description(description)


def _bert_like(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS * 5, trainers.WordPieceTrainer(vocab_size=150, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def _gpt2_like(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_huggingface_bert_like_directory(tmp_path: Path) -> None:
    tokenizer = HuggingFaceTokenizer(_bert_like(tmp_path / "bert"))
    vocab = tokenizer._tok.get_vocab()  # the reference ids, read from the saved vocabulary
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"])
    assert tokenizer.vocab_size == len(vocab)
    ids = tokenizer.encode("The quick brown fox.")
    # The post-processor would add [CLS]/[SEP]; encode_batch must not.
    assert tokenizer.bos_id not in ids.tolist() and tokenizer.eos_id not in ids.tolist()
    assert [tokenizer._tok.id_to_token(i) for i in ids[:2]] == ["the", "quick"]
    assert tokenizer.decode(ids) == "the quick brown fox."
    assert lm1b_detokenize(tokenizer.decode(tokenizer.encode("Hello , world !"))) == "hello, world!"


def test_huggingface_gpt2_like_file_round_trips_and_shares_eos(tmp_path: Path) -> None:
    directory = _gpt2_like(tmp_path / "gpt2")
    tokenizer = HuggingFaceTokenizer(directory / "tokenizer.json")
    eot = tokenizer._tok.token_to_id("<|endoftext|>")
    assert tokenizer.bos_id == tokenizer.eos_id == tokenizer.pad_id == eot
    texts = ["The lazy dog, twice:  the lazy dog.", "ünïcode ✓ works\n"]
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert tokenizer.decode(ids) == text
    description = tokenizer.describe()
    assert tokenizer_from_description(description).encode(texts[0]).tolist() == tokenizer.encode(texts[0]).tolist()
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        HuggingFaceTokenizer(directory, eos_token="<nope>")


def test_huggingface_name_from_offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--tiny--bert-base-uncased"
    _bert_like(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    tokenizer = load_tokenizer("tiny/bert-base-uncased")
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"


def test_huggingface_missing_says_how_to_provide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="'bert-base-uncased' is not available offline.*save_pretrained"):
        HuggingFaceTokenizer("bert-base-uncased")
    with pytest.raises(FileNotFoundError, match="not available offline"):
        load_tokenizer(tmp_path / "no-such-dir")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HuggingFaceTokenizer(empty)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=5))
def test_byte_tokenizer_round_trips(texts: list[str]) -> None:
    tokenizer = ByteTokenizer()
    encoded = tokenizer.encode_batch(texts)
    for text, ids in zip(texts, encoded):
        assert ids.tolist() == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode_batch([np.concatenate([ids, [tokenizer.eos_id]]) for ids in encoded]) == texts


def test_decode_rejects_mask_and_out_of_range_ids() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.mask_id == tokenizer.vocab_size == 259
    with pytest.raises(ValueError, match="got 259 \\(the MASK id"):
        tokenizer.decode([104, 105, 259])
    with pytest.raises(ValueError, match="got -1"):
        tokenizer.decode([-1])
    assert load_tokenizer("bytes").describe() == tokenizer.describe()
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        tokenizer_from_description({"kind": "wordpiece"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('He said : " It \'s here , do n\'t go . "', 'He said: "It\'s here, don\'t go."'),
        ("I don 't know ( really ) !", "I don't know (really)!"),
        ("it costs $ 5 , or 10 % more ; fine ?", "it costs $5, or 10% more; fine?"),
        ("see http : / / example.com now", "see http://example.com now"),
        ("Europe ' s leaders they 're", "Europe's leaders they're"),
        ("one\ntwo .", "one\ntwo."),
        ("Already natural, isn't it?", "Already natural, isn't it?"),
    ],
)
def test_lm1b_detokenize(text: str, expected: str) -> None:
    assert lm1b_detokenize(text) == expected
    assert lm1b_detokenize(expected) == expected


def test_ptb_detokenize() -> None:
    text = "the company 's shares -lrb- up N % -rrb- fell and\\/or rose `` sharply '' said <unk> ."
    assert ptb_detokenize(text) == "the company's shares (up N%) fell and/or rose \"sharply\" said <unk>."


def test_sentencepiece_model_without_bos_eos_is_named(tmp_path: Path) -> None:
    """A model trained outside train_sentencepiece with bos_id = eos_id = -1."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buffer, vocab_size=60,
                                   bos_id=-1, eos_id=-1, minloglevel=2)
    model = tmp_path / "no-specials.model"
    model.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=re.escape(
            f"SentencePiece model {str(model)!r} has no BOS/EOS ids (bos_id=-1, eos_id=-1)")):
        SentencePieceTokenizer(model)


def test_sentencepiece_training_failure_names_the_vocab_size(tmp_path: Path) -> None:
    """Three lines cannot fill 100000 pieces; no model file is left behind."""
    with pytest.raises(ValueError, match="training with vocab_size=100000 on 3 lines failed: "):
        train_sentencepiece(CORPUS, tmp_path / "big.model", 100_000)
    assert not (tmp_path / "big.model").exists()


def test_huggingface_tokenizer_without_eos_is_named(tmp_path: Path) -> None:
    """A word-level tokenizer.json with none of the EOS candidates."""
    from tokenizers import Tokenizer, models

    word_level = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word_level.save(str(tmp_path / "tokenizer.json"))
    named = re.escape(f"tokenizer {str(tmp_path)!r} has none of the EOS tokens (")
    with pytest.raises(ValueError, match=named + r".*'</s>'.*; pass eos_token="):
        HuggingFaceTokenizer(tmp_path)
