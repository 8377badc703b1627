"""codec.images: every file mode loads as RGB, unreadable files raise ImageError naming the file, and the
image <-> tensor conversions are exact."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from codec.images import (
    ImageError,
    image_to_tensor,
    images_to_tensor,
    list_images,
    load_image,
    tensor_to_pil,
    tensor_to_uint8,
)


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# ---- modes ------------------------------------------------------------------------------------------------


def test_rgba_transparency_composited_over_white(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent: the colour must vanish under white
    rgba[1, 1] = (200, 40, 60, 255)  # opaque: keeps its colour
    rgba[2, 2] = (0, 0, 0, 128)  # half-transparent black over white: about mid grey
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = _rgb(load_image(path))
    assert out.shape == (4, 6, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [200, 40, 60]
    assert np.all(np.abs(out[2, 2].astype(int) - 127) <= 1)
    assert out[3, 5].tolist() == [255, 255, 255]  # zero alpha elsewhere too


def test_la_mode(tmp_path):
    la = np.zeros((3, 3, 2), dtype=np.uint8)
    la[..., 0] = 40
    la[0, 0, 1] = 255  # opaque grey 40
    la[1, 1, 1] = 0  # transparent -> white
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    assert Image.open(path).mode == "LA"
    out = _rgb(load_image(path))
    assert out[0, 0].tolist() == [40, 40, 40]
    assert out[1, 1].tolist() == [255, 255, 255]


def test_palette_mode(tmp_path):
    image = Image.new("P", (5, 4))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.putpixel((0, 0), 1)
    image.putpixel((4, 3), 2)
    path = tmp_path / "palette.png"
    image.save(path)
    assert Image.open(path).mode == "P"
    out = _rgb(load_image(path))
    assert out.shape == (4, 5, 3)
    assert out[0, 0].tolist() == [0, 255, 0]
    assert out[3, 4].tolist() == [0, 0, 255]
    assert out[1, 1].tolist() == [255, 0, 0]


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (5, 4))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.putpixel((2, 2), 1)
    image.info["transparency"] = 0  # index 0 (red, the background) is transparent
    path = tmp_path / "palette_t.png"
    image.save(path, transparency=0)
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = _rgb(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent red -> white
    assert out[2, 2].tolist() == [0, 255, 0]


def test_gif_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 10, 10, 200, 100, 0] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    path = tmp_path / "t.gif"
    image.save(path, transparency=0)
    out = _rgb(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [200, 100, 0]


def test_16bit_grayscale_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768, 0], [257, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    out = _rgb(load_image(path))
    assert out.shape == (2, 3, 3)
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 0] == out[..., 2])
    assert out[0, 0, 0] == 255
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[0, 2, 0] == 0
    assert out[1, 0, 0] == 1  # 257 / 65535 * 255 = 1
    assert out[1, 2, 0] == 4  # 1000 / 65535 * 255 = 3.9


def test_dark_16bit_png_still_scaled_as_16_bit(tmp_path):
    # A 16-bit file whose values all happen to be <= 255 is still 16-bit: nearly black, not bright.
    path = tmp_path / "dark16.png"
    Image.fromarray(np.array([[200, 100]], dtype=np.uint16)).save(path)
    out = _rgb(load_image(path))
    assert out[..., 0].tolist() == [[1, 0]]


def test_grayscale_l(tmp_path):
    gray = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, "L").save(path)
    out = _rgb(load_image(path))
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    out = _rgb(load_image(path)).astype(int)
    assert out.shape == (8, 16, 3)
    assert np.all(np.abs(out - [255, 0, 0]) <= 6), out[0, 0]


def test_exif_orientation_applied(tmp_path):
    # Stored 40 wide, 20 tall: left half red, right half blue. Orientation 6 displays it rotated 90 degrees
    # clockwise, so the shown image is 20 wide, 40 tall, with the red half on top.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=95)
    assert Image.open(path).size == (40, 20)
    image = load_image(path)
    assert image.size == (20, 40)
    out = _rgb(image).astype(int)
    assert np.all(np.abs(out[2:16] - [255, 0, 0]) <= 20)
    assert np.all(np.abs(out[24:38] - [0, 0, 255]) <= 20)
    # The tensor path sees the same upright image, and applying the orientation twice does nothing more.
    assert image_to_tensor(path).shape == (1, 3, 40, 20)
    torch.testing.assert_close(image_to_tensor(path), image_to_tensor(Image.open(path)), rtol=0, atol=0)
    torch.testing.assert_close(image_to_tensor(path), image_to_tensor(image), rtol=0, atol=0)


# ---- errors -----------------------------------------------------------------------------------------------


def _raises_naming(path: Path):
    return pytest.raises(ImageError, match=re.escape(str(path)))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with _raises_naming(path):
        load_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    with _raises_naming(path):
        load_image(path)


def test_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(_random_rgb(64, 64)).save(full)
    data = full.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with _raises_naming(path):
        load_image(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "missing.png"
    with _raises_naming(path):
        load_image(path)
    with _raises_naming(path):
        image_to_tensor(path)


def test_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100), "white").save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with _raises_naming(path):  # 10000 pixels: over twice the limit, PIL's error
        load_image(path)


def test_decompression_bomb_warning_range_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (40, 40), "white").save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with _raises_naming(path):  # 1600 pixels: between the limit and twice it, PIL only warns
        load_image(path)


def test_bad_arrays_raise_image_error():
    with pytest.raises(ImageError):
        image_to_tensor(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ImageError):
        image_to_tensor(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ImageError):
        image_to_tensor(12345)


# ---- tensors ----------------------------------------------------------------------------------------------


def test_image_to_tensor_from_path_pil_and_array(tmp_path):
    array = _random_rgb(24, 40, seed=3)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    from_path = image_to_tensor(path)
    from_str = image_to_tensor(str(path))
    from_pil = image_to_tensor(Image.fromarray(array))
    from_array = image_to_tensor(array)
    assert from_path.shape == (1, 3, 24, 40)
    assert from_path.dtype == torch.float32
    assert from_path.min() >= -1.0 and from_path.max() <= 1.0
    for other in (from_str, from_pil, from_array):
        assert torch.equal(from_path, other)
    # The mapping is the affine one: 0 -> -1, 255 -> 1, and channel c of pixel (y, x) lands at [0, c, y, x].
    expected = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    torch.testing.assert_close(from_path[0], expected, rtol=0, atol=1e-6)
    assert image_to_tensor(np.zeros((2, 2, 3), np.uint8)).eq(-1).all()
    assert image_to_tensor(np.full((2, 2, 3), 255, np.uint8)).eq(1).all()


def test_uint8_roundtrip_exact():
    array = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256  # every level in every channel
    array = array.astype(np.uint8)
    for image in (array, _random_rgb(17, 23, seed=5)):
        recovered = tensor_to_uint8(image_to_tensor(image))
        assert recovered.shape == (1, *image.shape) and recovered.dtype == np.uint8
        np.testing.assert_array_equal(recovered[0], image)
        np.testing.assert_array_equal(np.asarray(tensor_to_pil(image_to_tensor(image))[0]), image)


def test_tensor_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, 1.0 / 127.5 - 1.0 + 0.003]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = tensor_to_uint8(x)
    assert out.shape == (1, 1, 6, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 1]


def test_images_to_tensor_batches_and_rejects_mixed_sizes():
    a, b = _random_rgb(8, 12, seed=1), _random_rgb(8, 12, seed=2)
    batch = images_to_tensor([a, b])
    assert batch.shape == (2, 3, 8, 12)
    assert torch.equal(batch[1:], image_to_tensor(b))
    with pytest.raises(ImageError, match="different sizes"):
        images_to_tensor([a, _random_rgb(12, 8)])


def test_list_images(tmp_path):
    files = ["b.png", "a/c.jpg", "a/d/e.WEBP", "a/d/f.tiff", "z.bmp", "notes.txt", "a/meta.json", "a/d/.hidden"]
    for name in files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory with an image suffix is not an image
    found = list_images(tmp_path)
    assert found == sorted(found)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/c.jpg",
        "a/d/e.WEBP",
        "a/d/f.tiff",
        "b.png",
        "z.bmp",
    ]
    assert list_images(tmp_path / "a" / "d") == [tmp_path / "a/d/e.WEBP", tmp_path / "a/d/f.tiff"]
