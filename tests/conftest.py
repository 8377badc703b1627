"""Shared fixtures: the tiny config, a seeded diffusers AutoencoderKL and ours holding the same weights.

diffusers is imported inside the fixtures only, so collecting a test module that needs none of them stays cheap.
"""

from __future__ import annotations

import os

import pytest
import torch

import codec

# The test models are tiny: with several threads, waking and synchronising them costs far more than the work
# (on a loaded 2-core machine one 64x48 encode took 0.8 s with 2 threads and 0.02 s with 1). OMP_NUM_THREADS overrides.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config() -> codec.AutoencoderKLConfig:
    """The tiny preset (block_out_channels (32, 64, 64, 64), one layer per block). Treat as read-only:
    use `dataclasses.replace` for variants."""
    return codec.preset("tiny")


@pytest.fixture(scope="session")
def diffusers_vae(tiny_config):
    """diffusers' AutoencoderKL built from the tiny config after `torch.manual_seed(0)`, in eval mode. Read-only."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**tiny_config.to_dict())
    return vae.eval()


@pytest.fixture
def ours(tiny_config, diffusers_vae) -> codec.AutoencoderKL:
    """Our AutoencoderKL holding diffusers_vae's weights; a fresh copy per test, so tests may change it."""
    model = codec.AutoencoderKL(tiny_config)
    model.load_state_dict(diffusers_vae.state_dict())
    return model.eval()


@pytest.fixture(scope="session")
def diffusers_folder(tmp_path_factory, diffusers_vae):
    """A folder written by diffusers' save_pretrained (config.json + diffusion_pytorch_model.safetensors). Read-only."""
    folder = tmp_path_factory.mktemp("diffusers_vae")
    diffusers_vae.save_pretrained(folder)
    return folder


@pytest.fixture
def images() -> torch.Tensor:
    """Two 64x48 images in [-1, 1] from a fixed seed."""
    generator = torch.Generator().manual_seed(1234)
    return torch.rand(2, 3, 64, 48, generator=generator) * 2 - 1


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), (
        f"only in first: {sorted(set(a) - set(b))[:5]}, only in second: {sorted(set(b) - set(a))[:5]}"
    )
    different = [key for key in a if a[key].shape != b[key].shape or not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.fixture
def assert_same_tensors():
    """A function asserting two state dicts have the same keys and bitwise-equal tensors under each."""
    return _assert_same_tensors
