"""Build an offline, documented training set of PNG crops for a small VAE (see docs/training-data.md).

    python scripts/prepare_training_data.py --crop 256 --crops-per-image 16 --generated 8

Sources, and nothing else: the photos shipped inside scikit-image and scikit-learn (never pooch downloads), the Debian
packages gnome-backgrounds and mate-backgrounds (`apt-get download` into --cache, unpacked with `dpkg-deb -x`, never
installed), and procedurally generated images. Kodak and every other evaluation set stay out. Whole source images are
held out into the validation folder, so validation never shares a photo (or a light/dark variant of it) with training.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from codec.atomic import atomic_path, atomic_write_text
from codec.images import ImageError, load_image

PACKAGES = ("gnome-backgrounds", "mate-backgrounds")
RASTER = (".jpg", ".jpeg", ".png", ".webp", ".jxl", ".tif", ".tiff", ".gif", ".bmp")
# Flat graphics (logos, transparent overlays, silhouettes) have long runs of identical pixels and few colours; photos
# and rendered scenes do not. Checked against every image in the sources above.
MAX_FLAT, MIN_COLOURS, MIN_GREY_LEVELS = 0.70, 4096, 128
# Looked at by eye: these pass the numeric test but are not photographic. Keyed by source id.
EXCLUDE = {
    "skimage-color": "synthetic colour wheel, not a photograph",
    "mate-MATE-Stripes-Dark": "logo lettering on grey stripes, not a photograph",
    # codec demo's sample photos (codec/assets/samples): a demo must not show images the model trained on.
    "skimage-astronaut": "a codec demo sample photo, kept out of training",
    "skimage-coffee": "a codec demo sample photo, kept out of training",
    "skimage-chelsea": "a codec demo sample photo, kept out of training",
    # scikit-image states no licence for these; leave them out rather than guess.
    "skimage-moon": "no licence stated by scikit-image",
    "skimage-motorcycle_left": "no licence stated by scikit-image",
    "skimage-motorcycle_right": "no licence stated by scikit-image",
}
LICENCE_WORDS = re.compile(r"copyright|public domain|\bCC0\b|licen[cs]e", re.I)
LANCZOS = Image.Resampling.LANCZOS
JXL = importlib.util.find_spec("pillow_jxl") is not None  # its import registers a JPEG XL decoder with PIL


@dataclass
class Source:
    id: str
    origin: str  # skimage | sklearn | <Debian package> | generated
    path: str  # where it came from, as its package names it
    version: str
    licence: str
    licence_source: str
    file: Path | None = None  # None for generated images
    image: Image.Image | None = None
    group: str = ""
    split: str = "train"
    crops: list[str] = field(default_factory=list)

    def record(self) -> dict:
        keys = ("id", "origin", "path", "version", "licence", "licence_source", "group", "split", "crops")
        return {"size": list(self.image.size)} | {k: getattr(self, k) for k in keys}


def rng_for(*key: object) -> np.random.Generator:
    """A generator fixed by its key alone, so a source's crops never depend on which other sources exist."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def fetch_package(name: str, cache: Path) -> tuple[Path, Path, str]:
    """Download the .deb once (a cached one is reused, so reruns see the same bytes) and unpack it in the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    if not sorted(cache.glob(f"{name}_*.deb")):
        done = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"apt-get download {name} failed (run `apt-get update` first?): {done.stderr.strip()}")
    deb = sorted(cache.glob(f"{name}_*.deb"))[-1]
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True, check=True).stdout
    if not (cache / deb.stem / "usr").is_dir():
        subprocess.run(["dpkg-deb", "-x", deb, cache / deb.stem], check=True)
    return deb, cache / deb.stem, version.strip()


def licence_table(doc: Path) -> tuple[list[tuple[list[str], str, str]], str]:
    """[(file patterns, licence summary, file that says so)] from a package's doc folder, plus a fallback for files it
    does not list. mate-backgrounds has a DEP-5 copyright file; gnome-backgrounds has free-form "- name*:" lists in its
    copyright and AUTHORS files, and the copyright file's list is stale (it names files the package no longer ships)."""
    text = (doc / "copyright").read_text(errors="replace")
    entries: list[tuple[list[str], str, str]] = []
    if text.startswith("Format:"):
        for stanza in re.split(r"\n\s*\n", text):
            files = re.search(r"^Files:(.*(?:\n[ \t]+\S.*)*)", stanza, re.M)
            lic, who = re.search(r"^License:\s*(.+)", stanza, re.M), re.search(r"^Copyright:\s*(.+)", stanza, re.M)
            if files and lic:  # DEP-5: the last matching stanza wins, so later ones go first
                entries.insert(0, (files[1].split(), f"{lic[1]}; Copyright {who[1] if who else '?'}", "copyright"))
        return entries, next((s for p, s, _ in entries if p == ["*"]), "not listed in the copyright file")
    for where in ("copyright", "AUTHORS"):  # the copyright file's entries come first, so they win
        names: list[str] = []
        holders: list[str] = []
        for line in (doc / where).read_text(errors="replace").splitlines() if (doc / where).is_file() else []:
            if m := re.fullmatch(r"\s*-?\s*([\w.*-]*[.*][\w.*-]*):?\s*", line):  # "- adwaita*:" or "oceans.svg:"
                names, holders = ([] if holders else names) + [m[1]], []
            elif "Copyright" in line and names:
                holders.append(line.strip())
            elif (m := re.search(r"Licen[cs]ed under (.+?)\.?$|^\s*(CC[ -].+?)\.?$", line)) and names:
                entries.append((names, "; ".join([m[1] or m[2], *holders]), where))
                names, holders = [], []
    found = sorted(set(re.findall(r"GNU General Public License|Creative Commons [\w-]+ \d\.\d", text)))
    return entries, "not listed per file; the package's copyright file names " + ", ".join(found)


def debian_sources(cache: Path, packages: dict, skipped: list) -> list[Source]:
    out = []
    for name in PACKAGES:
        deb, root, version = fetch_package(name, cache)
        packages[name] = {"version": version, "deb": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
        table, fallback = licence_table(root / "usr/share/doc" / name)
        for file in sorted((root / "usr/share/backgrounds").rglob("*")):
            rel = "/" + str(file.relative_to(root))
            if file.suffix.lower() == ".svg":
                skipped.append((rel, "SVG (vector) is not rasterised"))
            elif file.suffix.lower() in RASTER:
                hits = [(s, w) for p, s, w in table if any(fnmatch.fnmatch(rel.lower(), f"*/{q.lower()}") for q in p)]
                licence, where = hits[0] if hits else (fallback, "copyright")
                ident = f"{name.split('-')[0]}-{file.stem}"
                out.append(Source(ident, name, rel, version, licence, f"/usr/share/doc/{name}/{where}", file))
    return out


def bundled_sources() -> list[Source]:
    """Images shipped inside the installed scikit-image and scikit-learn wheels; licences from their own docs."""
    import skimage
    import skimage.data

    docs = {}  # file -> the licence sentences of the skimage.data function that loads it
    for fn in (getattr(skimage.data, n) for n in dir(skimage.data) if not n.startswith("_")):
        try:
            code = inspect.getsource(fn)
        except (TypeError, OSError):
            continue
        doc = re.sub(r"\n\s*Returns\n\s*-+\n.*?(?=\n\s*\w+\n\s*-+\n|$)", "", fn.__doc__ or "", flags=re.S)
        doc = re.sub(r"\n\s*\w+\n\s*-+\n|\.\. \w+::", " ", doc)  # numpydoc headers and directives
        sentences = re.split(r"(?<=\.)\s+", re.sub(r"\s+", " ", doc))
        for name in re.findall(r"[\"']data/([\w.-]+)[\"']", code):
            docs[name] = " ".join(s for s in sentences if LICENCE_WORDS.search(s)) or "not stated in scikit-image"
    out = []
    for f in sorted(Path(skimage.data.__file__).parent.iterdir()):
        if f.suffix.lower() in RASTER:
            licence = docs.get(f.name, "not stated in scikit-image")
            out.append(Source(f"skimage-{f.stem}", "skimage", f"skimage/data/{f.name}", skimage.__version__, licence,
                              "scikit-image's skimage.data docstring", f))  # fmt: skip
    folder = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets/images"  # found without the 2 s import
    readme = (folder / "README.txt").read_text()
    blocks = {b.split()[1]: b.split("\n", 1)[1] for b in re.split(r"\n\s*\n(?=Image:)", readme.strip())}
    for f in sorted(folder.glob("*.jpg")):
        text, *refs = re.split(r"\n(?=\[\d+\] )", blocks.get(f.name, "not stated"))
        for ref in refs:  # "[1]" -> "(https://...)"
            text = text.replace(ref.split()[0], f"({ref.split()[1]})")
        licence = re.sub(r"\s+", " ", text).strip()
        out.append(Source(f"sklearn-{f.stem}", "sklearn", f"sklearn/datasets/images/{f.name}",
                          importlib.metadata.version("scikit-learn"), licence, "sklearn/datasets/images/README.txt", f))  # fmt: skip
    return out


def generate(index: int, seed: int, size: int) -> Image.Image:
    """A gradient with 1/f noise under anti-aliased shapes filled with flat colour, stripes or noise: the hard edges
    and fine texture that wallpapers lack, with nobody's rights attached."""
    rng = rng_for(seed, "generated", index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size))).clip(1 / size)

    def noise(exponent: float) -> np.ndarray:  # unit-variance noise whose power falls as 1/f**exponent
        field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) / freq ** (exponent / 2)).real
        return ((field - field.mean()) / field.std())[..., None]

    angle, (c0, c1) = rng.uniform(0, 2 * np.pi), rng.uniform(0, 255, (2, 3))
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    image = c0 + (c1 - c0) * ((ramp - ramp.min()) / np.ptp(ramp))[..., None]
    image += rng.uniform(5, 30) * noise(rng.uniform(1, 3)) * rng.uniform(0.3, 1, 3)
    for _ in range(rng.integers(4, 16)):
        mask = Image.new("L", (2 * size, 2 * size))  # drawn at 2x and reduced, for anti-aliased edges
        draw, kind = ImageDraw.Draw(mask), rng.integers(4)
        x0, x1, y0, y1 = np.sort(rng.uniform(-0.1, 1.1, (2, 2)) * 2 * size, axis=1).ravel()
        points = [tuple(p) for p in rng.uniform(0, 2 * size, (rng.integers(3, 7) if kind == 2 else 2, 2))]
        if kind < 2:
            (draw.ellipse, draw.rectangle)[kind]((x0, y0, x1, y1), fill=255)
        else:
            draw.polygon(points, fill=255) if kind == 2 else draw.line(points, fill=255, width=int(rng.integers(2, 40)))
        alpha = np.asarray(mask.resize((size, size), LANCZOS), dtype=np.float64)[..., None] / 255
        colour, fill = rng.uniform(0, 255, 3), rng.integers(3)
        if fill == 1:  # stripes; clipping a steep sine gives square waves with ~1 px anti-aliased edges
            a, period = rng.uniform(0, np.pi), rng.uniform(3, 60)
            wave = np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) * size / period)
            colour = colour + rng.uniform(20, 120) * np.clip(wave * period / 2, -1, 1)[..., None]
        elif fill == 2:
            colour = colour + rng.uniform(10, 60) * noise(rng.uniform(0, 2))
        image = image * (1 - alpha) + colour * alpha
    image += rng.normal(0, rng.uniform(0, 4), image.shape)  # sensor-like grain
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")


def reject_reason(image: Image.Image, crop: int) -> str | None:
    if min(image.size) < crop:
        return f"smaller than the crop ({image.width}x{image.height})"
    a = np.asarray(image)
    flat = float((a[:, 1:] == a[:, :-1]).all(axis=2).mean())
    if flat > MAX_FLAT:
        return f"flat graphic ({flat:.0%} of pixels equal their left neighbour)"
    thumb = image.copy()
    thumb.thumbnail((512, 512), LANCZOS)
    packed = np.asarray(thumb, dtype=np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)
    colours = len(np.unique(packed))  # one int per RGB triple: np.unique(axis=0) is ~100x slower
    grey = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
    if colours < (MIN_GREY_LEVELS if grey else MIN_COLOURS):
        return f"too few {'grey levels' if grey else 'colours'} for a photograph ({colours})"
    return None


def drop_duplicates(sources: list[Source], skipped: list) -> list[Source]:
    """The same picture at several resolutions (mate ships Elephants three times): keep only the largest."""
    kept: list[Source] = []
    thumbs = {s.id: np.asarray(s.image.resize((32, 32), Image.Resampling.BOX), dtype=np.float64) for s in sources}
    for s in sorted(sources, key=lambda s: -s.image.width * s.image.height):
        for k in kept:
            same_aspect = abs(k.image.width * s.image.height / (k.image.height * s.image.width) - 1) < 0.01
            if same_aspect and np.abs(thumbs[k.id] - thumbs[s.id]).mean() < 3:
                skipped.append((s.path, f"same picture as {k.id} at a lower resolution"))
                break
        else:
            kept.append(s)
    return kept


def group_and_split(sources: list[Source], fraction: float, seed: int) -> None:
    """Variants of one picture (light/dark, stereo left/right, recoloured: same name once variant suffixes go, or the
    same structure) form a group; whole groups go to validation, in a seeded order, until `fraction` of sources are."""
    keys = [re.sub(r"[-_](l|d|light|dark|left|right|\d+x\d+)$", "", s.id, flags=re.I) for s in sources]
    shapes = [np.asarray(s.image.convert("L").resize((32, 32), LANCZOS), dtype=np.float64).ravel() for s in sources]
    shapes = [(t - t.mean()) / (t.std() + 1e-6) for t in shapes]
    for i, s in enumerate(sources):  # sources are sorted by id, so a group is named after its first member
        twin = next((j for j in range(i) if keys[i] == keys[j] or shapes[i] @ shapes[j] / 1024 > 0.95), None)
        s.group = s.id if twin is None else sources[twin].group
    groups = sorted({s.group for s in sources}, key=lambda g: rng_for(seed, "split", g).random())
    target = max(1, round(fraction * len(sources))) if fraction > 0 and len(groups) > 1 else 0
    chosen: set[str] = set()
    for g in groups:
        if sum(s.group in chosen for s in sources) >= target:
            break
        chosen.add(g)
    for s in sources:
        s.split = "val" if s.group in chosen else "train"


def write_crops(s: Source, out: Path, crop: int, per_image: int, scales: list[float], seed: int) -> int:
    """Random crop x crop windows at each scale (a scale that leaves the image smaller than a crop is skipped); at most
    twice as many as the image has whole tiles, so a small photo is not cut into near-copies. Returns files written."""
    written = 0
    for scale in scales:
        w, h = round(s.image.width * scale), round(s.image.height * scale)
        if min(w, h) < crop:
            continue
        n = min(per_image, 2 * (w // crop) * (h // crop), (w - crop + 1) * (h - crop + 1))
        rng = rng_for(seed, s.id, f"{scale:g}")  # the first n draws are the same whatever n is
        corners = zip(rng.integers(0, w - crop + 1, n), rng.integers(0, h - crop + 1, n), strict=True)
        names = [f"{s.id}_{scale:g}_{i:03d}.png" for i in range(n)]
        s.crops += names
        todo = [(name, x, y) for name, (x, y) in zip(names, corners, strict=True) if not (out / name).exists()]
        scaled = s.image.resize((w, h), LANCZOS) if todo and scale != 1 else s.image  # PIL's Lanczos antialiases
        for name, x, y in todo:
            with atomic_path(out / name) as tmp:  # level 3: 2.5x faster than the default 6, ~7% bigger
                scaled.crop((int(x), int(y), int(x) + crop, int(y) + crop)).save(tmp, format="PNG", compress_level=3)
        written += len(todo)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/train"))
    p.add_argument("--val-out", type=Path, help="validation crops (default: DIR/../val)")
    p.add_argument("--cache", type=Path, default=Path("data/cache"), help="downloaded and unpacked .debs")
    p.add_argument("--crop", type=int, default=128)  # the embedded model trains on 128x128 crops
    p.add_argument("--crops-per-image", type=int, default=40, help="per source image and scale")
    p.add_argument("--scales", default="1,0.5,0.25")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation-fraction", type=float, default=0.05, help="of source images, not of crops")
    p.add_argument("--generated", type=int, default=8, help="procedural images to add, each 4*crop square")
    p.add_argument("--skip-debian", action="store_true", help="only the scikit-image/scikit-learn photos (no apt)")
    p.add_argument("--exclude", action="append", default=[], help="glob over source ids, e.g. 'gnome-*'; repeatable")
    args = p.parse_args(argv)
    scales, val_out = [float(v) for v in args.scales.split(",")], args.val_out or args.out.parent / "val"
    changed = _changed_crop_options(args.out / "manifest.json", vars(args))
    if changed:
        # A crop whose file exists is reused, so crops made with other options would stay beside the new ones.
        p.exit(2, f"{p.prog}: error: {args.out} holds crops made with other options ({changed}); remove it and "
                  f"{val_out}, or write elsewhere with --out/--val-out\n")  # fmt: skip

    if JXL:
        import pillow_jxl  # noqa: F401
    packages: dict[str, dict] = {}
    skipped: list[tuple[str, str]] = []
    sources = []
    for s in bundled_sources() + ([] if args.skip_debian else debian_sources(args.cache, packages, skipped)):
        reason = EXCLUDE.get(s.id) or next((f"--exclude {g}" for g in args.exclude if fnmatch.fnmatch(s.id, g)), None)
        if not reason and s.file.suffix.lower() == ".jxl" and not JXL:
            reason = "JPEG XL needs a decoder: pip install pillow-jxl-plugin"
        elif not reason:
            try:
                s.image = load_image(s.file)
                reason = reject_reason(s.image, args.crop)
            except ImageError as error:
                reason = f"cannot decode ({error})"
        if reason:
            skipped.append((s.path, reason))
        else:
            sources.append(s)
    sources = drop_duplicates(sources, skipped)
    for i in range(args.generated):
        sources.append(Source(f"generated-{i:04d}", "generated", f"generate({i}, seed={args.seed})", "1",
                              "made by this script; no third-party rights", "scripts/prepare_training_data.py",
                              image=generate(i, args.seed, 4 * args.crop)))  # fmt: skip
    sources.sort(key=lambda s: s.id)
    group_and_split(sources, args.validation_fraction, args.seed)
    folder = {"train": args.out, "val": val_out}
    written = sum(write_crops(s, folder[s.split], args.crop, args.crops_per_image, scales, args.seed) for s in sources)

    per_origin = {o: {k: sum(s.origin == o and s.split == k for s in sources) for k in folder} for o in
                  sorted({s.origin for s in sources})}  # fmt: skip
    crops = {k: sum(len(s.crops) for s in sources if s.split == k) for k in folder}
    manifest = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"val_out": str(val_out)},
        "counts": {"sources": per_origin, "crops": crops, "skipped": len(skipped)},
        "packages": packages,
        "sources": [s.record() for s in sources],
        "skipped": [{"path": path, "reason": reason} for path, reason in sorted(skipped)],
    }
    atomic_write_text(args.out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")

    rows = [f"  {origin:20s} {n['train']:4d} / {n['val']}" for origin, n in per_origin.items()]
    print("sources per origin (train / val):", *rows, sep="\n")
    print(f"crops: {crops['train']} train in {args.out}, {crops['val']} val in {val_out}; {written} written just now")
    # Per folder: a crop of a photo now in the other split must not stay where it was (validation leaking).
    expected = {split: {name for s in sources if s.split == split for name in s.crops} for split in folder}
    stale = [f for k, d in folder.items() if d.is_dir() for f in d.glob("*.png") if f.name not in expected[k]]
    if stale:
        print(f"note: {len(stale)} PNGs in the output folders were not made with these arguments, e.g. {stale[0]}")
    print(f"skipped {len(skipped)}:", *(f"  {path}: {reason}" for path, reason in sorted(skipped)), sep="\n")
    return 0


# What a crop's pixels depend on besides its source; --exclude and the Debian sources only add or remove files.
CROP_OPTIONS = ("crop", "crops_per_image", "scales", "seed", "validation_fraction", "generated")


def _changed_crop_options(manifest: Path, options: dict) -> str:
    """The crop options that differ from those the folder's crops were made with; empty if none (or no record)."""
    try:
        before = json.loads(manifest.read_text())["args"]
    except (OSError, ValueError, KeyError):
        return ""
    return ", ".join(
        f"--{k.replace('_', '-')} {before[k]} then, {options[k]} now"
        for k in CROP_OPTIONS
        if k in before and before[k] != options[k]
    )


if __name__ == "__main__":
    raise SystemExit(main())
