"""`LatentDataset` and `BucketBatchSampler`: identity checks, scaling, sampling, flips, buckets across ranks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cache_testing import build, image_folder, perturbed_copy, shard_files, shard_keys, tiny_model_dir
from PIL import Image, ImageOps

import codec
from codec.cache.preprocess import Preprocessing, to_model_input
from codec.cache.shards import CacheError
from codec.cache.verify import verify_cache
from codec.images import load_image

# Tall, square and wide images, so buckets (R 32, step 16) differ: (64, 16)...(16, 64).
SIZES = [(32, 32), (64, 24), (32, 32), (24, 64), (36, 36), (64, 20), (32, 30), (20, 64), (40, 40), (32, 33), (48, 16)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("read_model"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, model_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("read_cache")
    folder = image_folder(root / "images", SIZES)
    (folder / "img002.txt").write_text("two")
    build(folder, root / "out", model_dir, buckets=True, bucket_step=16, flip=True, shard_size=3)
    return root / "out", folder


def test_import_codec_stays_light():
    code = "import codec, sys; print([m for m in ('diffusers','datasets','lpips','accelerate','pyarrow') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert codec.LatentDataset.__name__ == "LatentDataset" and codec.BucketBatchSampler.__name__ == "BucketBatchSampler"
    assert codec.LatentStream.__name__ == "LatentStream" and codec.cache.LatentStream is codec.LatentStream


def test_refuses_a_cache_made_with_other_weights(cache, model_dir, tmp_path):
    out, _ = cache
    other = codec.AutoencoderKL.load(perturbed_copy(model_dir, tmp_path / "other"))
    with pytest.raises(CacheError, match=r"encoded with codec sha256-encoder:.*but the codec given is sha256-encoder:"):
        codec.LatentDataset(out, codec=other)
    with pytest.raises(CacheError, match="encoded with codec"):
        codec.LatentDataset(out, codec="sha256:0000")
    vae = codec.AutoencoderKL.load(model_dir)
    identity = codec.LatentDataset(out, codec=vae).manifest["codec"]["identity"]
    assert len(codec.LatentDataset(out, codec=identity)) == len(SIZES)
    # The same weights held in half precision by a trainer are the same codec.
    assert len(codec.LatentDataset(out, codec=codec.AutoencoderKL.load(model_dir).half())) == len(SIZES)


def test_a_decoder_only_fine_tune_reads_the_same_cache(cache, model_dir, tmp_path):
    # sd-vae-ft-mse is SD's VAE with only its decoder fine-tuned: it makes the same latents, bit for bit.
    out, _ = cache
    tuned = codec.AutoencoderKL.load(perturbed_copy(model_dir, tmp_path / "tuned", part="decoder"))
    assert len(codec.LatentDataset(out, codec=tuned)) == len(SIZES)
    assert verify_cache(out, tuned).ok


def test_what_a_trainer_may_pass_or_get_wrong(cache, model_dir, tmp_path):
    import diffusers

    out, _ = cache
    theirs = diffusers.AutoencoderKL.from_pretrained(model_dir)  # diffusers' own model: the same codec
    dataset = codec.LatentDataset(out, codec=theirs, columns="caption")  # one column, named as a string
    assert len(dataset) == len(SIZES) and dataset[2]["caption"] == "two"
    with pytest.raises(ValueError, match=r"codec='builtin': a string here is an identity.*AutoencoderKL\.load"):
        codec.LatentDataset(out, codec="builtin")
    with pytest.raises(CacheError, match="no such cache folder"):
        codec.LatentDataset(tmp_path / "nowhere", codec=theirs)
    with pytest.raises(CacheError, match=r"\['original_size'\]: every item has these already.*\['caption'\]"):
        codec.LatentDataset(out, codec=theirs, columns=["caption", "original_size"])
    items = [dataset[i] for i in range(len(SIZES))]
    mixed = [items[0], next(item for item in items if item["latents"].shape != items[0]["latents"].shape)]
    with pytest.raises(CacheError, match=r"a batch mixes latent shapes.*accelerator\.prepare"):
        codec.LatentDataset.collate(mixed)
    assert dataset[-1]["key"] == dataset[len(dataset) - 1]["key"]


def test_a_sampler_built_before_the_process_group_refuses_to_run(cache, model_dir, monkeypatch):
    out, _ = cache
    sampler = codec.BucketBatchSampler(codec.LatentDataset(out, codec=None), batch_size=2)  # world 1 at this point
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match=r"built for 1 process.*but 2 now run"):
        list(sampler)


def test_mean_latents_are_the_scaled_encoding_of_the_preprocessed_image(cache, model_dir):
    out, folder = cache
    vae = codec.AutoencoderKL.load(model_dir)
    dataset = codec.LatentDataset(out, codec=vae, posterior="mean", flip=False, scaling_factor=0.5, shift_factor=0.1)
    prep = Preprocessing(32, buckets=True, bucket_step=16)
    for index in (1, 3, 4):
        item = dataset[index]
        prepared = prep(load_image(folder / item["key"]))
        with torch.no_grad():
            expected = (vae.encode(to_model_input(prepared.pixels[None])).latent_dist.mean[0] - 0.1) * 0.5
        torch.testing.assert_close(item["latents"], expected, atol=2e-3, rtol=2e-3)  # stored in fp16
        assert tuple(item["bucket"].tolist()) == prepared.bucket and item["flipped"] is False
        assert tuple(item["original_size"].tolist()) == prepared.original_size
    assert dataset[2]["caption"] == "two" and dataset[0]["caption"] is None


def test_per_channel_statistics_and_the_scaling_factor_apply_together(cache, model_dir):
    """As diffusers' SDXL pipelines: (z - latents_mean) * scaling_factor / latents_std. Playground v2.5 has
    scaling 0.5 beside its statistics; a reader that dropped the factor would give latents twice too large."""
    out, _ = cache
    vae = codec.AutoencoderKL.load(model_dir)
    plain = codec.LatentDataset(out, codec=vae, posterior="mean", flip=False, scaling_factor=1.0, shift_factor=0.0)
    mean, std = (0.1, -0.2, 0.3, 0.0), (1.5, 0.5, 2.0, 1.0)
    vae.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=0.5)
    channel = codec.LatentDataset(out, codec=vae, posterior="mean", flip=False)
    view = (-1, 1, 1)
    for index in (0, 3):
        z = plain[index]["latents"]
        expected = (z - torch.tensor(mean).view(view)) * 0.5 / torch.tensor(std).view(view)
        torch.testing.assert_close(channel[index]["latents"], expected)


def test_samples_are_seeded_per_epoch_and_flips_are_the_mirrored_images_latents(cache, model_dir):
    out, _ = cache
    vae = codec.AutoencoderKL.load(model_dir)
    dataset = codec.LatentDataset(out, codec=vae, seed=3)
    first = [dataset[i]["latents"] for i in range(len(dataset))]
    assert all(torch.equal(a, dataset[i]["latents"]) for i, a in enumerate(first))
    dataset.set_epoch(1)
    assert not any(torch.equal(a, dataset[i]["latents"]) for i, a in enumerate(first))
    flips = [dataset[i]["flipped"] for i in range(len(dataset))]
    assert 0 < sum(flips) < len(flips)
    means = codec.LatentDataset(out, codec=vae, posterior="mean", seed=3)
    means.set_epoch(1)
    plain = codec.LatentDataset(out, codec=vae, posterior="mean", flip=False)
    for i, flipped in enumerate(flips):
        # Sampling noise is small next to the latents, but flips differ from the original by much more.
        assert means[i]["flipped"] == flipped
        if flipped:
            assert not torch.allclose(means[i]["latents"], plain[i]["latents"], atol=1e-2)


def test_a_flipped_items_crop_is_where_the_crop_lies_in_the_mirrored_image(cache, model_dir):
    out, folder = cache
    vae = codec.AutoencoderKL.load(model_dir)
    flipping, plain = codec.LatentDataset(out, codec=vae, seed=3), codec.LatentDataset(out, codec=vae, flip=False)
    flipped = [i for i in range(len(plain)) if flipping[i]["flipped"]]
    assert flipped
    for i in flipped:
        item, original = flipping[i], plain[i]
        height, width = original["original_size"].tolist()
        (bucket_h, bucket_w), (left, top, right, bottom) = original["bucket"].tolist(), original["crop_box"].tolist()
        assert item["crop_box"].tolist() == pytest.approx([width - right, top, width - left, bottom])
        # The mirrored image, cut at the mirrored box, is the mirror of the pixels that were encoded.
        image = load_image(folder / item["key"])
        mirrored = np.asarray(
            ImageOps.mirror(image).resize((bucket_w, bucket_h), Image.BICUBIC, box=item["crop_box"].tolist())
        )
        cropped = np.asarray(image.resize((bucket_w, bucket_h), Image.BICUBIC, box=(left, top, right, bottom)))
        assert np.abs(mirrored.astype(int) - cropped[:, ::-1].astype(int)).max() <= 1
        scale = max(bucket_w / width, bucket_h / height)  # as Preprocessing resizes to cover the bucket
        covered_width = max(bucket_w, round(width * scale))
        crop_top, crop_left = original["crop_top_left"].tolist()
        assert item["crop_top_left"].tolist() == [crop_top, covered_width - bucket_w - crop_left]


def test_bucket_batches_are_single_bucket_seeded_and_split_disjointly_across_ranks(cache, model_dir):
    out, _ = cache
    dataset = codec.LatentDataset(out, codec=codec.AutoencoderKL.load(model_dir))
    assert len(dataset.buckets) >= 3
    sampler = codec.BucketBatchSampler(dataset, batch_size=2, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
    assert all(len({dataset.bucket_ids[i] for i in batch}) == 1 for batch in batches)
    assert batches == list(codec.BucketBatchSampler(dataset, batch_size=2, seed=5))
    sampler.set_epoch(1)
    epoch_one = list(sampler)
    assert epoch_one != batches
    sampler.set_epoch(1, skip=2)  # a run resumed after two batches of epoch 1: the rest, then whole epochs
    assert len(sampler) == len(epoch_one) - 2 and list(sampler) == epoch_one[2:]
    assert list(sampler) == epoch_one

    ranks = [list(codec.BucketBatchSampler(dataset, 2, seed=5, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # every rank runs the same number of steps
    seen = [i for r in ranks for batch in r for i in batch]
    assert len(seen) == len(set(seen)) and all(len(batch) == 2 for r in ranks for batch in r)
    padded = [list(codec.BucketBatchSampler(dataset, 2, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert len({len(r) for r in padded}) == 1
    assert {i for r in padded for batch in r for i in batch} == set(range(len(dataset)))

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=codec.LatentDataset.collate)
    batch = next(iter(loader))
    assert batch["latents"].dim() == 4 and batch["latents"].shape[0] == len(batch["key"])
    assert batch["flipped"].dtype == torch.bool


def recording_block_reads(monkeypatch) -> list:
    """(shard file name, latent columns) of every block the reader reads from now on."""
    from codec.cache import reader

    reads, real_read = [], reader.read_block
    monkeypatch.setattr(
        reader,
        "read_block",
        lambda location, relative, group, names, *a: (
            reads.append((Path(relative).name, list(names))) or real_read(location, relative, group, names, *a)
        ),
    )
    return reads


def test_a_bounded_shard_cache_is_read_a_window_of_shards_at_a_time(cache, model_dir, monkeypatch):
    out, _ = cache  # 11 items in blocks of about 3
    dataset = codec.LatentDataset(out, codec=codec.AutoencoderKL.load(model_dir), max_cached_shards=1)
    reads = recording_block_reads(monkeypatch)
    sampler = codec.BucketBatchSampler(dataset, batch_size=2, seed=5)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches = list(sampler)
        # The same items, and as many batches, as without windows: a bucket's remainder joins the next window.
        assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
        unwindowed = codec.BucketBatchSampler(codec.LatentDataset(out, codec=None, max_cached_bytes=None), 2, seed=5)
        unwindowed.set_epoch(epoch)
        assert len(batches) == len(unwindowed)
        before = len(reads)
        for batch in batches:
            dataset.collate([dataset[i] for i in batch])
            assert len(dataset._cache) == 1
        # Each shard read once per epoch, its window's batches coming together; a batch that completes a bucket
        # with items carried from an earlier window may read their shard once more. Shuffled across all shards,
        # nearly every batch had read one.
        mixed = sum(len({int(dataset._block_of[i]) for i in batch}) > 1 for batch in batches)
        assert len(reads) - before <= len(shard_files(out)) + mixed
    assert set(reads[0][1]) == {"mean", "logvar", "flip_mean", "flip_logvar"}
    plain = codec.LatentDataset(out, codec=None, posterior="mean", flip=False)
    plain[0]
    assert reads[-1][1] == ["mean"]  # what a mean, unflipped reader needs, and no more


def test_by_default_a_process_keeps_a_bounded_number_of_bytes_of_latents(cache, model_dir, monkeypatch):
    out, _ = cache
    vae = codec.AutoencoderKL.load(model_dir)
    files = shard_files(out)
    assert len(files) > 2
    values = [sum(len(r) for r in pq.read_table(p, columns=["mean"]).column("mean").to_pylist()) for p in files]
    largest = max(values) * 2 * 4  # the largest shard's latents: fp16, 4 columns
    small = codec.LatentDataset(out, codec=vae, max_cached_bytes=2 * largest)
    assert small.max_cached_shards == 2
    assert codec.LatentDataset(out, codec=vae, max_cached_bytes=1).max_cached_shards == 1  # one block at least
    assert codec.LatentDataset(out, codec=vae).max_cached_shards is None  # all of it fits in the default
    assert codec.BucketBatchSampler(small, batch_size=2).window_shards == 2
    reads = recording_block_reads(monkeypatch)
    starts = np.cumsum([0, *[len(shard_keys(p)) for p in files]])
    order = (0, 1, 2, 0, 1, 2, 0)  # each shard read again once two others came since
    for shard in order:
        small[int(starts[shard])]
        assert len(small._cache) <= 2
    assert [name for name, _ in reads] == [files[shard].name for shard in order]
    unbounded = codec.LatentDataset(out, codec=vae, max_cached_bytes=None)
    for index in range(len(unbounded)):
        unbounded[index]
    assert len(unbounded._cache) == len(files) and unbounded.max_cached_shards is None


def test_row_groups_are_read_one_at_a_time(cache, model_dir, tmp_path, monkeypatch):
    """A shard written in several row groups is cached by row group: the budget bounds memory even where one
    shard alone exceeds it."""
    out, _ = cache
    copy = tmp_path / "grouped"
    shutil.copytree(out, copy)
    for path in sorted((copy / "data").glob("*.parquet")):
        table = pq.read_table(path)  # the footer record travels in the schema's metadata
        pq.write_table(table, path, row_group_size=2)
    vae = codec.AutoencoderKL.load(model_dir)
    whole = codec.LatentDataset(out, codec=vae, posterior="mean")
    grouped = codec.LatentDataset(copy, codec=vae, posterior="mean", max_cached_bytes=1)
    groups = sum(-(-len(shard_keys(path)) // 2) for path in shard_files(out))  # row groups of 2 rows
    assert len(grouped._blocks) == groups > len(shard_files(out)) and grouped.max_cached_shards == 1
    expected = [whole[index] for index in range(len(whole))]
    reads = recording_block_reads(monkeypatch)
    for index, a in enumerate(expected):
        b = grouped[index]
        assert a["key"] == b["key"] and a["flipped"] == b["flipped"] and torch.equal(a["latents"], b["latents"])
        assert a.get("caption") == b.get("caption") and torch.equal(a["crop_box"], b["crop_box"])
    assert len(reads) == groups


def test_plain_labels_bf16_storage_and_an_incomplete_cache(tmp_path, model_dir):
    sampler = codec.BucketBatchSampler(["a", "b", "a", "a", "b"], batch_size=2, shuffle=False)
    assert list(sampler) == [[0, 2], [3], [1, 4]]
    folder = image_folder(tmp_path / "images", [(32, 32), (40, 32), (32, 40)])
    build(folder, tmp_path / "bf16", model_dir, latent_dtype="bf16")
    build(folder, tmp_path / "fp16", model_dir)
    vae = codec.AutoencoderKL.load(model_dir)
    a = codec.LatentDataset(tmp_path / "bf16", codec=vae, posterior="mean")
    b = codec.LatentDataset(tmp_path / "fp16", codec=vae, posterior="mean")
    for i in range(3):
        torch.testing.assert_close(a[i]["latents"], b[i]["latents"], atol=2e-2, rtol=1e-2)
    manifest = tmp_path / "fp16" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(CacheError, match="incomplete"):
        codec.LatentDataset(tmp_path / "fp16", codec=vae)
    assert np.isfinite(a[0]["latents"].numpy()).all()


def test_large_shards_are_written_in_row_groups_a_reader_can_hold(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from codec.cache import shards

    values = np.zeros((40, 1 << 20), dtype=np.uint8)  # 40 rows of 1 MiB: 40 MiB, over one row group's budget
    table = pa.table({"key": [f"{i:03d}" for i in range(40)], "mean": list(values)})
    path = shards.write_shard(tmp_path, 0, table, {"shard": 0})
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_rows == 40 and metadata.num_row_groups == 2
    assert shards.read_shard_meta(path) == {"shard": 0}
