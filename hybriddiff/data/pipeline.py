"""Grain input pipeline over a prepared token store: wrapped rows, shuffling, per-host sharding,
batching and global `jax.Array`s (DESIGN.md §6–7).

Rows are addressable by index: row `r` is the window `stream[r·c : (r+1)·c]` of the prepared
stream `doc_0 EOS doc_1 EOS …`, with `c = seq_len`, or `c = seq_len - 2` and the row framed as
`BOS window EOS` (BD3-LM's wrapping). The `num_tokens mod c` tokens after the last full row are
dropped and reported (`WrapStats.dropped_tokens`). Rows are dealt to hosts (`shard_count`
processes) before shuffling: host `h` owns rows `h, h + H, h + 2H, …` among the first
`H · floor(num_rows / H)`, so hosts stay in lockstep, never share a row, and the `< H` leftover rows
are reported (`WrapStats.dropped_rows`). Each host shuffles its rows with Grain's index shuffle
(a fresh permutation each epoch), so every epoch yields every owned row exactly once.

The pipeline is a `grain.MapDataset` of row-index batches mapped to token batches, turned into a
`grain.DatasetIterator` whose position is checkpointable: `DataPipeline.get_state()` /
`set_state()`, `save_state(path)` / `restore_state(path)` (JSON on disk), or inside the trainer's
Orbax checkpoint with `ocp.args.Composite(data=pipeline.checkpoint_save_args(), …)` on save and
`data=pipeline.checkpoint_restore_args()` on restore (Grain's `CheckpointHandler`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import chex
import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybriddiff.data.store import Manifest, TokenStore, write_atomic


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Typed settings of one input pipeline (validated on construction).

    `global_batch_size` rows per step over all hosts; `num_epochs=None` repeats forever.
    `drop_remainder`: with finite epochs, drop a last per-host batch smaller than the others.
    """

    data_dir: str
    seq_len: int
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    bos_eos_framing: bool = False
    drop_remainder: bool = True
    num_threads: int = 2
    prefetch_buffer_size: int = 8
    verify: Literal["size", "checksum"] = "size"

    def __post_init__(self) -> None:
        minimum = 3 if self.bos_eos_framing else 2
        if self.seq_len < minimum:
            raise ValueError(
                f"seq_len must be >= {minimum}"
                + (" with bos_eos_framing (BOS + at least one token + EOS)" if self.bos_eos_framing else "")
                + f"; got {self.seq_len}"
            )
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1; got {self.global_batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None; got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32); got {self.seed}")
        if self.num_threads < 0 or self.prefetch_buffer_size < 0:
            raise ValueError(
                f"num_threads and prefetch_buffer_size must be >= 0; got {self.num_threads}, "
                f"{self.prefetch_buffer_size}"
            )


def shuffle_seed(seed: int) -> int:
    """The Grain shuffle seed of a pipeline seed: a 32-bit hash of it. Grain reshuffles epoch
    ``e`` with ``shuffle_seed + e``, so hashing keeps run seed ``s``'s second epoch from being run
    seed ``s + 1``'s first (as the raw seed would)."""
    return int(np.random.SeedSequence((seed, 0x5EED)).generate_state(1, np.uint32)[0])


@dataclasses.dataclass(frozen=True)
class WrapStats:
    """How the token stream was cut into rows and dealt to hosts."""

    num_documents: int
    num_tokens: int
    seq_len: int
    content_len: int  # stream tokens per row (seq_len, or seq_len - 2 with BOS…EOS framing)
    num_rows: int
    dropped_tokens: int  # the tail of the stream that fills no row
    shard_index: int
    shard_count: int
    rows_per_shard: int
    dropped_rows: int  # rows left over when dealing rows evenly to shard_count hosts
    per_host_batch: int


class PackedRows:
    """Random-access rows of the wrapped token stream (a Grain `RandomAccessDataSource`)."""

    def __init__(self, store: TokenStore, seq_len: int, *, bos_eos_framing: bool = False) -> None:
        self.store = store
        self.seq_len = seq_len
        self.bos_eos_framing = bos_eos_framing
        self.content_len = seq_len - 2 if bos_eos_framing else seq_len
        if self.content_len < 1:
            raise ValueError(f"seq_len={seq_len} leaves no room for tokens (bos_eos_framing={bos_eos_framing})")
        self.num_rows = store.num_tokens // self.content_len
        self.dropped_tokens = store.num_tokens - self.num_rows * self.content_len

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Rows at `indices`, int32 `[n, seq_len]`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row index out of range for {self.num_rows} rows: {indices}")
        content = self.store.read(indices * self.content_len, self.content_len)  # [n, content_len]
        if not self.bos_eos_framing:
            return content
        manifest = self.store.manifest
        bos = np.full((indices.size, 1), manifest.bos_id, dtype=np.int32)
        eos = np.full((indices.size, 1), manifest.eos_id, dtype=np.int32)
        return np.concatenate([bos, content, eos], axis=1)  # [n, seq_len]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.rows([index])[0]


def _local_batch_shards(mesh: Mesh, batch_axes: tuple[str, ...]) -> tuple[int, int]:
    """(number of batch shards in the mesh, number of distinct batch shards on this process)."""
    axis_ids = [mesh.axis_names.index(a) for a in batch_axes]
    total = math.prod(mesh.devices.shape[i] for i in axis_ids)
    local = set()
    for coordinate, device in np.ndenumerate(mesh.devices):
        if device.process_index == jax.process_index():
            local.add(tuple(coordinate[i] for i in axis_ids))
    return total, len(local)


class DataPipeline:
    """Host batches from a prepared directory as Grain iterates them, optionally as global arrays.

    `next(pipeline)` returns int32 `[global_batch_size, seq_len]` `jax.Array`s sharded over
    `batch_axes` of `mesh` (built with `jax.make_array_from_process_local_data`), or this host's
    numpy `[per_host_batch, seq_len]` batch when `mesh` is None. `iterator` is the Grain iterator
    (numpy host batches) that the checkpoint helpers save and restore.
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        mesh: Mesh | None = None,
        batch_axes: tuple[str, ...] = ("data",),
        shard_options: grain.sharding.ShardOptions | None = None,
    ) -> None:
        shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
        index, count = int(shard.shard_index), int(shard.shard_count)
        if config.global_batch_size % count:
            raise ValueError(
                f"global_batch_size={config.global_batch_size} is not divisible by the number of "
                f"processes (shard_count={count})"
            )
        per_host = config.global_batch_size // count
        self._sharding: NamedSharding | None = None
        if mesh is not None:
            if count != jax.process_count() or index != jax.process_index():
                raise ValueError(
                    f"with a mesh, shard_index/shard_count must be jax.process_index()/process_count() "
                    f"({jax.process_index()}/{jax.process_count()}); got {index}/{count}"
                )
            missing = [a for a in batch_axes if a not in mesh.axis_names]
            if missing:
                raise ValueError(f"batch_axes {missing} are not axes of the mesh {mesh.axis_names}")
            total, local = _local_batch_shards(mesh, batch_axes)
            if config.global_batch_size % total or per_host % local:
                raise ValueError(
                    f"global_batch_size={config.global_batch_size} must be divisible by the number "
                    f"of processes × local devices along {batch_axes} ({count} × {local}) and by "
                    f"the {total} batch shards of the mesh"
                )
            self._sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
        self.config = config
        self.rows = PackedRows(TokenStore(config.data_dir, verify=config.verify), config.seq_len,
                               bos_eos_framing=config.bos_eos_framing)
        rows_per_shard = self.rows.num_rows // count
        if rows_per_shard == 0:
            raise ValueError(
                f"{config.data_dir!r} has {self.rows.num_rows} rows of seq_len={config.seq_len}, "
                f"fewer than shard_count={count}: nothing to read"
            )
        if config.num_epochs is not None and config.drop_remainder and rows_per_shard * config.num_epochs < per_host:
            raise ValueError(
                f"per-host batch {per_host} exceeds the {rows_per_shard * config.num_epochs} rows "
                f"this host reads in num_epochs={config.num_epochs}; lower global_batch_size"
            )
        manifest = self.rows.store.manifest
        self.stats = WrapStats(
            num_documents=manifest.num_documents, num_tokens=manifest.num_tokens,
            seq_len=config.seq_len, content_len=self.rows.content_len, num_rows=self.rows.num_rows,
            dropped_tokens=self.rows.dropped_tokens, shard_index=index, shard_count=count,
            rows_per_shard=rows_per_shard, dropped_rows=self.rows.num_rows - rows_per_shard * count,
            per_host_batch=per_host)
        indices = grain.MapDataset.range(rows_per_shard * count)[index::count]
        if config.shuffle:
            indices = indices.shuffle(seed=shuffle_seed(config.seed))
        indices = indices.repeat(config.num_epochs)
        batches = indices.batch(per_host, drop_remainder=config.drop_remainder)
        #: Host batches, int32 `[per_host_batch, seq_len]`, as a random-access Grain dataset.
        self.dataset: grain.MapDataset = batches.map(self.rows.rows)
        read = grain.ReadOptions(num_threads=config.num_threads,
                                 prefetch_buffer_size=config.prefetch_buffer_size)
        self.iterator: grain.DatasetIterator = iter(self.dataset.to_iter_dataset(read))

    @property
    def manifest(self) -> Manifest:
        """The prepared data's manifest (tokenizer ids and vocab_size: the model's V is N + 1)."""
        return self.rows.store.manifest

    def __iter__(self) -> DataPipeline:
        return self

    def next_host_batch(self) -> np.ndarray:
        """This host's next batch, int32 `[per_host_batch, seq_len]` (the last may be smaller
        when `drop_remainder=False` and epochs are finite)."""
        batch = next(self.iterator)
        chex.assert_rank(batch, 2)
        return batch

    def __next__(self) -> jax.Array | np.ndarray:
        batch = self.next_host_batch()
        if self._sharding is None:
            return batch
        global_shape = (batch.shape[0] * self.stats.shard_count, batch.shape[1])
        return jax.make_array_from_process_local_data(self._sharding, batch, global_shape)

    def get_state(self) -> dict[str, Any]:
        """The iterator position (JSON-able); restore it with `set_state`."""
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a position returned by `get_state` on a pipeline with the same config."""
        self.iterator.set_state(state)

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Writes `get_state()` and the settings it belongs to as JSON, atomically."""
        payload = {"state": self.get_state(), "config": dataclasses.asdict(self.config),
                   "shard": [self.stats.shard_index, self.stats.shard_count]}
        write_atomic(Path(path), json.dumps(payload, indent=2).encode())

    def restore_state(self, path: str | os.PathLike[str]) -> None:
        """Restores a position written by `save_state`; a different config or shard is an error."""
        payload = json.loads(Path(path).read_text())
        expected = json.loads(json.dumps(dataclasses.asdict(self.config)))
        if payload["config"] != expected:
            changed = sorted(k for k in expected if payload["config"].get(k) != expected[k])
            raise ValueError(f"saved data state in {str(path)!r} belongs to a different config ({changed} differ)")
        if payload["shard"] != [self.stats.shard_index, self.stats.shard_count]:
            raise ValueError(
                f"saved data state in {str(path)!r} is for shard {payload['shard']}, this pipeline is "
                f"shard {[self.stats.shard_index, self.stats.shard_count]}"
            )
        self.set_state(payload["state"])

    def checkpoint_save_args(self) -> Any:
        """Orbax args that save the iterator with Grain's handler (one JSON file per process)."""
        return grain.checkpoint.CheckpointSave(self.iterator)

    def checkpoint_restore_args(self) -> Any:
        """Orbax args that restore the iterator in place with Grain's handler."""
        return grain.checkpoint.CheckpointRestore(self.iterator)


def make_pipeline(
    data_dir: str | os.PathLike[str],
    *,
    seq_len: int,
    global_batch_size: int,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = ("data",),
    shard_options: grain.sharding.ShardOptions | None = None,
    **options: Any,
) -> DataPipeline:
    """`DataPipeline(PipelineConfig(data_dir, seq_len, global_batch_size, **options), …)`."""
    config = PipelineConfig(data_dir=str(data_dir), seq_len=seq_len,
                            global_batch_size=global_batch_size, **options)
    return DataPipeline(config, mesh=mesh, batch_axes=batch_axes, shard_options=shard_options)
