"""LPIPS in the benchmark: a missing backbone is 'unavailable' (never a random network's number); plumbing."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch

pytest.importorskip("lpips")

from codec.bench.perceptual import load_lpips


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No cached trunk weights and no network: torchvision's download fails as it does offline."""
    import torchvision.models._api as api

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: refused {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(api, "load_state_dict_from_url", refuse)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_missing_backbone_is_unavailable(offline, net):
    metric = load_lpips(net, torch.device("cpu"))
    assert not metric.available
    assert "could not be downloaded" in metric.reason and "offline test" in metric.reason
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    assert metric(image, image) is None


def test_random_trunk_plumbing():
    """With a random trunk (tests only) the metric runs: 0 for identical images, positive otherwise."""
    metric = load_lpips("alex", torch.device("cpu"), random_trunk=True)
    assert metric.available and metric.random_trunk
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert metric(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metric(a, b) > 0


def test_unknown_net():
    with pytest.raises(ValueError, match="alex, vgg"):
        load_lpips("resnet", torch.device("cpu"))
