"""Images in and out: files, PIL images and uint8 arrays to model tensors in [-1, 1], and back.

Every loader returns RGB with the EXIF orientation applied, whatever the file's mode: transparency is
composited over white (as viewers show it), 16-bit and float images are scaled to 8 bits, CMYK and palette
images are converted. A file that cannot be read raises ImageError naming the file and the reason.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from codec.scan import scan_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class ImageError(ValueError):
    """An image that cannot be decoded or used; the message names the file and the reason."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, with EXIF orientation applied and transparency over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float grey: PIL's convert("L") clips instead of scaling, so scale by the range explicitly.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            peak = 1.0
        image = Image.fromarray(np.clip(np.rint(array / peak * 255.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; raise ImageError with the file name and the reason."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: the file is empty")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now, so a truncated file fails here and not later inside a batch
                return to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied; make the file readable by this user") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path}: too many pixels, refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: cannot decode the image, perhaps truncated or corrupt ({error})") from None


def _as_array(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return np.array(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"expected a uint8 array, got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ImageError(f"expected an (H, W, 3) uint8 array, got shape {image.shape}")
        return image[:, :, :3]
    raise ImageError(f"cannot make an image of a {type(image).__name__}")


def image_to_tensor(image: str | os.PathLike | Image.Image | np.ndarray) -> torch.Tensor:
    """One image (path, PIL image or HxWx3 uint8 array) -> (1, 3, H, W) float32 in [-1, 1]."""
    array = _as_array(image)
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
    return (tensor / 127.5 - 1.0).unsqueeze(0)


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """Same-size images -> (B, 3, H, W) float32 in [-1, 1]."""
    tensors = [image_to_tensor(image) for image in images]
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        raise ImageError(f"images of different sizes cannot share a batch: {sorted(sizes)}")
    return torch.cat(tensors)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded to the nearest level (what a PNG stores)."""
    x = x.detach().float().clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(array) for array in tensor_to_uint8(x)]


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under a folder, recursively (through linked folders too), in a stable sorted order."""
    return scan_folder(root, IMAGE_SUFFIXES).files


def read_image_list_lines(path: str | os.PathLike) -> list[tuple[int, str, Path]]:
    """The image paths a .txt list names, one a line, each with its line number and the line as written
    (stripped: for keys and for messages that point at a line). Blank lines and # comments are skipped; relative
    lines are relative to the list's folder. Existence is checked when an image is loaded, not here: stat-ing a
    long list on a network disk before any work starts would be slow."""
    path = Path(path)
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            # An absolute line replaces the folder; normpath folds "../" so messages name the file plainly.
            entries.append((number, line, Path(os.path.normpath(path.parent / Path(line).expanduser()))))
    return entries
