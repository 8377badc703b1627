"""`LatentStream`: the map-style reader's items, split across ranks and workers, resumable, local or fsspec; and
`datasets` streaming a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cache_testing import build, image_folder, tiny_model_dir

import codec
from codec.cache.shards import CacheError

# Tall, square and wide images, so buckets (R 32, step 16) differ.
SIZES = [(32, 32), (64, 24), (32, 32), (24, 64), (36, 36), (64, 20), (32, 30), (20, 64), (40, 40), (32, 33), (48, 16)]
SIZES += [(32, 32), (64, 24), (24, 64), (32, 32), (40, 40), (64, 20), (20, 64), (32, 32)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, codec.AutoencoderKL]:
    root = tmp_path_factory.mktemp("stream_cache")
    model_dir = tiny_model_dir(root / "model")
    folder = image_folder(root / "images", SIZES)
    (folder / "img002.txt").write_text("two")
    build(folder, root / "out", model_dir, buckets=True, bucket_step=16, flip=True, shard_size=4)
    return root / "out", codec.AutoencoderKL.load(model_dir)


def batches_of(iterable) -> list[dict]:
    return [dict(batch) for batch in iterable]


def keys(batches: list[dict]) -> list[list[str]]:
    return [list(batch["key"]) for batch in batches]


def assert_same_as_map_style(batches: list[dict], dataset: codec.LatentDataset) -> None:
    index = {key: i for i, key in enumerate(dataset.keys)}
    for batch in batches:
        assert len({tuple(b) for b in batch["bucket"].tolist()}) == 1  # one bucket per batch
        for j, key in enumerate(batch["key"]):
            item = dataset[index[key]]
            assert torch.equal(batch["latents"][j], item["latents"]), key
            assert bool(batch["flipped"][j]) == item["flipped"] and batch["caption"][j] == item["caption"]
            for name in ("bucket", "original_size", "crop_top_left", "crop_box"):
                assert torch.equal(batch[name][j], item[name]), (key, name)


def test_the_stream_gives_the_map_style_readers_items(cache):
    out, vae = cache
    stream = codec.LatentStream(out, codec=vae, batch_size=2, seed=3, shuffle_buffer=4)
    dataset = codec.LatentDataset(out, codec=vae, seed=3)
    for epoch in range(2):
        assert stream.epoch == epoch  # a finished pass moves on to the next epoch
        dataset.set_epoch(epoch)
        batches = batches_of(stream)
        assert sorted(k for batch in keys(batches) for k in batch) == sorted(dataset.keys)
        assert_same_as_map_style(batches, dataset)
        assert sum(len(b) < 2 for b in keys(batches)) <= len(dataset.buckets)  # a remainder per bucket, at the end
    stream.set_epoch(0)
    assert keys(batches_of(stream)) != keys(batches)  # epochs are shuffled differently
    unshuffled = codec.LatentStream(out, codec=vae, batch_size=50, shuffle=False, flip=False, posterior="mean")
    assert [k for batch in keys(batches_of(unshuffled)) for k in batch] == sorted(
        dataset.keys, key=lambda k: (tuple(dataset[dataset.keys.index(k)]["bucket"].tolist()), k)
    )  # no shuffling: each bucket's items in cache order, buckets in order


def test_ranks_and_workers_split_the_epoch_disjointly_and_evenly(cache):
    out, vae = cache
    dataset = codec.LatentDataset(out, codec=vae, seed=1)
    # 19 items, 3 buckets: 9 a rank, 3 full batches of 2 each is sure of; 19 // 3 // 2 = 3 batches of 1 a worker.
    for world, workers, batch_size, steps in ((2, 0, 2, 3), (3, 2, 1, 6)):
        ranks = [
            codec.LatentStream(out, codec=vae, batch_size=batch_size, rank=r, world_size=world, seed=1)
            for r in range(world)
        ]
        per_rank = [batches_of(stream.loader(num_workers=workers)) for stream in ranks]
        taken = [k for batches in per_rank for batch in keys(batches) for k in batch]
        assert len(taken) == len(set(taken))  # no item on two ranks or two workers
        assert [len(batches) for batches in per_rank] == [steps] * world  # the same steps on every rank
        assert all(len(batch) == batch_size for batches in per_rank for batch in keys(batches))  # full batches
        assert_same_as_map_style([b for batches in per_rank for b in batches], dataset)
    # Without evening out, every item is read once: split across ranks and workers, nothing left out.
    uneven = [
        codec.LatentStream(out, codec=vae, batch_size=2, rank=r, world_size=2, even_batches=False) for r in range(2)
    ]
    everything = [k for s in uneven for batch in keys(batches_of(s.loader(num_workers=2))) for k in batch]
    assert len(set(everything)) == len(everything) == len(dataset) // 2 * 2  # all but the odd item out


def test_the_rank_and_world_come_from_the_launcher(cache, monkeypatch):
    out, vae = cache
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = codec.LatentStream(out, codec=vae, batch_size=2)
    assert (stream.rank, stream.world_size, stream.even_batches) == (1, 2, True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    with pytest.raises(ValueError, match=r"built for 2 process.*but 4 now run"):
        next(iter(stream))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_where_it_stopped(cache, workers):
    out, vae = cache

    def stream():
        return codec.LatentStream(out, codec=vae, batch_size=2, seed=7, shuffle_buffer=5)

    whole = batches_of(stream().loader(num_workers=workers))
    for stop in (1, 4, len(whole) - 1):  # early, in the middle, and among the final remainders
        first = stream()
        loader = first.loader(num_workers=workers)
        taken = []
        for batch in loader:
            taken.append(batch)
            if len(taken) == stop:
                break
        state = first.state_dict()
        assert state["epoch"] == 0 and state["samples"] == sum(len(b["key"]) for b in taken)
        resumed = stream()
        resumed.load_state_dict(state)
        rest = batches_of(resumed.loader(num_workers=workers))
        assert keys(taken + rest) == keys(whole)
        assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(taken + rest, whole, strict=True))
        assert resumed.state_dict()["epoch"] == 1
        # Broken off and iterated again in the same process, the epoch goes on too.
        assert keys(taken + batches_of(loader)) == keys(whole)


def test_resuming_mid_epoch_with_other_settings_is_refused(cache):
    out, vae = cache
    stream = codec.LatentStream(out, codec=vae, batch_size=2)
    loader = stream.loader(num_workers=2)
    next(iter(loader))
    state = stream.state_dict()
    with pytest.raises(ValueError, match=r"cannot resume epoch 0 mid-way with other settings \(batch_size 2 -> 3"):
        codec.LatentStream(out, codec=vae, batch_size=3).load_state_dict(state)
    other = codec.LatentStream(out, codec=vae, batch_size=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"read by 2 DataLoader worker\(s\) and is resumed with 1"):
        next(iter(other.loader(num_workers=0)))
    other.set_epoch(1)  # a new epoch may start with any number of workers
    assert batches_of(other.loader(num_workers=0))
    with pytest.raises(TypeError, match="the stream batches, shuffles and collates itself"):
        stream.loader(batch_size=4)


def test_the_stream_reads_a_cache_through_fsspec(cache):
    fsspec = pytest.importorskip("fsspec")
    out, vae = cache
    memory = fsspec.filesystem("memory")
    memory.put(str(out), "/copied-cache", recursive=True)
    try:
        local = batches_of(codec.LatentStream(out, codec=vae, batch_size=3, seed=2))
        remote = batches_of(codec.LatentStream("memory://copied-cache", codec=vae, batch_size=3, seed=2))
        assert keys(remote) == keys(local)
        assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(remote, local, strict=True))
        mapped = codec.LatentDataset("memory://copied-cache", codec=vae, seed=2)
        assert_same_as_map_style(remote, mapped)
        with pytest.raises(CacheError, match="memory://nowhere: no such cache folder"):
            codec.LatentStream("memory://nowhere", codec=vae, batch_size=2)
    finally:
        memory.rm("/copied-cache", recursive=True)


def test_datasets_streams_a_cache(cache, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = cache
    streamed = datasets.load_dataset(
        "parquet", data_files=str(out / "data" / "*.parquet"), split="train", streaming=True, cache_dir=str(tmp_path)
    )
    rows = list(streamed)
    stored = [row for path in sorted((out / "data").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert [row["key"] for row in rows] == [row["key"] for row in stored] and len(rows) == len(SIZES)
    captions = {row["key"]: row["caption"] for row in rows}  # files are read in name order, not key order
    assert captions["img002.png"] == "two" and captions["img000.png"] is None
    first = rows[5]
    assert np.array_equal(np.asarray(first["mean"], np.float32), np.asarray(stored[5]["mean"], np.float32))
    assert len(first["mean"]) == int(np.prod(first["shape"]))


def test_bf16_latents_stream_as_the_map_style_reader_gives_them(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    build(
        image_folder(tmp_path / "images", [(32, 32), (40, 32), (32, 40)]),
        tmp_path / "bf16",
        model_dir,
        latent_dtype="bf16",
    )
    vae = codec.AutoencoderKL.load(model_dir)
    batches = batches_of(codec.LatentStream(tmp_path / "bf16", codec=vae, batch_size=1))
    dataset = codec.LatentDataset(tmp_path / "bf16", codec=vae)
    index = {key: i for i, key in enumerate(dataset.keys)}
    assert len(batches) == 3
    assert all(torch.equal(b["latents"][0], dataset[index[b["key"][0]]]["latents"]) for b in batches)


def test_persistent_workers_follow_the_epoch(cache):
    out, vae = cache
    stream = codec.LatentStream(out, codec=vae, batch_size=2, seed=4)
    loader = stream.loader(num_workers=2, persistent_workers=True)
    passes = [keys(batches_of(loader)) for _ in range(2)]
    fresh = codec.LatentStream(out, codec=vae, batch_size=2, seed=4)
    fresh.set_epoch(1)
    assert passes[1] == keys(batches_of(fresh.loader(num_workers=2))) != passes[0]
