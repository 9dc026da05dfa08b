"""Tokenize a document source once into ArrayRecord shards plus a manifest (DESIGN.md §7).

`prepare_dataset(source, tokenizer, out_dir)` writes the layout described in
`hybriddiff.data.store`. Crash safety: every file is written under a temporary name, fsynced and
renamed; a shard's sidecar JSON is written only after its shard is in place, and `manifest.json`
only after every shard. A later run trusts nothing without a manifest except shards whose sidecar
matches the settings and whose checksum matches the sidecar (those are kept, so an interrupted
OpenWebText preparation resumes); everything else is rewritten. Re-running a finished preparation
with the same settings is a no-op; with different settings it is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from array_record.python import array_record_module
from tqdm.auto import tqdm

from hybriddiff.data.sources import DocumentSource
from hybriddiff.data.store import (
    FORMAT_VERSION, MANIFEST_NAME, WRITER_OPTIONS, CorruptShardError, Manifest, ShardInfo,
    fsync_directory, read_manifest, token_dtype, verify_shard, write_atomic,
)
from hybriddiff.data.tokenizers import Tokenizer, file_sha256

DEFAULT_CHUNK_TOKENS = 4096
DEFAULT_SHARD_TOKENS = 1 << 26


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


def _sidecar_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.json"


def _settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class _ShardWriter:
    """Writes one shard: fixed `chunk_tokens` records, the last one possibly shorter."""

    def __init__(self, directory: Path, index: int, first_document: int, chunk_tokens: int,
                 dtype: np.dtype) -> None:
        self.directory, self.index = directory, index
        self.first_document, self.num_documents = first_document, 0
        self.chunk_tokens, self.dtype = chunk_tokens, dtype
        self.num_tokens = self.num_records = 0
        self.final = directory / _shard_name(index)
        self.temporary = directory / f"{self.final.name}.tmp-{os.getpid()}"
        self._writer = array_record_module.ArrayRecordWriter(str(self.temporary), WRITER_OPTIONS)
        self._pending = np.zeros(0, dtype=dtype)

    def add(self, tokens: np.ndarray, num_documents: int) -> None:
        """Appends the stream of `num_documents` whole documents (EOS included)."""
        data = np.concatenate([self._pending, tokens.astype(self.dtype)])
        full = data.size // self.chunk_tokens
        for record in data[:full * self.chunk_tokens].reshape(full, self.chunk_tokens):
            self._writer.write(record.tobytes())
        self.num_records += full
        self._pending = data[full * self.chunk_tokens:]
        self.num_tokens += int(tokens.size)
        self.num_documents += num_documents

    def finish(self, settings_digest: str) -> ShardInfo:
        """Closes, fsyncs and renames the shard, then writes its sidecar; returns its entry."""
        if self._pending.size:
            self._writer.write(self._pending.tobytes())
            self.num_records += 1
        self._writer.close()
        with open(self.temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.temporary, self.final)
        fsync_directory(self.directory)
        info = ShardInfo(
            file=self.final.name, first_document=self.first_document,
            num_documents=self.num_documents, num_tokens=self.num_tokens,
            num_records=self.num_records, size_bytes=self.final.stat().st_size,
            sha256=file_sha256(self.final))
        sidecar = {"settings_digest": settings_digest, "shard": dataclasses.asdict(info)}
        write_atomic(_sidecar_path(self.directory, self.index), json.dumps(sidecar).encode())
        return info


def _resumable_shards(directory: Path, digest: str) -> list[ShardInfo]:
    """Leading shards of an interrupted run that match the settings and their checksums."""
    kept: list[ShardInfo] = []
    next_document = 0
    while (sidecar := _sidecar_path(directory, len(kept))).is_file():
        try:
            record = json.loads(sidecar.read_text())
            info = ShardInfo(**record["shard"])
        except (ValueError, KeyError, TypeError):
            break
        if record.get("settings_digest") != digest or info.first_document != next_document:
            break
        try:
            verify_shard(directory, info, "checksum")
        except CorruptShardError:
            break
        kept.append(info)
        next_document += info.num_documents
    return kept


def _remove_stale(directory: Path, keep: int) -> None:
    """Deletes temporary files and shards/sidecars numbered `keep` or later."""
    for path in directory.iterdir():
        name = path.name
        if ".tmp-" in name:
            path.unlink()
        elif name.startswith("shard-") and int(name[6:11]) >= keep:
            path.unlink()


def _stream_batches(
    source: DocumentSource, tokenizer: Tokenizer, start: int, batch_documents: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, per-document stream lengths) of consecutive document batches from `start`; every
    document contributes its ids followed by EOS."""
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    for begin in range(start, len(source), batch_documents):
        encoded = tokenizer.encode_batch(source.read(begin, min(begin + batch_documents, len(source))))
        lengths = np.array([e.size + 1 for e in encoded], dtype=np.int64)
        tokens = np.concatenate([piece for ids in encoded for piece in (ids, eos)])
        if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
            bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
            raise ValueError(
                f"tokenizer produced ids outside 0..{tokenizer.vocab_size - 1} (e.g. {bad}) for "
                f"documents {begin}..{begin + len(encoded) - 1}"
            )
        yield tokens, lengths


def prepare_dataset(
    source: DocumentSource,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_documents: int = 512,
    progress: bool = True,
    verify: Literal["size", "checksum"] = "size",
) -> Manifest:
    """Tokenizes every document of `source` into `out_dir` and returns the manifest.

    Shards close at the first document boundary at or after `shard_tokens` tokens; records hold
    `chunk_tokens` tokens. If `out_dir` already holds a finished preparation with the same
    settings, its shards are checked (`verify`) and its manifest returned without other work.
    """
    for name, value in (("chunk_tokens", chunk_tokens), ("shard_tokens", shard_tokens),
                        ("batch_documents", batch_documents)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    directory = Path(out_dir)
    settings = {"format_version": FORMAT_VERSION, "source": source.describe(),
                "tokenizer": tokenizer.describe(), "chunk_tokens": chunk_tokens,
                "shard_tokens": shard_tokens}
    if (directory / MANIFEST_NAME).is_file():
        manifest = read_manifest(directory)
        if manifest.settings != json.loads(json.dumps(settings)):
            changed = sorted(k for k in settings if manifest.settings.get(k) != settings[k])
            raise ValueError(
                f"{str(directory)!r} was prepared with different settings ({', '.join(changed)} "
                "differ); choose another out_dir or delete it"
            )
        for shard in manifest.shards:
            verify_shard(directory, shard, verify)
        return manifest
    if len(source) == 0:
        raise ValueError(f"empty corpus: source {json.dumps(source.describe())} has no documents")
    directory.mkdir(parents=True, exist_ok=True)
    digest = _settings_digest(settings)
    shards = _resumable_shards(directory, digest)
    _remove_stale(directory, keep=len(shards))
    dtype = token_dtype(tokenizer.vocab_size)
    next_document = sum(s.num_documents for s in shards)
    writer: _ShardWriter | None = None
    bar = tqdm(total=len(source), initial=next_document, unit="doc", disable=not progress,
               desc=f"prepare {directory.name}")
    for tokens, lengths in _stream_batches(source, tokenizer, next_document, batch_documents):
        ends = np.cumsum(lengths)  # [batch] stream end of each document within the batch
        done = 0  # documents of this batch already written
        while done < lengths.size:
            if writer is None:
                writer = _ShardWriter(directory, len(shards), next_document, chunk_tokens, dtype)
            offset = int(ends[done - 1]) if done else 0
            room = shard_tokens - writer.num_tokens
            # The shard closes after the first document whose end reaches `room`.
            reach = int(np.searchsorted(ends[done:] - offset, room, side="left"))
            take = min(reach + 1, lengths.size - done)
            writer.add(tokens[offset:int(ends[done + take - 1])], take)
            done += take
            next_document += take
            if writer.num_tokens >= shard_tokens:
                shards.append(writer.finish(digest))
                writer = None
        bar.update(int(lengths.size))
    bar.close()
    if writer is not None:
        shards.append(writer.finish(digest))
    manifest = Manifest(
        format_version=FORMAT_VERSION, settings=json.loads(json.dumps(settings)), dtype=dtype.name,
        chunk_tokens=chunk_tokens, num_documents=next_document,
        num_tokens=sum(s.num_tokens for s in shards), shards=tuple(shards))
    write_atomic(directory / MANIFEST_NAME, manifest.to_json().encode())
    return manifest
