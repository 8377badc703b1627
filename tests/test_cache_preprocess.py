"""Center crops and aspect-ratio buckets for `codec cache`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from codec.cache.preprocess import Preprocessing, make_buckets


def test_buckets_have_about_the_area_aligned_sides_and_bounded_aspect():
    buckets = make_buckets(512, 64, 4.0)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert 0.9 * 512 * 512 <= height * width <= 512 * 512
        assert max(height / width, width / height) <= 4.0
        assert (width, height) in buckets
    assert make_buckets(512, 64, 1.0) == [(512, 512)]


@pytest.mark.parametrize(("width", "height"), [(1000, 500), (300, 900), (640, 480), (500, 500)])
def test_an_image_goes_to_the_bucket_closest_in_aspect(width, height):
    prep = Preprocessing(512, buckets=True)
    bucket_h, bucket_w = prep.bucket_for(width, height)
    error = abs(math.log(bucket_w / bucket_h) - math.log(width / height))
    assert all(error <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for h, w in prep.bucket_list)
    prepared = prep(Image.new("RGB", (width, height)))
    assert prepared.pixels.shape == (3, bucket_h, bucket_w) and prepared.bucket == (bucket_h, bucket_w)


def test_center_crop_is_exact_at_scale_one_and_records_what_it_did():
    array = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    prepared = Preprocessing(32)(Image.fromarray(array))
    np.testing.assert_array_equal(prepared.pixels.permute(1, 2, 0).numpy(), array[:, 16:48])
    assert prepared.original_size == (32, 64) and prepared.crop_top_left == (0, 16)
    assert prepared.crop_box == (16.0, 0.0, 48.0, 32.0)
    small = Preprocessing(32)(Image.new("RGB", (16, 16), (10, 20, 30)))  # upscaled to cover
    assert small.crop_box == (0.0, 0.0, 16.0, 16.0) and small.pixels.shape == (3, 32, 32)


def test_the_recorded_resize_filter_is_the_one_used():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 80, 3), dtype=np.uint8))
    for name, pil_filter in (("bicubic", Image.Resampling.BICUBIC), ("lanczos", Image.Resampling.LANCZOS)):
        prepared = Preprocessing(32, resample=name)(image)
        expected = np.array(image.resize((32, 32), pil_filter, box=prepared.crop_box))
        np.testing.assert_array_equal(prepared.pixels.permute(1, 2, 0).numpy(), expected)
    with pytest.raises(ValueError, match="--resample must be one of bicubic, lanczos, bilinear, box, got 'cubic'"):
        Preprocessing(32, resample="cubic")


def test_sizes_must_be_multiples_of_the_codec_factor():
    with pytest.raises(ValueError, match="--resolution 36 is not a multiple"):
        Preprocessing(36).check_factor(8)
    with pytest.raises(ValueError, match="--bucket-step 12 is not a multiple"):
        Preprocessing(48, buckets=True, bucket_step=12).check_factor(8)
    with pytest.raises(ValueError, match="smaller than the bucket step"):
        Preprocessing(32, buckets=True)
    # Each had failed deep inside: a ZeroDivisionError, every image "unreadable", a machine-wide OOM kill.
    with pytest.raises(ValueError, match="--bucket-step must be positive"):
        Preprocessing(32, buckets=True, bucket_step=0)
    with pytest.raises(ValueError, match="--max-aspect must be at least 1, got nan"):
        Preprocessing(64, buckets=True, bucket_step=16, max_aspect=float("nan"))
    with pytest.raises(ValueError, match="--resolution must be from 1 to 16384"):
        Preprocessing(1_000_000)
    # Without buckets these change nothing, so they are recorded as the defaults whatever was given; a cache
    # recorded before that is the same preprocessing as a run without them.
    from codec.cache.shards import check_compatible

    assert Preprocessing(64, bucket_step=32, max_aspect=2.0) == Preprocessing(64)
    old = {"preprocessing": {**Preprocessing(64).to_dict(), "bucket_step": 32, "max_aspect": 2.0}}
    check_compatible(old, {"preprocessing": Preprocessing(64).to_dict()}, "cache")
    with pytest.raises(ValueError, match="bucket_step: cache has 32, this run has 16"):
        bucketed = {"preprocessing": {**Preprocessing(64, buckets=True, bucket_step=32).to_dict()}}
        check_compatible(bucketed, {"preprocessing": Preprocessing(64, buckets=True, bucket_step=16).to_dict()}, "c")
