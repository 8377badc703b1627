"""Half-precision weights on a CPU that would emulate them compute with an fp32 copy (codec.precision)."""

from __future__ import annotations

import copy

import pytest
import torch

from codec import precision


@pytest.fixture
def bf16_model(ours):
    return copy.deepcopy(ours).to(torch.bfloat16)


def _decode(model, z):
    with torch.no_grad():
        return model.decode(z.to(model.dtype)).sample


def _latent(model) -> torch.Tensor:
    """Representable in bf16, so the bf16 model and an fp32 reference decode the same numbers."""
    z = torch.randn(1, model.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    return z.to(torch.bfloat16).float()


def test_emulated_half_decodes_with_an_fp32_copy_and_returns_its_dtype(bf16_model, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    z = _latent(bf16_model)
    expected = _decode(copy.deepcopy(bf16_model).float(), z).to(torch.bfloat16)
    out = _decode(bf16_model, z)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # native: bf16 arithmetic, other bits
    assert not torch.equal(_decode(bf16_model, z), expected)


def test_the_fp32_copy_follows_weight_changes_and_settings(bf16_model, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    z = _latent(bf16_model)
    first = _decode(bf16_model, z)
    assert precision.fp32_copy(bf16_model) is precision.fp32_copy(bf16_model)  # made once
    with torch.no_grad():
        bf16_model.decoder.conv_out.bias.add_(0.25)  # in place: the copy must not go stale
    second = _decode(bf16_model, z)
    assert not torch.equal(first, second)
    assert torch.equal(second, _decode(copy.deepcopy(bf16_model).float(), z).to(torch.bfloat16))
    with torch.no_grad():  # through .data, as diffusers' EMAModel.copy_to writes: no version counter moves
        bf16_model.decoder.conv_out.weight.data = bf16_model.decoder.conv_out.weight.data * 0.5
    third = _decode(bf16_model, z)
    assert torch.equal(third, _decode(copy.deepcopy(bf16_model).float(), z).to(torch.bfloat16))
    assert not torch.equal(third, second)
    bf16_model.enable_tiling(4)
    assert precision.fp32_copy(bf16_model).use_tiling and precision.fp32_copy(bf16_model).tile_latent_size == 4
    bf16_model.float()  # a model moved or cast lets its copy go
    assert precision._copies.get(bf16_model) is None


def test_a_state_dict_is_contiguous_whatever_the_layout(ours, tmp_path):
    from safetensors.torch import load_file, save_file

    ours.to(memory_format=torch.channels_last)
    assert not ours.encoder.conv_in.weight.is_contiguous()
    save_file(ours.state_dict(), str(tmp_path / "weights.safetensors"))  # refuses non-contiguous tensors
    saved = load_file(str(tmp_path / "weights.safetensors"))
    assert torch.equal(saved["encoder.conv_in.weight"], ours.encoder.conv_in.weight)


def test_only_half_precision_on_a_cpu_counts_as_emulated(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_fp16", lambda: False)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert precision.emulated_on_cpu(torch.bfloat16, cpu) and precision.emulated_on_cpu(torch.float16, cpu)
    assert not precision.emulated_on_cpu(torch.float32, cpu)
    assert not precision.emulated_on_cpu(torch.bfloat16, meta)  # a GPU's half precision is its own business
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert not precision.emulated_on_cpu(torch.bfloat16, cpu)


def test_training_keeps_half_precision_arithmetic(bf16_model, monkeypatch):
    """With gradients on, nothing is swapped: the trainer must optimise the network it holds."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    x = torch.rand(1, 3, 16, 16, dtype=torch.bfloat16) * 2 - 1
    moments = bf16_model.encode_moments(x)
    assert moments.requires_grad and moments.dtype == torch.bfloat16
    assert bf16_model not in precision._copies  # no fp32 copy was made or used


def test_a_copy_made_under_inference_mode_serves_later_no_grad_calls(bf16_model, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    z = _latent(bf16_model).to(torch.bfloat16)
    with torch.inference_mode():
        first = bf16_model.decode(z).sample
    with torch.no_grad():  # refreshing the copy's weights in place had raised on its inference tensors
        assert torch.equal(bf16_model.decode(z).sample, first)
