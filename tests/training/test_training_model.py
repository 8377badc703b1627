"""The model the trainer builds: from-scratch posterior variance start, and its config checks."""

from __future__ import annotations

import pytest
import torch

from training.config import ConfigError, ModelConfig
from training.model import build_autoencoder


def _moments(vae, x):
    with torch.no_grad():
        return vae.encode_moments(x).chunk(2, dim=1)


def test_init_logvar_moves_only_the_log_variance():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    plain = build_autoencoder(ModelConfig(preset="tiny"))
    torch.manual_seed(0)
    shifted = build_autoencoder(ModelConfig(preset="tiny", init_logvar=-6.0))
    mean, logvar = _moments(plain, x)
    shifted_mean, shifted_logvar = _moments(shifted, x)
    torch.testing.assert_close(shifted_mean, mean)
    torch.testing.assert_close(shifted_logvar, logvar - 6.0, atol=1e-5, rtol=0)


def test_init_logvar_is_refused_for_pretrained_weights():
    with pytest.raises(ConfigError, match="init_logvar"):
        ModelConfig(init="builtin", init_logvar=-6.0).validate()


def test_running_means_average_every_micro_batch_and_start_afresh():
    from types import SimpleNamespace

    from training.state import RunningMeans

    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    means = RunningMeans()
    means.add({"loss": torch.tensor(1.0), "disc_active": 0.0})
    means.add({"loss": torch.tensor(3.0, requires_grad=True) * 1, "disc_active": 1.0})
    assert means.read(accelerator) == {"disc_active": 0.5, "loss": 2.0}
    means.add({"loss": torch.tensor(5.0)})
    assert means.read(accelerator) == {"loss": 5.0}  # only what came since the last read
    assert means.read(accelerator) == {}
    means.add({"loss": torch.tensor(7.0)}, weight=0.0)  # a blank stand-in batch: counts for nothing
    means.add({"loss": torch.tensor(3.0)})
    assert means.read(accelerator) == {"loss": 3.0}
    means.add({"loss": torch.tensor(7.0)}, weight=0.0)  # only blank batches since the last read: 0, not NaN
    assert means.read(accelerator) == {"loss": 0.0}
    means.add({"g_adv": 0.0, "loss": torch.tensor(1.0, dtype=torch.float64)})  # numbers join the tensors' device
    assert all(total.device == torch.device("cpu") and total.dtype == torch.float32 for total in means._sums.values())


def test_a_runs_own_model_config_is_read_strictly(tmp_path):
    import json

    import codec

    path = tmp_path / "model.json"
    path.write_text(json.dumps({**codec.preset("tiny").to_dict(), "block_out_channel": [8, 16]}))  # misspelt
    with pytest.raises(codec.ConfigError, match="block_out_channel"):
        build_autoencoder(ModelConfig(config=str(path)))  # not a default architecture trained for hours
