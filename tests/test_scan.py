"""codec.scan: the folder walk cache, bench, training and the CLI share follows linked folders, ends on a link loop
and names what it skipped."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from cache_testing import build, image_folder, tiny_model_dir
from PIL import Image

from codec.bench.data import open_source as bench_source
from codec.images import IMAGE_SUFFIXES, list_images
from codec.scan import scan_folder
from codec.sources import open_source
from training.data import open_image_source


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(path)
    return path


def _relative(paths: list[Path], root: Path) -> list[str]:
    return [path.relative_to(root).as_posix() for path in paths]


@pytest.fixture
def linked(tmp_path) -> Path:
    """root/own.png, and root/linked -> elsewhere/, a folder of 3 images with a subfolder."""
    elsewhere = tmp_path / "elsewhere"
    for name in ("a.png", "b.png", "deeper/c.png"):
        _png(elsewhere / name)
    root = tmp_path / "root"
    _png(root / "own.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    return root


def test_a_linked_subfolder_is_walked(linked):
    scan = scan_folder(linked, IMAGE_SUFFIXES)
    assert _relative(scan.files, linked) == ["linked/a.png", "linked/b.png", "linked/deeper/c.png", "own.png"]
    assert scan.skipped == []
    assert list_images(linked) == scan.files


def test_every_consumer_sees_the_linked_images(linked):
    expected = ["linked/a.png", "linked/b.png", "linked/deeper/c.png", "own.png"]
    assert _relative(open_source(linked, split="train").paths, linked) == expected
    assert _relative(open_image_source(linked), linked) == expected
    assert sorted(item.name for item in bench_source(linked)) == ["linked__a", "linked__b", "linked__deeper__c", "own"]


def test_a_link_loop_ends_and_is_named(tmp_path):
    root = tmp_path / "root"
    _png(root / "sub" / "x.png")
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)  # root/sub/back/sub/back/... forever
    (root / "self").symlink_to(root / "self")  # a link to itself: ELOOP
    scan = scan_folder(root, IMAGE_SUFFIXES)
    assert _relative(scan.files, root) == ["sub/x.png"]
    reasons = {path.relative_to(root).as_posix(): reason for path, reason in ((s.path, s.reason) for s in scan.skipped)}
    assert set(reasons) == {"self", "sub/back"}
    assert "walked already" in reasons["sub/back"] and str(root) in reasons["sub/back"]
    assert "cannot be followed" in reasons["self"]


def test_a_real_folder_keeps_its_real_path_when_also_linked(tmp_path):
    root = tmp_path / "root"
    _png(root / "z_real" / "x.png")
    (root / "a_link").symlink_to(root / "z_real", target_is_directory=True)  # met first in name order
    scan = scan_folder(root, IMAGE_SUFFIXES)
    assert _relative(scan.files, root) == ["z_real/x.png"]
    assert [s.path.name for s in scan.skipped] == ["a_link"]


def test_a_dangling_link_is_reported_with_its_reason(tmp_path, caplog):
    root = tmp_path / "root"
    _png(root / "ok.png")
    (root / "gone.png").symlink_to(tmp_path / "deleted.png")
    (root / "gone_folder").symlink_to(tmp_path / "deleted_folder", target_is_directory=True)
    (root / "file_link.png").symlink_to(root / "ok.png")  # a link to a file is an image like any other
    scan = scan_folder(root, IMAGE_SUFFIXES)
    assert _relative(scan.files, root) == ["file_link.png", "ok.png"]
    assert [(s.path.name, s.reason) for s in scan.skipped] == [
        ("gone.png", f"a link to {tmp_path / 'deleted.png'}, which does not exist"),
        ("gone_folder", f"a link to {tmp_path / 'deleted_folder'}, which does not exist"),
    ]
    with caplog.at_level(logging.WARNING, logger="codec.sources"):
        opened = open_source(root, split="train")
    assert opened.skipped == scan.skipped
    assert f"{root / 'gone.png'}: skipped, a link to {tmp_path / 'deleted.png'}, which does not exist" in caplog.text
    assert f"{root / 'gone_folder'}: skipped" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_folder_is_reported(tmp_path):
    root = tmp_path / "root"
    _png(root / "ok.png")
    locked = root / "locked"
    _png(locked / "hidden.png")
    locked.chmod(0)
    try:
        scan = scan_folder(root, IMAGE_SUFFIXES)
    finally:
        locked.chmod(0o755)
    assert _relative(scan.files, root) == ["ok.png"]
    assert [s.path for s in scan.skipped] == [locked] and "cannot" in scan.skipped[0].reason


def test_a_cache_of_a_folder_with_a_linked_subfolder_holds_every_image(tmp_path):
    elsewhere = image_folder(tmp_path / "elsewhere", [(32, 32)] * 4)
    root = image_folder(tmp_path / "root", [(32, 32)])
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    summary = build(root, tmp_path / "out", tiny_model_dir(tmp_path / "model"))
    assert (summary.images, summary.rows, summary.skipped) == (5, 5, 0)
