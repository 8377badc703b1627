"""codec.latents_file: the file `codec encode` writes and `codec decode` reads, against its documented schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from codec.latents_file import (
    FORMAT_VERSION,
    VERSION_KEY,
    LatentsFile,
    LatentsFileError,
    Scaling,
    read_latents_file,
    write_latents_file,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "latents-file.md"


def _record(**changes) -> LatentsFile:
    generator = torch.Generator().manual_seed(0)
    fields = {
        "latents": [torch.randn(4, 2, 3, generator=generator), torch.randn(4, 5, 5, generator=generator)],
        "scaling": Scaling(0.5, 0.0, (0.1, 0.2, 0.3, 0.4), (1.0, 2.0, 3.0, 4.0)),
        "sources": ["a.png", "b.jpg"],
        "sizes": [(16, 20), (37, 40)],
        "model": "/models/vae",
        "posterior": "sample",
        "files": [(1, 2), (1, 3)],
    }
    return LatentsFile(**{**fields, **changes})


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def _rewrite(path: Path, target: Path, **metadata_changes: str | None) -> Path:
    with safe_open(str(path), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
        metadata = handle.metadata()
    for key, value in metadata_changes.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_a_written_record_reads_back_the_same(tmp_path):
    record = _record()
    write_latents_file(tmp_path / "z.safetensors", record)
    back = read_latents_file(tmp_path / "z.safetensors")
    for written, read in zip(record.latents, back.latents, strict=True):
        assert torch.equal(written, read) and read.dtype == torch.float32
    assert back.scaling == record.scaling
    assert (back.sources, back.sizes, back.model, back.posterior, back.files) == (
        record.sources,
        record.sizes,
        record.model,
        record.posterior,
        record.files,
    )
    assert _metadata(tmp_path / "z.safetensors")[VERSION_KEY] == str(FORMAT_VERSION)


def test_every_metadata_key_written_is_documented(tmp_path):
    write_latents_file(tmp_path / "z.safetensors", _record())
    documented = set(re.findall(r"^\| `(\w+)` \|", DOC.read_text(), flags=re.MULTILINE))
    assert set(_metadata(tmp_path / "z.safetensors")) <= documented


def test_files_written_before_the_version_key_and_statistics_still_read(tmp_path):
    write_latents_file(tmp_path / "z.safetensors", _record(scaling=Scaling(0.18215)))
    old = _rewrite(
        tmp_path / "z.safetensors", tmp_path / "old.safetensors", **{VERSION_KEY: None, "files": None},
        latents_mean=None, latents_std=None,
    )  # fmt: skip
    record = read_latents_file(old)
    assert record.scaling == Scaling(0.18215, 0.0, None, None) and record.files == []


def test_a_newer_version_is_refused_by_name(tmp_path):
    write_latents_file(tmp_path / "z.safetensors", _record())
    newer = _rewrite(tmp_path / "z.safetensors", tmp_path / "newer.safetensors", **{VERSION_KEY: "2"})
    with pytest.raises(LatentsFileError, match=rf"{newer}: latents file format version 2, newer than"):
        read_latents_file(newer)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"latents": [torch.full((4, 2, 3), 2e4), torch.zeros(4, 5, 5)]}, r"latent\.0 \(a\.png\) holds values up to"),
        ({"latents": [torch.zeros(4, 2, 3), torch.zeros(16, 5, 5)]}, "differ in channel count"),
        ({"scaling": Scaling(0.5, 0.0, (0.0,) * 3, (1.0,) * 3)}, "latents_mean must be 4 finite numbers"),
        ({"scaling": Scaling(float("inf"))}, "scaling_factor must be a positive number"),
        ({"scaling": Scaling(1.0, float("nan"))}, "shift_factor must be a finite number"),
    ],
)
def test_values_that_cannot_be_real_are_refused_by_name(changes, reason, tmp_path):
    path = tmp_path / "z.safetensors"
    write_latents_file(path, _record(**changes))
    with pytest.raises(LatentsFileError, match=rf"^{path}: .*{reason}"):
        read_latents_file(path)


def test_a_pickle_is_never_unpickled(tmp_path):
    for name, reason in (
        ("z.pt", r"not a latents file .*\(not a safetensors file\)"),
        ("z.safetensors", "not a readable"),
    ):
        torch.save({"latent.0": torch.zeros(4, 2, 2)}, tmp_path / name)
        with pytest.raises(LatentsFileError, match=rf"{tmp_path / name}: {reason}"):
            read_latents_file(tmp_path / name)
