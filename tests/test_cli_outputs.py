"""What the file commands refuse to write: the model they load, files already there (unless --overwrite), and
images decoded from latents that cannot be real; where a write fails, a sentence instead of a bare errno."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import codec
from codec.cli import main

TINY = ["--model", "preset:tiny", "--device", "cpu"]


def _image(path, seed: int = 0, height: int = 16, width: int = 24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _one_line_error(capsys, *named) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "[Errno" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for text in named:
        assert str(text) in err, err
    return err


def _contents(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny preset as a diffusers folder and as a single file."""
    root = tmp_path_factory.mktemp("outputs_model")
    vae = codec.AutoencoderKL.load("preset:tiny")
    vae.save_pretrained(root / "folder")
    vae.save_single_file(root / "single.safetensors")
    return root / "folder", root / "single.safetensors"


# ---- the model being used ---------------------------------------------------------------------------------


def test_encode_refuses_to_write_over_the_model_it_loads(models, tmp_path, capsys):
    folder, single = models
    image = _image(tmp_path / "a.png")
    weights = folder / "diffusion_pytorch_model.safetensors"
    link = tmp_path / "link.safetensors"
    link.symlink_to(single)
    before = {path: path.read_bytes() for path in (single, weights)}
    cases = [(single, single), (folder, weights), (single, link), (folder, folder / "new.safetensors")]
    for model, output in cases:
        for overwrite in ([], ["--overwrite"]):  # --overwrite is for earlier outputs, never for the model
            assert main(["encode", str(image), "-o", str(output), "--model", str(model), *overwrite]) == 2, output
            _one_line_error(capsys, output, "the model this command loads")
    assert {path: path.read_bytes() for path in before} == before
    assert not (folder / "new.safetensors").exists()


def test_decode_roundtrip_demo_and_convert_refuse_outputs_in_the_model(models, tmp_path, capsys):
    folder, single = models
    image = _image(tmp_path / "a.png")
    latents = tmp_path / "z.safetensors"
    assert main(["encode", str(image), "-o", str(latents), "--model", str(folder)]) == 0
    link = tmp_path / "model-link"
    link.symlink_to(folder, target_is_directory=True)
    before, single_before = _contents(folder), single.read_bytes()
    commands = [
        ["decode", str(latents), "-o", str(link), "--model", str(folder)],
        ["roundtrip", str(image), "-o", str(folder / "out"), "--model", str(folder)],
        ["demo", str(image), "-o", str(link / "demo"), "--model", str(folder)],
        ["convert", str(folder), str(link), "--overwrite"],
        ["convert", str(single), str(single), "--overwrite"],
        ["convert", str(folder), str(folder / "vae.safetensors")],
        ["cache", str(tmp_path), "-o", str(link / "cache"), "--model", str(folder)],
        ["bench", "--model", "builtin", "--model", str(folder), "--data", str(image), "-o", str(folder)],
    ]
    capsys.readouterr()
    for command in commands:
        assert main(command) == 2, command
        _one_line_error(capsys, "the model this command loads")
    assert _contents(folder) == before and single.read_bytes() == single_before
    assert sorted(path.name for path in folder.iterdir()) == sorted(before)


# ---- files already there ----------------------------------------------------------------------------------


def test_decode_never_replaces_a_png_it_did_not_make(tmp_path, capsys):
    latents, out = tmp_path / "x.safetensors", tmp_path / "out"
    assert main(["encode", str(_image(tmp_path / "src" / "good.png")), "-o", str(latents), *TINY]) == 0
    theirs = _image(out / "good.png", seed=1)  # another picture that happens to have the name
    before = theirs.read_bytes()
    capsys.readouterr()
    assert main(["decode", str(latents), "-o", str(out), *TINY]) == 2
    _one_line_error(capsys, f"{theirs} already exists", "--overwrite")
    assert theirs.read_bytes() == before
    assert main(["decode", str(latents), "-o", str(out), *TINY, "--overwrite"]) == 0  # asked for: replaced
    assert theirs.read_bytes() != before


def test_roundtrip_never_replaces_a_metrics_table_it_did_not_make(tmp_path, capsys):
    image, out = _image(tmp_path / "a.png"), tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("my own table\n")
    assert main(["roundtrip", str(image), "-o", str(out), *TINY]) == 2
    _one_line_error(capsys, f"{out / 'metrics.csv'} already exists", "--overwrite")
    assert _contents(out) == {"metrics.csv": b"my own table\n"}  # nothing written beside it either


def test_a_rerun_replaces_its_own_earlier_files_but_not_one_a_user_changed(tmp_path, capsys):
    image, out = _image(tmp_path / "a.png"), tmp_path / "out"
    assert main(["roundtrip", str(image), "-o", str(out), *TINY]) == 0
    assert main(["roundtrip", str(image), "-o", str(out), *TINY]) == 0  # its own files, unchanged: replaced
    (out / "metrics.csv").write_text("edited by hand\n")
    first = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    capsys.readouterr()
    assert main(["roundtrip", str(image), "-o", str(out), *TINY]) == 2
    _one_line_error(capsys, f"{out / 'metrics.csv'} already exists and was not written by codec", "--overwrite")
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == first
    assert (out / "metrics.csv").read_text() == "edited by hand\n"
    assert main(["roundtrip", str(image), "-o", str(out), *TINY, "--overwrite"]) == 0
    assert main(["roundtrip", str(image), "-o", str(out), *TINY]) == 0  # what --overwrite wrote is codec's now


def test_a_forged_or_unreadable_ledger_protects_nothing_it_does_not_vouch_for(tmp_path, capsys):
    image, out = _image(tmp_path / "a.png"), tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("mine\n")
    (out / ".codec-outputs.json").write_text('{"metrics.csv": "0000"}')  # a digest that is not the file's
    assert main(["roundtrip", str(image), "-o", str(out), *TINY]) == 2
    (out / ".codec-outputs.json").write_text("[not json")
    assert main(["roundtrip", str(image), "-o", str(out), *TINY]) == 2
    assert (out / "metrics.csv").read_text() == "mine\n"


def test_demo_runs_twice_into_the_same_folder(tmp_path):
    image, out = _image(tmp_path / "a.png"), tmp_path / "demo"
    assert main(["demo", str(image), "-o", str(out), *TINY]) == 0
    assert main(["demo", str(image), "-o", str(out), *TINY]) == 0


def test_demo_convert_and_encode_never_replace_files_they_did_not_make(models, tmp_path, capsys):
    folder, _ = models
    image = _image(tmp_path / "a.png")
    mine = {
        tmp_path / "demo" / "report.md": ["demo", str(image), "-o", str(tmp_path / "demo"), *TINY],
        tmp_path / "vae.safetensors": ["convert", str(folder), str(tmp_path / "vae.safetensors")],
        tmp_path / "converted" / "config.json": ["convert", str(folder), str(tmp_path / "converted")],
        tmp_path / "z.safetensors": ["encode", str(image), "-o", str(tmp_path / "z.safetensors"), *TINY],
    }
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"mine")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    capsys.readouterr()
    for path, command in mine.items():
        assert main(command) == 2, command
        _one_line_error(capsys, path, "--overwrite")
        assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    assert main([*mine[tmp_path / "converted" / "config.json"], "--overwrite"]) == 0
    assert codec.AutoencoderKL.load(tmp_path / "converted").config.latent_channels == 4


# ---- latents that cannot be real -------------------------------------------------------------------------


def _edited_latents(tmp_path, values=None, **metadata_changes):
    """A latents file from `codec encode`, with its tensor or metadata replaced."""
    latents = tmp_path / "z.safetensors"
    if not latents.exists():
        assert main(["encode", str(_image(tmp_path / "a.png")), "-o", str(latents), *TINY]) == 0
    with safe_open(str(latents), "pt") as handle:
        tensor, metadata = handle.get_tensor("latent.0"), handle.metadata()
    edited = tmp_path / f"edited-{len(list(tmp_path.glob('edited-*')))}.safetensors"
    tensor = tensor if values is None else torch.full_like(tensor, values)
    save_file({"latent.0": tensor}, str(edited), metadata={**metadata, **metadata_changes})
    return edited


@pytest.mark.parametrize("value", [1e19, -3e38, 1e6])
def test_latents_far_too_large_are_an_error_naming_the_file_not_a_black_image(value, tmp_path, capsys):
    edited = _edited_latents(tmp_path, value)
    capsys.readouterr()
    assert main(["decode", str(edited), "-o", str(tmp_path / "out"), *TINY]) == 2
    _one_line_error(capsys, edited, "latent.0 (a.png) holds values up to")
    assert not (tmp_path / "out").exists()


def test_a_decode_that_comes_out_non_finite_is_an_error_naming_the_file(tmp_path, capsys, monkeypatch):
    latents = _edited_latents(tmp_path)
    decode = codec.AutoencoderKL.decode

    def poisoned(self, z, *args, **kwargs):
        output = decode(self, z, *args, **kwargs)
        output.sample.fill_(float("nan"))  # as an overflowing decoder gives
        return output

    monkeypatch.setattr(codec.AutoencoderKL, "decode", poisoned)
    capsys.readouterr()
    assert main(["decode", str(latents), "-o", str(tmp_path / "out"), *TINY]) == 2
    _one_line_error(capsys, latents, "a.png decodes to NaN or infinite values")
    assert not list((tmp_path / "out").glob("*.png"))
    assert main(["roundtrip", str(tmp_path / "a.png"), "-o", str(tmp_path / "rt"), *TINY]) == 2
    _one_line_error(capsys, tmp_path / "a.png", "NaN or infinite")
    assert not list((tmp_path / "rt").glob("*.png"))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"latents_mean": "[0, 0, 0]", "latents_std": "[1, 1, 1]"}, "latents_mean must be 4 finite numbers"),
        ({"scaling_factor": "0"}, "scaling_factor must be a positive number"),
        ({"latents_mean": "[0, 0, 0, 0]", "latents_std": "[0, 1, 1, 1]"}, "latents_std must be positive"),
    ],
)
def test_scaling_metadata_that_cannot_unscale_is_named_with_the_file(changes, reason, tmp_path, capsys):
    edited = _edited_latents(tmp_path, **changes)
    capsys.readouterr()
    assert main(["decode", str(edited), "-o", str(tmp_path / "out"), *TINY]) == 2
    _one_line_error(capsys, edited, reason)


# ---- sentences instead of errno ---------------------------------------------------------------------------


def test_an_output_below_a_file_is_named_with_what_to_do(tmp_path, capsys):
    image, afile = _image(tmp_path / "a.png"), tmp_path / "afile"
    afile.write_text("x")
    assert main(["encode", str(image), "-o", str(afile / "z.safetensors"), *TINY]) == 2  # had been [Errno 17]
    _one_line_error(capsys, afile / "z.safetensors", f"{afile} is not a folder")
    assert main(["roundtrip", str(image), "-o", str(afile / "sub"), *TINY]) == 2  # had been [Errno 20]
    _one_line_error(capsys, afile / "sub", f"{afile} is not a folder")


@pytest.mark.parametrize(
    ("number", "advice"),
    [
        (errno.EROFS, "the file system is read-only; write to another disk or folder"),
        (errno.ENOSPC, "no space left on the disk"),
        (errno.EACCES, "permission denied"),
        (errno.EEXIST, "already exists (perhaps a file where a folder is needed)"),
    ],
)
def test_a_write_that_fails_names_the_output_and_says_what_to_do(number, advice, tmp_path, capsys, monkeypatch):
    import tempfile

    latents = _edited_latents(tmp_path)

    def refused(*args, dir=None, **kwargs):
        raise OSError(number, "system words", f"{dir}/.a.png.x1y2.tmp")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    capsys.readouterr()
    assert main(["decode", str(latents), "-o", str(tmp_path / "out"), *TINY]) == 2
    _one_line_error(capsys, f"{tmp_path / 'out' / 'a.png'}: {advice}")


def test_describe_os_error_keeps_the_system_words_it_has_no_sentence_for(tmp_path):
    from codec.cli.common import describe_os_error

    assert describe_os_error(OSError(errno.ELOOP, "Too many levels of symbolic links", "x")) == (
        "x: Too many levels of symbolic links"
    )
    assert describe_os_error(OSError("no errno")) == "no errno"


def test_an_image_that_may_not_be_read_says_so(tmp_path, capsys, monkeypatch):
    from PIL import Image as PILImage

    image = _image(tmp_path / "a.png")

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(PILImage, "open", denied)
    assert main(["roundtrip", str(image), "-o", str(tmp_path / "out"), *TINY]) == 2
    _one_line_error(capsys, image, "permission denied; make the file readable")  # not "perhaps truncated or corrupt"


def test_the_offline_hint_fits_whether_hf_hub_offline_is_set(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(*args, **kwargs):
        raise LocalEntryNotFoundError("not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # no local folder named like the repository
    assert main(["info", "--model", "someone/some-vae"]) == 2
    assert "or set HF_HUB_OFFLINE=1 to use the cache" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["info", "--model", "someone/some-vae"]) == 2
    err = capsys.readouterr().err
    assert "set HF_HUB_OFFLINE=1" not in err and "HF_HUB_OFFLINE is set, so the hub was not asked" in err
    assert "someone/some-vae" in err and "Traceback" not in err


# ---- cache verify -----------------------------------------------------------------------------------------


def test_cache_verify_is_a_subcommand_with_its_own_options(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "verify", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: codec cache verify") and "--resolution" not in out
    with pytest.raises(SystemExit) as exit_info:  # caching's options are not verify's
        main(["cache", "verify", str(tmp_path), "--resolution", "32"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert main(["cache", "verify", str(tmp_path), "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("codec cache verify: error: ")
    for seed in range(2):  # a source folder called verify is still a source, written ./verify
        _image(tmp_path / "verify" / f"{seed}.png", seed, 32, 32)
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "./verify", "-o", "out", *TINY, "--resolution", "32", "--num-workers", "0"]) == 0
    assert main(["cache", "verify", "out"]) == 0
    assert "out: OK, 2 rows" in capsys.readouterr().out
