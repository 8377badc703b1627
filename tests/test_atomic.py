"""Atomic writes: the file appears whole or not at all, with the permissions of an ordinary new file."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from codec.atomic import atomic_path, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_written_files_get_the_umask_permissions_not_mkstemps_private_ones(tmp_path, umask_022):
    atomic_write_text(tmp_path / "config.json", "{}")
    # safetensors writes a new file in place of the path it is given: the permissions must still be right.
    with atomic_path(tmp_path / "weights.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert _mode(tmp_path / "config.json") == _mode(tmp_path / "weights.safetensors") == 0o644


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_name_near_the_length_limit_is_written(tmp_path):
    name = "x" * 240 + ".png"  # valid; the temporary file's longer name had failed with ENAMETOOLONG
    atomic_write_text(tmp_path / name, "ok")
    assert (tmp_path / name).read_text() == "ok" and [p.name for p in tmp_path.iterdir()] == [name]
