"""diffusers-format folders both ways, variants, dtypes, legacy keys, and the errors a bad checkpoint gives."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import codec
from codec import CheckpointError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _folder(tmp_path, config, tensors, name=WEIGHTS):
    """A folder with config.json and `tensors` in the weights file `name` (.safetensors or torch.save'd .bin)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config.to_json(tmp_path / "config.json")
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path


# ---- ours -> diffusers -------------------------------------------------------------------------


def test_save_pretrained_loads_in_diffusers(ours, diffusers_vae, tmp_path, x, assert_same_tensors):
    import diffusers

    ours.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / WEIGHTS).is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary files left
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    assert_same_tensors(theirs.state_dict(), ours.state_dict())
    for key, value in ours.config.to_dict().items():
        theirs_value = theirs.config[key]
        assert (list(theirs_value) if isinstance(theirs_value, tuple) else theirs_value) == value, key
    with torch.no_grad():
        assert torch.equal(theirs(x).sample, diffusers_vae(x).sample)
        torch.testing.assert_close(ours(x).sample, theirs(x).sample, atol=1e-4, rtol=0)


def test_save_pretrained_round_trips_in_ours(ours, tmp_path, x, assert_same_tensors):
    ours.save_pretrained(tmp_path)
    loaded = codec.AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config == ours.config
    assert not loaded.training
    assert_same_tensors(loaded.state_dict(), ours.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, ours(x).sample)


def test_saving_over_another_model_that_fails_midway_leaves_the_old_model(
    ours, tiny_config, tmp_path, monkeypatch, assert_same_tensors
):
    import dataclasses

    import safetensors.torch

    ours.save_pretrained(tmp_path)
    bigger = codec.AutoencoderKL(dataclasses.replace(tiny_config, latent_channels=8))

    def disk_full(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        bigger.save_pretrained(tmp_path)
    loaded = codec.AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config == ours.config
    assert_same_tensors(loaded.state_dict(), ours.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_conv_weights_stay_channels_last_through_save_and_load(ours, tmp_path):
    """Our convolutions keep channels-last weights (inference's layout, no reorder per call); saving writes the
    same values, and loading copies into channels-last parameters."""
    from safetensors.torch import load_file

    def conv_weights(model):
        return [p for p in model.parameters() if p.dim() == 4]

    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(ours))
    ours.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[key], value) for key, value in ours.state_dict().items())
    loaded = codec.AutoencoderKL.from_pretrained(tmp_path)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(loaded))


def test_conv_weight_layout_follows_the_kind_of_device(ours):
    """Channels-last on a CPU; NCHW on other devices ("meta" stands in for a GPU here), where GroupNorm would
    transpose NHWC activations; an explicit layout on the same device is left as set."""

    def conv_weights(model):  # 3x3 ones: a 1x1 kernel's strides are both layouts at once
        return [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]

    model = copy.deepcopy(ours).to("meta")
    assert all(
        w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model)
    )
    model = copy.deepcopy(ours).to(memory_format=torch.contiguous_format)  # on the CPU: the caller's choice
    assert all(not w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model))
    model = model.to("meta").to_empty(device="cpu")  # back on a CPU: channels-last again
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(model))


# ---- diffusers -> ours -------------------------------------------------------------------------


def test_diffusers_folder_loads(diffusers_folder, diffusers_vae, tiny_config, x, assert_same_tensors):
    loaded = codec.AutoencoderKL.from_pretrained(diffusers_folder)
    assert loaded.config == tiny_config
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sample, diffusers_vae(x).sample, atol=1e-4, rtol=0)


def test_pipeline_folder_with_vae_subfolder_loads(diffusers_folder, diffusers_vae, tmp_path, assert_same_tensors):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(diffusers_folder, pipeline / "vae")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (pipeline / "unet").mkdir()
    assert_same_tensors(codec.AutoencoderKL.from_pretrained(pipeline).state_dict(), diffusers_vae.state_dict())
    loaded = codec.AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())
    assert_same_tensors(codec.AutoencoderKL.load(pipeline).state_dict(), diffusers_vae.state_dict())


def test_bin_only_folder_loads(diffusers_vae, tiny_config, tmp_path, assert_same_tensors):
    _folder(tmp_path, tiny_config, _state(diffusers_vae), name="diffusion_pytorch_model.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    loaded = codec.AutoencoderKL.from_pretrained(tmp_path)
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())


def test_sharded_folder_written_by_diffusers_loads(diffusers_vae, tmp_path, assert_same_tensors):
    diffusers_vae.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert not (tmp_path / WEIGHTS).exists()
    loaded = codec.AutoencoderKL.from_pretrained(tmp_path)
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())


def test_saving_over_a_sharded_model_removes_its_shards(diffusers_vae, tiny_config, tmp_path, assert_same_tensors):
    import diffusers

    diffusers_vae.save_pretrained(tmp_path, max_shard_size="200KB")  # an earlier model, sharded
    diffusers_vae.save_pretrained(tmp_path / "kept", max_shard_size="200KB", variant="fp16")  # another variant
    torch.manual_seed(5)
    new = codec.AutoencoderKL(tiny_config)
    new.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["config.json", WEIGHTS]
    # diffusers reads a shard index before a single file: a stale one would have loaded the old model.
    assert_same_tensors(diffusers.AutoencoderKL.from_pretrained(tmp_path).state_dict(), new.state_dict())
    new.save_pretrained(tmp_path / "kept")  # the fp16 variant's shards are another model's files: left alone
    assert (tmp_path / "kept" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    # An index is data from elsewhere: one naming the files just written deletes neither.
    odd = {"weight_map": {"a": "config.json", "b": WEIGHTS, "c": "notes.txt"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(odd))
    (tmp_path / "notes.txt").write_text("mine")
    new.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["config.json", WEIGHTS, "notes.txt"]
    assert_same_tensors(codec.AutoencoderKL.from_pretrained(tmp_path).state_dict(), new.state_dict())


def test_fp16_variant_file_naming(diffusers_vae, ours, tmp_path, assert_same_tensors):
    half = copy.deepcopy(diffusers_vae).half()
    half.save_pretrained(tmp_path / "theirs", variant="fp16")
    assert (tmp_path / "theirs" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = codec.AutoencoderKL.from_pretrained(tmp_path / "theirs", variant="fp16")
    assert_same_tensors(loaded.half().state_dict(), half.state_dict())
    with pytest.raises(CheckpointError, match="no weights found"):
        codec.AutoencoderKL.from_pretrained(tmp_path / "theirs")  # without the variant there is no file to load

    ours.save_pretrained(tmp_path / "ours", variant="fp16")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    assert_same_tensors(
        codec.AutoencoderKL.from_pretrained(tmp_path / "ours", variant="fp16").state_dict(), _state(ours)
    )


def test_sharded_fp16_variant_written_by_diffusers_loads(diffusers_vae, tmp_path, assert_same_tensors):
    # diffusers names the index diffusion_pytorch_model.safetensors.index.fp16.json and the shards
    # diffusion_pytorch_model.fp16-0000k-of-0000n.safetensors.
    diffusers_vae.save_pretrained(tmp_path, max_shard_size="1MB", variant="fp16")
    loaded = codec.AutoencoderKL.from_pretrained(tmp_path, variant="fp16")
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())


def test_torch_dtype_float16(diffusers_folder, diffusers_vae):
    loaded = codec.AutoencoderKL.from_pretrained(diffusers_folder, torch_dtype=torch.float16)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert loaded.dtype == torch.float16
    reference = diffusers_vae.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key].half()), key


def test_legacy_attention_key_names_load(diffusers_vae, tiny_config, tmp_path, assert_same_tensors):
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in _state(diffusers_vae).items():
        for new, old in renames.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert not any(".to_q." in key for key in legacy)
    _folder(tmp_path, tiny_config, legacy)
    loaded = codec.AutoencoderKL.from_pretrained(tmp_path)
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())


# ---- errors ------------------------------------------------------------------------------------


def _load_error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        codec.AutoencoderKL.from_pretrained(folder)
    return str(info.value)


def test_truncated_safetensors(diffusers_folder, tmp_path):
    shutil.copytree(diffusers_folder, tmp_path, dirs_exist_ok=True)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _load_error(tmp_path)
    assert str(path) in message and "truncated" in message


def test_zero_byte_file(diffusers_folder, tmp_path):
    shutil.copytree(diffusers_folder, tmp_path, dirs_exist_ok=True)
    path = tmp_path / WEIGHTS
    path.write_bytes(b"")
    message = _load_error(tmp_path)
    assert str(path) in message and "empty" in message


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("name", [WEIGHTS, "diffusion_pytorch_model.bin"])
def test_random_bytes_file(tiny_config, tmp_path, name, seed):
    tiny_config.to_json(tmp_path / "config.json")
    path = tmp_path / name
    # Garbage reaches the unpickler along different paths depending on its first bytes: try several.
    path.write_bytes(random.Random(seed).randbytes(4096))
    message = _load_error(tmp_path)
    assert str(path) in message and "corrupt" in message


def test_truncated_bin(diffusers_vae, tiny_config, tmp_path):
    path = _folder(tmp_path, tiny_config, _state(diffusers_vae), name="diffusion_pytorch_model.bin")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _load_error(tmp_path)
    assert str(path) in message and "truncated" in message


def test_missing_key(diffusers_vae, tiny_config, tmp_path):
    tensors = _state(diffusers_vae)
    del tensors["decoder.conv_out.bias"]
    path = _folder(tmp_path, tiny_config, tensors)
    message = _load_error(tmp_path)
    assert str(path) in message and "missing keys" in message and "decoder.conv_out.bias" in message
    assert "unexpected keys" not in message and "shape mismatches" not in message


def test_unexpected_key(diffusers_vae, tiny_config, tmp_path):
    tensors = {**_state(diffusers_vae), "encoder.extra_layer.weight": torch.zeros(3)}
    path = _folder(tmp_path, tiny_config, tensors)
    message = _load_error(tmp_path)
    assert str(path) in message and "unexpected keys" in message and "encoder.extra_layer.weight" in message
    assert "missing keys" not in message


def test_wrong_shape(diffusers_vae, tiny_config, tmp_path):
    tensors = _state(diffusers_vae)
    tensors["encoder.conv_in.weight"] = torch.zeros(32, 3, 5, 5)
    path = _folder(tmp_path, tiny_config, tensors)
    message = _load_error(tmp_path)
    assert str(path) in message and "shape mismatches" in message and "encoder.conv_in.weight" in message
    assert "(32, 3, 5, 5)" in message and "(32, 3, 3, 3)" in message


def test_non_finite_tensor(diffusers_vae, tiny_config, tmp_path):
    tensors = _state(diffusers_vae)
    tensors["decoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    path = _folder(tmp_path, tiny_config, tensors)
    message = _load_error(tmp_path)
    assert str(path) in message and "decoder.conv_in.weight" in message


def test_folder_without_weights(tiny_config, tmp_path):
    tiny_config.to_json(tmp_path / "config.json")
    message = _load_error(tmp_path)
    assert str(tmp_path) in message and WEIGHTS in message


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Fail the test on any hub download; run in an empty working directory."""
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError(f"hf_hub_download called with {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("no_network")
def test_missing_local_path_is_not_a_network_call():
    with pytest.raises(CheckpointError, match="nope/folder"):
        codec.AutoencoderKL.from_pretrained("./nope/folder")


@pytest.mark.usefixtures("no_network")
def test_load_of_missing_local_path_is_not_a_network_call():
    with pytest.raises(CheckpointError, match="nope/folder"):
        codec.AutoencoderKL.load("./nope/folder")


def test_hub_id_offline_says_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        codec.AutoencoderKL.from_pretrained("someone/some-vae")
    message = str(info.value)
    assert "someone/some-vae" in message
    # What to do offline: fetch it where there is a network, then point at the local folder or the cache.
    assert "offline" in message.lower()
    assert "download" in message.lower()


# ---- AutoencoderKL.load ------------------------------------------------------------------------


def test_load_preset(tiny_config, assert_same_tensors):
    model = codec.AutoencoderKL.load("preset:tiny")
    assert isinstance(model, codec.AutoencoderKL)
    assert model.config == tiny_config and not model.training
    assert_same_tensors(model.state_dict(), codec.AutoencoderKL.load("preset:tiny").state_dict())  # seeded
    half = codec.AutoencoderKL.load("preset:tiny", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    with pytest.raises(CheckpointError, match="unknown preset"):
        codec.AutoencoderKL.load("preset:nonsense")


def test_load_dispatches_folders_and_files(diffusers_folder, diffusers_vae, tmp_path, assert_same_tensors):
    assert_same_tensors(codec.AutoencoderKL.load(diffusers_folder).state_dict(), diffusers_vae.state_dict())
    single = tmp_path / "vae.safetensors"
    codec.AutoencoderKL.from_pretrained(diffusers_folder).save_single_file(single)
    assert_same_tensors(codec.AutoencoderKL.load(single).state_dict(), diffusers_vae.state_dict())
    with pytest.raises(CheckpointError, match="from_single_file"):
        codec.AutoencoderKL.from_pretrained(single)


def test_a_model_that_is_nowhere_is_named_with_what_was_meant(tmp_path):
    with pytest.raises(CheckpointError, match=r"bultin: no such folder or file.*\(did you mean builtin\?\)"):
        codec.AutoencoderKL.load("bultin")
    with pytest.raises(CheckpointError, match=r"vae\.ckpt: no such file$"):
        codec.AutoencoderKL.load(str(tmp_path / "vae.ckpt"))
    with pytest.raises(CheckpointError, match=r"is a folder; this reads one \.safetensors/\.ckpt file"):
        codec.AutoencoderKL.from_single_file(tmp_path)


def test_the_provenance_says_where_the_weights_came_from(diffusers_folder, tiny_config, tmp_path):
    from codec.builtin import BUILTIN_DIR
    from codec.checkpoint import Provenance

    assert codec.AutoencoderKL(tiny_config).provenance == Provenance()  # built in code: from nowhere
    assert codec.AutoencoderKL.load("preset:tiny").provenance == Provenance("preset:tiny")
    folder = codec.AutoencoderKL.from_pretrained(diffusers_folder)
    assert folder.provenance.source == str(diffusers_folder / "diffusion_pytorch_model.safetensors")
    assert folder.about is None and not folder.scaling_is_guess
    folder.save_single_file(tmp_path / "vae.safetensors")
    single = codec.AutoencoderKL.load(tmp_path / "vae.safetensors")
    assert single.provenance == Provenance(str(tmp_path / "vae.safetensors"))  # our file records its scaling
    builtin = codec.AutoencoderKL.load("builtin")
    assert builtin.about == (BUILTIN_DIR / "ABOUT.md").read_text() == builtin.provenance.about
    assert builtin.provenance.source == str(BUILTIN_DIR / "diffusion_pytorch_model.safetensors")
    moved = builtin.to(torch.float16)
    assert moved.provenance is builtin.provenance  # it stays with the model through moves and casts
