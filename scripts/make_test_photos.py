"""Write the small training photos in tests/data/photos/ from scikit-image's bundled sample images.

    python scripts/make_test_photos.py

Run once; the outputs are committed test fixtures (see tests/data/photos/README.md for sources and licences).
Needs scikit-image (the `test` extra). Kodak images are never used: they are the evaluation set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "photos"

# name -> (output file, crop box as fractions (left, top, right, bottom) of the source, output size (w, h)).
# Mixed formats, sizes and orientations (and one grayscale) so the loader's resize/crop paths all get used.
PHOTOS = {
    "astronaut": ("astronaut.jpg", (0.0, 0.0, 1.0, 1.0), (128, 128)),
    "coffee": ("coffee.jpg", (0.0, 0.0, 1.0, 1.0), (160, 107)),
    "chelsea": ("chelsea.png", (0.05, 0.0, 0.95, 1.0), (120, 88)),
    "rocket": ("rocket.jpg", (0.25, 0.0, 0.75, 1.0), (96, 128)),
    "camera": ("camera.png", (0.1, 0.0, 0.9, 0.8), (112, 96)),  # 8-bit grey: exercises the RGB conversion
    "retina": ("retina.jpg", (0.1, 0.1, 0.9, 0.9), (96, 96)),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (filename, (left, top, right, bottom), size) in PHOTOS.items():
        array = np.asarray(getattr(skimage.data, name)())
        image = Image.fromarray(array)
        width, height = image.size
        box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
        image = image.crop(box).resize(size, Image.Resampling.LANCZOS)
        path = OUT / filename
        if path.suffix == ".jpg":
            image.save(path, quality=85, optimize=True)
        else:
            image.save(path, optimize=True)
        print(f"{path.relative_to(OUT.parent.parent.parent)}: {image.mode} {image.size}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
