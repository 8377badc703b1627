"""rFID: the Fréchet distance against scipy's sqrtm and a closed form, and the offline Inception features."""

from __future__ import annotations

import numpy as np
import pytest

from codec.bench import fid


def _reference_fid(x1: np.ndarray, x2: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance, written out directly with scipy.linalg.sqrtm."""
    from scipy import linalg

    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize(("n1", "n2", "dim"), [(30, 40, 64), (200, 150, 32), (12, 12, 48)])
def test_fid_matches_scipy_sqrtm_on_random_features(n1, n2, dim):
    rng = np.random.default_rng(n1 + dim)
    x1 = rng.normal(size=(n1, dim))
    x2 = rng.normal(size=(n2, dim)) @ rng.normal(scale=0.3, size=(dim, dim)) + 0.2
    expected = _reference_fid(x1, x2)
    assert fid.fid_from_features(x1, x2) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert fid.frechet_distance(*fid.statistics(x1), *fid.statistics(x2)) == pytest.approx(expected, rel=1e-6)


def test_fid_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(20, 2048))
    assert fid.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_form():
    # N(0, I) against N(m, 4 I) in d dimensions: |m|^2 + d (1 + 4 - 2 * 2) = |m|^2 + d.
    dim = 10
    mean = np.arange(dim, dtype=np.float64) / 10
    value = fid.frechet_distance(np.zeros(dim), np.eye(dim), mean, 4 * np.eye(dim))
    assert value == pytest.approx(mean @ mean + dim)


def test_fid_needs_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        fid.fid_from_features(np.zeros((1, 8)), np.zeros((5, 8)))


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "default_1.pt"
    with pytest.raises(fid.FIDUnavailable, match=r"default_1\.pt"):
        fid.InceptionFeatures("cpu", path=missing)


def test_damaged_weights_file_is_refused(tmp_path):
    damaged = tmp_path / "default_1.pt"
    damaged.write_bytes(b"not the inception weights")
    with pytest.raises(fid.FIDUnavailable, match="SHA-1"):
        fid.InceptionFeatures("cpu", path=damaged)


def test_inception_features_offline():
    """The shipped TorchScript Inception loads without a network and gives 2048-d pool3 features."""
    try:
        path = fid.weights_path()
    except fid.FIDUnavailable as error:
        pytest.skip(str(error))
    extractor = fid.InceptionFeatures("cpu", path=path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(2)]
    images.append(np.full((40, 48, 3), 128, dtype=np.uint8))  # different sizes resize to 299x299 alike
    features = extractor(images)
    assert features.shape == (3, fid.FEATURES) and np.isfinite(features).all()
    assert (features >= 0).all()  # pool3 follows a ReLU
    assert not np.allclose(features[0], features[2])
    assert np.allclose(extractor(images[:1]), features[:1], atol=1e-4)  # batch composition does not matter
