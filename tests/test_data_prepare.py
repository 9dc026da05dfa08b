"""One-time preparation into ArrayRecord shards: manifest, no-op re-runs, crash safety, corruption."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from hybriddiff.data.pipeline import make_pipeline
from hybriddiff.data.prepare import prepare_dataset
from data_helpers import ListSource
from hybriddiff.data.sources import TextFilesSource
from hybriddiff.data.store import CorruptShardError, TokenStore, read_manifest
from hybriddiff.data.tokenizers import ByteTokenizer, train_sentencepiece

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shakespeare"
TEXTS = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(40)]


class CrashingBytes(ByteTokenizer):
    """Byte tokenizer whose `encode_batch` fails after `calls` batches (a simulated crash)."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.calls == 0:
            raise RuntimeError("simulated crash")
        self.calls -= 1
        return super().encode_batch(texts)


OPTIONS = dict(chunk_tokens=16, shard_tokens=250, batch_documents=4, progress=False)


def _stream(texts: list[str], eos: int) -> np.ndarray:
    return np.array([t for text in texts for t in [*text.encode(), eos]], dtype=np.int32)


def test_manifest_and_store_match_the_documents(tmp_path: Path) -> None:
    manifest = prepare_dataset(ListSource(TEXTS), ByteTokenizer(), tmp_path, **OPTIONS)
    stream = _stream(TEXTS, ByteTokenizer().eos_id)
    assert manifest.num_tokens == stream.size and manifest.num_documents == len(TEXTS)
    assert manifest.dtype == "uint16" and manifest.tokenizer["eos_id"] == ByteTokenizer().eos_id
    assert sum(s.num_documents for s in manifest.shards) == len(TEXTS)
    assert all(s.num_tokens >= 250 for s in manifest.shards[:-1]) and len(manifest.shards) > 3
    assert all(s.num_records == -(-s.num_tokens // 16) for s in manifest.shards)
    assert read_manifest(tmp_path) == manifest
    store = TokenStore(tmp_path, verify="checksum")
    np.testing.assert_array_equal(store.read(np.array([0]), stream.size)[0], stream)
    starts = np.array([0, 15, 16, 99, stream.size - 40])
    np.testing.assert_array_equal(store.read(starts, 40), np.stack([stream[s:s + 40] for s in starts]))


def test_rerun_is_a_noop_and_other_settings_are_refused(tmp_path: Path) -> None:
    first = prepare_dataset(ListSource(TEXTS), ByteTokenizer(), tmp_path, **OPTIONS)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = prepare_dataset(ListSource(TEXTS), CrashingBytes(0), tmp_path, **OPTIONS)  # never encodes
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    with pytest.raises(ValueError, match="prepared with different settings \\(chunk_tokens differ\\)"):
        prepare_dataset(ListSource(TEXTS), ByteTokenizer(), tmp_path, **{**OPTIONS, "chunk_tokens": 8})


@pytest.mark.parametrize("corrupt_kept_shard", [False, True])
def test_interrupted_run_resumes_and_trusts_no_partial_shard(tmp_path: Path, corrupt_kept_shard: bool) -> None:
    clean = prepare_dataset(ListSource(TEXTS), ByteTokenizer(), tmp_path / "clean", **OPTIONS)
    target = tmp_path / "target"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(ListSource(TEXTS), CrashingBytes(5), target, **OPTIONS)
    assert not (target / "manifest.json").exists()
    assert any(".tmp-" in p.name for p in target.iterdir())  # the half-written shard
    finished = sorted(target.glob("shard-*.json"))
    assert len(finished) >= 2
    if corrupt_kept_shard:
        shard = target / "shard-00001.array_record"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    stamp = (target / "shard-00000.array_record").stat().st_mtime_ns
    resumed = prepare_dataset(ListSource(TEXTS), ByteTokenizer(), target, **OPTIONS)
    assert resumed.shards == clean.shards and resumed.num_tokens == clean.num_tokens
    assert (target / "shard-00000.array_record").stat().st_mtime_ns == stamp  # kept, not rewritten
    assert not any(".tmp-" in p.name for p in target.iterdir())
    TokenStore(target, verify="checksum")


def test_empty_corpus_and_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_dataset(ListSource([]), ByteTokenizer(), tmp_path / "a", progress=False)
    (tmp_path / "no-text").mkdir()
    with pytest.raises(ValueError, match="empty corpus: source .*text_files.* has no documents"):
        prepare_dataset(TextFilesSource(tmp_path / "no-text"), ByteTokenizer(), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1; got 0"):
        prepare_dataset(ListSource(TEXTS), ByteTokenizer(), tmp_path / "a", chunk_tokens=0)


def test_corrupt_or_missing_shards_are_named(tmp_path: Path) -> None:
    prepare_dataset(ListSource(TEXTS), ByteTokenizer(), tmp_path, **OPTIONS)
    shard = tmp_path / "shard-00002.array_record"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 3] ^= 0x01
    shard.write_bytes(bytes(flipped))
    TokenStore(tmp_path)  # same size: only a checksum finds it
    with pytest.raises(CorruptShardError, match="shard-00002.array_record.*checksum mismatch"):
        make_pipeline(tmp_path, seq_len=8, global_batch_size=2, verify="checksum")
    shard.write_bytes(original[:-100])
    with pytest.raises(CorruptShardError, match="shard-00002.array_record.*truncated"):
        make_pipeline(tmp_path, seq_len=8, global_batch_size=2)
    shard.unlink()
    with pytest.raises(CorruptShardError, match="shard-00002.array_record.*missing"):
        TokenStore(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][2]["num_records"] += 1
    shard.write_bytes(original)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    store = TokenStore(tmp_path)
    start = sum(s["num_tokens"] for s in manifest["shards"][:2])
    with pytest.raises(CorruptShardError, match="holds .* records but the manifest says"):
        store.read(np.array([start]), 4)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a prepared dataset"):
        make_pipeline(tmp_path, seq_len=8, global_batch_size=2)


def test_sentencepiece_shakespeare_end_to_end(tmp_path: Path) -> None:
    if not SHAKESPEARE.is_dir():
        pytest.skip(f"shakespeare corpus not found at {SHAKESPEARE} (shared/ beside the repo)")
    plays = sorted(SHAKESPEARE.glob("*.txt"))[:2]
    source = TextFilesSource(plays, document_unit="paragraph")
    tokenizer = train_sentencepiece(source.read(0, len(source)), tmp_path / "tokenizer.model", 512,
                                    max_lines=10_000)
    manifest = prepare_dataset(source, tokenizer, tmp_path / "train", progress=False)
    assert manifest.tokenizer["vocab_size"] == 512 and manifest.num_documents == len(source)
    encoded = tokenizer.encode_batch(source.read(0, len(source)))
    expected = np.concatenate([np.append(ids, tokenizer.eos_id) for ids in encoded])
    pipeline = make_pipeline(tmp_path / "train", seq_len=128, global_batch_size=4, shuffle=False,
                             bos_eos_framing=True, num_epochs=1)
    assert pipeline.manifest.vocab_size == 512 and pipeline.manifest.bos_id == tokenizer.bos_id
    batch = next(pipeline)
    np.testing.assert_array_equal(batch[:, 1:-1].reshape(-1), expected[:4 * 126])
    assert np.all(batch[:, 0] == tokenizer.bos_id) and np.all(batch[:, -1] == tokenizer.eos_id)


class OutOfRangeBytes(ByteTokenizer):
    """Byte tokenizer that maps every "z" to id 300, outside its 259 ids."""

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.where(ids == ord("z"), 300, ids).astype(np.int32) for ids in super().encode_batch(texts)]


def test_ids_outside_the_vocabulary_name_the_documents(tmp_path: Path) -> None:
    """The batch of documents 2..3 holds the id 300; nothing is marked finished."""
    texts = ["fine", "also fine", "buzz", "ok"]
    with pytest.raises(ValueError, match=r"tokenizer produced ids outside 0\.\.258 \(e\.g\. 300\) for documents 2\.\.3"):
        prepare_dataset(ListSource(texts), OutOfRangeBytes(), tmp_path, batch_documents=2, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_store_names_bad_verify_windows_and_format_version(tmp_path: Path) -> None:
    """A bad verify mode, windows past either end of the stream and a future format_version."""
    prepare_dataset(ListSource(TEXTS), ByteTokenizer(), tmp_path, **OPTIONS)
    with pytest.raises(ValueError, match="verify must be 'size' or 'checksum'; got 'sha1'"):
        TokenStore(tmp_path, verify="sha1")  # type: ignore[arg-type]
    store = TokenStore(tmp_path)
    total = store.num_tokens
    with pytest.raises(IndexError, match=rf"window \[0, {total + 1}\) outside the {total}-token stream"):
        store.read(np.array([0, total - 3]), 4)
    with pytest.raises(IndexError, match=rf"window \[-1, 3\) outside the {total}-token stream"):
        store.read(np.array([-1]), 4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json' has format_version=99; this code reads 1"):
        TokenStore(tmp_path)


def test_unreadable_records_name_the_shard_and_directory(tmp_path: Path) -> None:
    """A flipped byte fails the ArrayRecord read; a wrong chunk_tokens mis-sizes the records."""
    prepare_dataset(ListSource(TEXTS), ByteTokenizer(), tmp_path, **OPTIONS)
    shard = tmp_path / "shard-00000.array_record"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[200] ^= 0xFF  # inside an early record chunk: same size, so only a read notices
    shard.write_bytes(bytes(flipped))
    store = TokenStore(tmp_path)
    with pytest.raises(CorruptShardError, match=re.escape(
            f"reading shard 'shard-00000.array_record' of {str(tmp_path)!r} failed: ")):
        store.read(np.array([0]), store.num_tokens)  # every record
    shard.write_bytes(original)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["chunk_tokens"] = 8  # the records hold 16 tokens each
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptShardError, match=re.escape(
            f"records of {str(tmp_path)!r} hold 16 tokens where the manifest implies 8")):
        TokenStore(tmp_path).read(np.array([0]), 4)
