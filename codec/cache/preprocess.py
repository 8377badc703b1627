"""Image -> the pixels that get encoded: a center crop to R x R, or the aspect-ratio bucket closest to the image.

Buckets have an area of about R * R and sides that are multiples of `step` (itself a multiple of the codec's
downsampling factor, so no latent is padded). Each image is scaled to cover its bucket, then center-cropped.
What was done is returned with the pixels: the bucket, the original size (after EXIF orientation) and the crop,
both as a box in the original image and as SDXL's `crops_coords_top_left` in the resized image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

# PIL's filters by the names a manifest records. Lanczos is what SimpleTuner resizes with; bicubic is our default.
RESAMPLE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor  # (3, H, W) uint8: 4x smaller than floats to pass from DataLoader workers
    bucket: tuple[int, int]  # (H, W) of the pixels
    original_size: tuple[int, int]  # (H, W) of the image after EXIF orientation
    crop_box: tuple[float, float, float, float]  # (left, top, right, bottom) in the original image
    crop_top_left: tuple[int, int]  # (top, left) in the image resized to cover the bucket (SDXL conditioning)


MAX_RESOLUTION = 16384  # pixels a side; a bucket of 16384x16384 is already 268 million pixels


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(H, W) pairs with sides multiples of `step`, H * W <= resolution ** 2, aspect at most `max_aspect`.

    For each width the tallest height that fits the area is taken, then for each height the widest width (so
    256 x 832 is dropped beside 256 x 1024): every bucket is close to R * R pixels.
    """
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than the bucket step {step}")
    area = resolution * resolution
    widest: dict[int, int] = {}
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            widest[height] = max(width, widest.get(height, 0))
    return sorted({pair for height, width in widest.items() for pair in ((height, width), (width, height))})


DEFAULT_BUCKET_STEP = 64
DEFAULT_MAX_ASPECT = 4.0


@dataclass(frozen=True)
class Preprocessing:
    """How images become pixels; recorded in the manifest, and a cache refuses to mix two of them."""

    resolution: int
    buckets: bool = False
    bucket_step: int = DEFAULT_BUCKET_STEP
    max_aspect: float = DEFAULT_MAX_ASPECT
    flip: bool = False  # also encode the mirrored image (stored beside the original, for flip augmentation)
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # larger images are skipped before decoding
    resample: str = "bicubic"
    bucket_list: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # One type per setting: the record is hashed as JSON, where 2 and 2.0 differ although they compare equal,
        # and a cache made through the Python API must be the same cache when the CLI (floats) resumes it.
        for name, kind in (("resolution", int), ("bucket_step", int), ("max_pixels", int), ("max_aspect", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if not 1 <= self.resolution <= MAX_RESOLUTION:  # beyond: a typo that would allocate without end
            raise ValueError(f"--resolution must be from 1 to {MAX_RESOLUTION}, got {self.resolution}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"--resample must be one of {', '.join(RESAMPLE_FILTERS)}, got {self.resample!r}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.buckets:
            if not self.max_aspect >= 1:  # NaN too
                raise ValueError(f"--max-aspect must be at least 1, got {self.max_aspect}")
            if self.bucket_step < 1:
                raise ValueError(f"--bucket-step must be positive, got {self.bucket_step}")
            object.__setattr__(
                self, "bucket_list", tuple(make_buckets(self.resolution, self.bucket_step, self.max_aspect))
            )
        else:
            # They change nothing without buckets, so every such cache records the defaults: one made with other
            # values is not another preprocessing (the CLI refuses the flags without --buckets: a forgotten one).
            object.__setattr__(self, "bucket_step", DEFAULT_BUCKET_STEP)
            object.__setattr__(self, "max_aspect", DEFAULT_MAX_ASPECT)
            object.__setattr__(self, "bucket_list", ((self.resolution, self.resolution),))

    def check_factor(self, factor: int) -> None:
        """Sides must be multiples of the codec's factor: a padded latent would encode pixels that are not there."""
        unit, name = (self.bucket_step, "--bucket-step") if self.buckets else (self.resolution, "--resolution")
        if unit % factor:
            raise ValueError(f"{name} {unit} is not a multiple of the codec's downsampling factor {factor}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["bucket_list"] = [list(b) for b in self.bucket_list]
        return data

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        """The bucket whose aspect ratio is closest (in log scale) to the image's; ties go to the larger area."""
        if len(self.bucket_list) == 1:
            return self.bucket_list[0]
        aspect = math.log(width / height)
        return min(self.bucket_list, key=lambda b: (abs(math.log(b[1] / b[0]) - aspect), -b[0] * b[1]))

    def __call__(self, image: Image.Image) -> Prepared:
        """An RGB image -> its bucket's pixels: scaled to cover the bucket, then center-cropped."""
        width, height = image.size
        bucket_h, bucket_w = self.bucket_for(width, height)
        scale = max(bucket_w / width, bucket_h / height)
        scaled_w, scaled_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
        left, top = (scaled_w - bucket_w) // 2, (scaled_h - bucket_h) // 2
        box = (left / scale, top / scale, min(width, (left + bucket_w) / scale), min(height, (top + bucket_h) / scale))
        # Only the crop is resampled (PIL filters over the box's whole footprint): a 6000x4000 photo costs an
        # R x R resize, not a full-size one.
        crop = image.resize((bucket_w, bucket_h), RESAMPLE_FILTERS[self.resample], box=box)
        pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return Prepared(pixels, (bucket_h, bucket_w), (height, width), box, (top, left))


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], as codec.images.image_to_tensor makes them."""
    return pixels.float().div_(127.5).sub_(1.0)
