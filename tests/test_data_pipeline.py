"""Wrapping, sharding, shuffling, batching, global arrays and resumable state of the Grain pipeline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybriddiff.data.pipeline import PackedRows, PipelineConfig, make_pipeline
from hybriddiff.data.prepare import prepare_dataset
from data_helpers import ListSource
from hybriddiff.data.store import TokenStore
from hybriddiff.data.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
EOS = ByteTokenizer().eos_id
BOS = ByteTokenizer().bos_id


def reference_stream(texts: list[str]) -> list[int]:
    """The documents' bytes, each followed by EOS, built with plain Python."""
    stream: list[int] = []
    for text in texts:
        stream.extend(text.encode("utf-8"))
        stream.append(EOS)
    return stream


def reference_rows(stream: list[int], seq_len: int, framing: bool) -> list[tuple[int, ...]]:
    width = seq_len - 2 if framing else seq_len
    rows = []
    for r in range(len(stream) // width):
        window = stream[r * width:(r + 1) * width]
        rows.append(tuple([BOS] + window + [EOS] if framing else window))
    return rows


def epoch_rows(data_dir: Path, seq_len: int, framing: bool, hosts: int, host: int, **options: object) -> list[tuple[int, ...]]:
    pipeline = make_pipeline(data_dir, seq_len=seq_len, global_batch_size=hosts, bos_eos_framing=framing,
                             shard_options=grain.sharding.ShardOptions(host, hosts), drop_remainder=False,
                             num_threads=0, **options)
    return [tuple(row) for batch in pipeline.iterator for row in batch.tolist()]


@settings(max_examples=20, deadline=None)
@given(
    texts=st.lists(st.text(max_size=25), min_size=1, max_size=10),
    seq_len=st.integers(3, 20),
    framing=st.booleans(),
    chunk_tokens=st.integers(1, 9),
    shard_tokens=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
)
def test_nothing_lost_or_duplicated_across_rows_epochs_and_hosts(
    texts: list[str], seq_len: int, framing: bool, chunk_tokens: int, shard_tokens: int, seed: int
) -> None:
    stream = reference_stream(texts)
    expected = reference_rows(stream, seq_len, framing)
    width = seq_len - 2 if framing else seq_len
    with tempfile.TemporaryDirectory() as directory:
        data_dir = Path(directory)
        prepare_dataset(ListSource(texts), ByteTokenizer(), data_dir, chunk_tokens=chunk_tokens,
                        shard_tokens=shard_tokens, batch_documents=3, progress=False)
        for hosts in (1, 2, 4):
            kept = len(expected) // hosts * hosts
            if kept == 0:
                with pytest.raises(ValueError, match=f"fewer than shard_count={hosts}"):
                    epoch_rows(data_dir, seq_len, framing, hosts, 0, num_epochs=1)
                continue
            ordered = [epoch_rows(data_dir, seq_len, framing, hosts, h, num_epochs=1, shuffle=False)
                       for h in range(hosts)]
            # Host h holds global rows h, h + H, …: interleaving them rebuilds the stream in order.
            interleaved = [ordered[r % hosts][r // hosts] for r in range(kept)]
            contents = [token for row in interleaved for token in (row[1:-1] if framing else row)]
            assert contents == stream[:kept * width]
            stats = make_pipeline(data_dir, seq_len=seq_len, global_batch_size=hosts, bos_eos_framing=framing,
                                  shard_options=grain.sharding.ShardOptions(0, hosts)).stats
            assert stats.dropped_tokens == len(stream) - len(expected) * width
            assert stats.dropped_rows == len(expected) - kept
            assert stats.num_rows * width + stats.dropped_tokens == len(stream) == stats.num_tokens
            # Shuffled, two epochs: every epoch is exactly the kept rows, hosts disjoint.
            shuffled = [epoch_rows(data_dir, seq_len, framing, hosts, h, num_epochs=2, shuffle=True, seed=seed)
                        for h in range(hosts)]
            per_host = kept // hosts
            for epoch in range(2):
                seen = Counter(row for rows in shuffled for row in rows[epoch * per_host:(epoch + 1) * per_host])
                assert seen == Counter(expected[:kept])
            for h in range(hosts):
                assert Counter(shuffled[h][:per_host]) == Counter(ordered[h])


def test_neighbouring_seeds_do_not_share_epochs(prepared: Path) -> None:
    """Grain reshuffles epoch e with (shuffle seed + e); with the raw seed, run seed s's second
    epoch would be run seed s + 1's first. The pipeline hashes the seed first."""
    def order(seed: int, epochs: int) -> list[tuple[int, ...]]:
        pipeline = make_pipeline(prepared, seq_len=16, global_batch_size=1, seed=seed,
                                 num_epochs=epochs, num_threads=0)
        return [tuple(row) for batch in pipeline.iterator for row in batch.tolist()]

    two = order(5, 2)
    half = len(two) // 2
    assert sorted(two[:half]) == sorted(two[half:])  # both epochs are every row once
    assert two[half:] != order(6, 1) and two[:half] != order(6, 1)
    assert two[half:] != two[:half]  # and the second epoch is reshuffled


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(300)]
    directory = tmp_path_factory.mktemp("prepared")
    prepare_dataset(ListSource(texts), ByteTokenizer(), directory, chunk_tokens=256, shard_tokens=4000,
                    progress=False)
    return directory


def test_same_seed_same_batches_other_seed_differs(prepared: Path) -> None:
    def batches(seed: int) -> list[np.ndarray]:
        pipeline = make_pipeline(prepared, seq_len=32, global_batch_size=8, seed=seed)
        return [next(pipeline) for _ in range(5)]

    first, again, other = batches(7), batches(7), batches(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


RESUME_CHILD = """
import json, sys
import numpy as np
import orbax.checkpoint as ocp
from hybriddiff.data.pipeline import make_pipeline
data_dir, checkpoint_dir, state_file, out_file, count = sys.argv[1:6]
options = dict(seq_len=32, global_batch_size=8, seed=11, bos_eos_framing=True)
from_orbax = make_pipeline(data_dir, **options)
manager = ocp.CheckpointManager(checkpoint_dir)
manager.restore(manager.latest_step(), args=ocp.args.Composite(data=from_orbax.checkpoint_restore_args()))
from_json = make_pipeline(data_dir, **options)
from_json.restore_state(state_file)
np.savez(out_file, orbax=np.stack([next(from_orbax) for _ in range(int(count))]),
         json=np.stack([next(from_json) for _ in range(int(count))]))
"""


def test_resume_in_a_new_process_continues_identically(prepared: Path, tmp_path: Path) -> None:
    import orbax.checkpoint as ocp

    options = dict(seq_len=32, global_batch_size=8, seed=11, bos_eos_framing=True)
    uninterrupted = make_pipeline(prepared, **options)
    reference = [next(uninterrupted) for _ in range(9)]
    interrupted = make_pipeline(prepared, **options)
    for _ in range(5):
        next(interrupted)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    manager.save(5, args=ocp.args.Composite(data=interrupted.checkpoint_save_args()))
    manager.wait_until_finished()
    interrupted.save_state(tmp_path / "data_state.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        [sys.executable, "-c", RESUME_CHILD, str(prepared), str(tmp_path / "checkpoints"),
         str(tmp_path / "data_state.json"), str(tmp_path / "out.npz"), "4"],
        check=True, env=env, cwd=tmp_path, timeout=120)
    resumed = np.load(tmp_path / "out.npz")
    assert np.array_equal(resumed["orbax"], np.stack(reference[5:]))
    assert np.array_equal(resumed["json"], np.stack(reference[5:]))
    assert np.all(resumed["json"][:, :, 0] == BOS) and np.all(resumed["json"][:, :, -1] == EOS)


def test_restore_state_rejects_other_config_or_shard(prepared: Path, tmp_path: Path) -> None:
    pipeline = make_pipeline(prepared, seq_len=32, global_batch_size=8, seed=1)
    pipeline.save_state(tmp_path / "state.json")
    with pytest.raises(ValueError, match="different config \\(\\['seed'\\] differ\\)"):
        make_pipeline(prepared, seq_len=32, global_batch_size=8, seed=2).restore_state(tmp_path / "state.json")
    other_shard = make_pipeline(prepared, seq_len=32, global_batch_size=8, seed=1,
                                shard_options=grain.sharding.ShardOptions(1, 2))
    with pytest.raises(ValueError, match="is for shard \\[0, 1\\]"):
        other_shard.restore_state(tmp_path / "state.json")


def test_global_arrays_on_a_mesh(prepared: Path) -> None:
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    on_mesh = make_pipeline(prepared, seq_len=32, global_batch_size=16, seed=3, mesh=mesh)
    on_host = make_pipeline(prepared, seq_len=32, global_batch_size=16, seed=3)
    for _ in range(2):
        array, host = next(on_mesh), next(on_host)
        assert isinstance(array, jax.Array) and array.shape == (16, 32) and array.dtype == np.int32
        assert array.sharding.spec == jax.sharding.PartitionSpec(("data",))
        assert len(array.addressable_shards) == jax.device_count()
        assert array.addressable_shards[1].data.shape == (16 // jax.device_count(), 32)
        np.testing.assert_array_equal(np.asarray(array), host)


def test_bad_pipeline_arguments(prepared: Path) -> None:
    with pytest.raises(ValueError, match="seq_len must be >= 2; got 1"):
        make_pipeline(prepared, seq_len=1, global_batch_size=4)
    with pytest.raises(ValueError, match="seq_len must be >= 3 with bos_eos_framing"):
        make_pipeline(prepared, seq_len=2, global_batch_size=4, bos_eos_framing=True)
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by the number of processes \\(shard_count=4\\)"):
        make_pipeline(prepared, seq_len=16, global_batch_size=6, shard_options=grain.sharding.ShardOptions(0, 4))
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    with pytest.raises(ValueError, match="global_batch_size=12 must be divisible by the number of processes × local devices"):
        make_pipeline(prepared, seq_len=16, global_batch_size=12, mesh=mesh)
    with pytest.raises(ValueError, match="batch_axes \\['fsdp'\\] are not axes"):
        make_pipeline(prepared, seq_len=16, global_batch_size=16, mesh=mesh, batch_axes=("fsdp",))
    with pytest.raises(ValueError, match="with a mesh, shard_index/shard_count"):
        make_pipeline(prepared, seq_len=16, global_batch_size=16, mesh=mesh,
                      shard_options=grain.sharding.ShardOptions(1, 2))
    with pytest.raises(ValueError, match="num_epochs must be >= 1 or None; got 0"):
        PipelineConfig(data_dir=str(prepared), seq_len=8, global_batch_size=2, num_epochs=0)
    with pytest.raises(ValueError, match="seed must lie in"):
        PipelineConfig(data_dir=str(prepared), seq_len=8, global_batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="per-host batch 100000 exceeds"):
        make_pipeline(prepared, seq_len=16, global_batch_size=100_000, num_epochs=1)


@pytest.mark.parametrize("options, message", [
    ({"global_batch_size": 0}, r"global_batch_size must be >= 1; got 0"),
    ({"seed": 2**32}, r"seed must lie in \[0, 2\*\*32\); got 4294967296"),
    ({"num_threads": -1}, r"num_threads and prefetch_buffer_size must be >= 0; got -1, 8"),
    ({"prefetch_buffer_size": -2}, r"num_threads and prefetch_buffer_size must be >= 0; got 2, -2"),
])
def test_pipeline_config_names_the_bad_value(options: dict[str, int], message: str) -> None:
    """Every rejected setting is reported with the value it was given."""
    settings = {"seq_len": 8, "global_batch_size": 2, **options}
    with pytest.raises(ValueError, match=message):
        PipelineConfig(data_dir="unused", **settings)


def test_fewer_rows_than_hosts_names_the_directory_and_counts(tmp_path: Path) -> None:
    """The document "abc" + EOS fills one row of 4 tokens: two hosts would get nothing to read."""
    prepare_dataset(ListSource(["abc"]), ByteTokenizer(), tmp_path, progress=False)
    with pytest.raises(ValueError, match=re.escape(f"{str(tmp_path)!r} has 1 rows of seq_len=4, "
                                                   "fewer than shard_count=2")):
        make_pipeline(tmp_path, seq_len=4, global_batch_size=2,
                      shard_options=grain.sharding.ShardOptions(0, 2))


def test_packed_rows_name_a_seq_len_without_room_and_out_of_range_rows(prepared: Path) -> None:
    """PackedRows used directly (PipelineConfig would refuse seq_len=2 first)."""
    store = TokenStore(prepared)
    with pytest.raises(ValueError, match=r"seq_len=2 leaves no room for tokens \(bos_eos_framing=True\)"):
        PackedRows(store, 2, bos_eos_framing=True)
    rows = PackedRows(store, 16)
    count = len(rows)
    with pytest.raises(IndexError, match=rf"row index out of range for {count} rows: \[-1\]"):
        rows.rows([-1])
    with pytest.raises(IndexError, match=rf"row index out of range for {count} rows: \[ *0 +{count}\]"):
        rows.rows([0, count])
    with pytest.raises(IndexError, match=rf"for {count} rows: \[{count}\]"):
        rows[count]
