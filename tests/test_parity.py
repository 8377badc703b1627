"""Ours against diffusers with the same weights, in fp32: the posterior, its statistics, decoding and forward;
gradients (with and without checkpointing); padding of odd sizes; latent scaling. The tiny config throughout,
and encode and decode once on the full SD config (what real checkpoints use: its widths, depth and groups)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import codec

ATOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _assert_parity(name: str, a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.dtype == b.dtype == torch.float32, (a.dtype, b.dtype)
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
    diff = _max_diff(a, b)
    print(f"parity {name}: max abs diff {diff:.3g}")
    assert diff < atol, f"{name}: max abs diff {diff} >= {atol}"
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture
def posteriors(ours, diffusers_vae, images):
    with torch.no_grad():
        return ours.encode(images).latent_dist, diffusers_vae.encode(images).latent_dist


def test_posterior_mean_and_logvar(posteriors):
    mine, theirs = posteriors
    assert isinstance(mine, codec.DiagonalGaussianDistribution)
    assert mine.mean.shape == (2, 4, 8, 6)
    _assert_parity("mean", mine.mean, theirs.mean)
    _assert_parity("logvar", mine.logvar, theirs.logvar)
    _assert_parity("std", mine.std, theirs.std)
    _assert_parity("var", mine.var, theirs.var)
    _assert_parity("mode", mine.mode(), theirs.mode())
    assert not torch.equal(mine.mean[0], mine.mean[1])  # the two images encode differently


def test_sample_with_equal_seeds(posteriors):
    mine, theirs = posteriors
    a = mine.sample(torch.Generator().manual_seed(7))
    b = theirs.sample(generator=torch.Generator().manual_seed(7))
    _assert_parity("sample", a, b)
    assert torch.equal(a, mine.sample(torch.Generator().manual_seed(7)))  # the seed fixes the sample
    assert not torch.allclose(a, mine.sample(torch.Generator().manual_seed(8)))  # and it is random
    assert not torch.allclose(a, mine.mode())


def test_sample_with_a_generator_per_image(posteriors):
    mine, theirs = posteriors
    a = mine.sample([torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    b = theirs.sample(generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    _assert_parity("sample per image", a, b)
    first_alone = mine.sample([torch.Generator().manual_seed(7), torch.Generator().manual_seed(99)])
    assert torch.equal(a[0], first_alone[0]) and not torch.equal(a[1], first_alone[1])
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        mine.sample([torch.Generator()] * 3)


def test_kl_and_nll(posteriors):
    mine, theirs = posteriors
    assert mine.kl().shape == (2,)
    _assert_parity("kl", mine.kl(), theirs.kl())
    z = theirs.sample(generator=torch.Generator().manual_seed(3))
    _assert_parity("nll", mine.nll(z), theirs.nll(z))
    _assert_parity("nll dims (1, 2)", mine.nll(z, dims=(1, 2)), theirs.nll(z, dims=[1, 2]))


def test_kl_between_two_posteriors(ours, diffusers_vae, images):
    with torch.no_grad():
        mine = [ours.encode(images[i : i + 1]).latent_dist for i in range(2)]
        theirs = [diffusers_vae.encode(images[i : i + 1]).latent_dist for i in range(2)]
    kl = mine[0].kl(mine[1])
    _assert_parity("kl(other)", kl, theirs[0].kl(theirs[1]))
    assert kl.item() > 0
    assert mine[0].kl(mine[0]).abs().item() < 1e-3  # KL of a distribution to itself is zero


def test_distribution_clamps_logvar_as_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as TheirDistribution

    generator = torch.Generator().manual_seed(0)
    parameters = torch.randn(2, 8, 3, 5, generator=generator) * 40  # logvar far beyond (-30, 20) in places
    mine, theirs = codec.DiagonalGaussianDistribution(parameters), TheirDistribution(parameters)
    assert mine.logvar.max() == 20 and mine.logvar.min() == -30
    _assert_parity("clamped logvar", mine.logvar, theirs.logvar)
    _assert_parity("clamped std", mine.std, theirs.std)


def test_decode(ours, diffusers_vae, posteriors):
    _, theirs = posteriors
    z = theirs.sample(generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        mine_out, their_out = ours.decode(z).sample, diffusers_vae.decode(z).sample
    assert mine_out.shape == (2, 3, 64, 48)
    _assert_parity("decode", mine_out, their_out)


def test_forward(ours, diffusers_vae, images):
    with torch.no_grad():
        _assert_parity("forward", ours(images).sample, diffusers_vae(images).sample)
        mine = ours(images, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        theirs = diffusers_vae(images, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        _assert_parity("forward sample_posterior", mine, theirs)
        assert not torch.allclose(mine, ours(images).sample)


def test_return_dict_false_gives_tuples(ours, diffusers_vae, images):
    with torch.no_grad():
        encoded = ours.encode(images, return_dict=False)
        assert isinstance(encoded, tuple) and len(encoded) == 1
        assert isinstance(encoded[0], codec.DiagonalGaussianDistribution)
        decoded = ours.decode(encoded[0].mode(), return_dict=False)
        assert isinstance(decoded, tuple) and len(decoded) == 1 and isinstance(decoded[0], torch.Tensor)
        forward = ours(images, return_dict=False)
        assert isinstance(forward, tuple) and len(forward) == 1
        their_forward = diffusers_vae(images, return_dict=False)
        assert type(their_forward) is type(forward)
        _assert_parity("forward tuple", forward[0], their_forward[0])
        _assert_parity("decode tuple", decoded[0], forward[0])
        # The output objects are read as diffusers' are: by position, by name, or as a tuple.
        ours_out, their_out = ours(images), diffusers_vae(images)
        for key in (0, "sample"):
            _assert_parity(f"output[{key!r}]", ours_out[key], their_out[key])
        assert len(ours_out.to_tuple()) == len(their_out.to_tuple()) == 1
        assert ours.encode(images)["latent_dist"] is not None


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    reconstruction = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample
    kl = model.encode(x).latent_dist.kl()
    return (reconstruction - x).square().mean() + 1e-3 * kl.mean()


def _gradients(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _loss(model, x).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_every_parameter_gets_a_finite_gradient(ours, images):
    ours.train()
    gradients = _gradients(ours, images[:1])
    assert set(gradients) == {name for name, _ in ours.named_parameters()}
    missing = [name for name, grad in gradients.items() if grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    infinite = [name for name, grad in gradients.items() if not torch.isfinite(grad).all()]
    assert not infinite, f"non-finite gradient for {infinite[:5]}"
    zero = [name for name, grad in gradients.items() if not grad.abs().sum() > 0]
    # Softmax ignores a constant added to every logit, so the key projection's bias alone may get a zero gradient.
    assert all(name.endswith("to_k.bias") for name in zero), zero


def test_gradients_match_diffusers(ours, diffusers_vae, images):
    theirs = copy.deepcopy(diffusers_vae).train()
    ours.train()
    mine, their_grads = _gradients(ours, images[:1]), _gradients(theirs, images[:1])
    for name, grad in mine.items():
        scale = their_grads[name].abs().max().item()
        assert _max_diff(grad, their_grads[name]) <= 1e-4 * max(scale, 1.0), name


def test_gradient_checkpointing_gives_same_gradients(ours, images, monkeypatch):
    ours.train()
    assert not ours.gradient_checkpointing
    plain = {name: grad.clone() for name, grad in _gradients(ours, images[:1]).items()}

    import codec.networks

    calls = []
    real_checkpoint = codec.networks.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(codec.networks, "checkpoint", counting_checkpoint)
    ours.enable_gradient_checkpointing()
    assert ours.gradient_checkpointing
    checkpointed = _gradients(ours, images[:1])
    assert calls, "gradient checkpointing was enabled but nothing was checkpointed"
    worst = max(_max_diff(plain[name], checkpointed[name]) for name in plain)
    print(f"gradient checkpointing: max abs gradient diff {worst:.3g}")
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=0, msg=name)

    calls.clear()
    ours.disable_gradient_checkpointing()
    _gradients(ours, images[:1])
    assert not calls


def test_sd_config_encodes_and_decodes_as_diffusers():
    import diffusers
    from accelerate import init_empty_weights

    config = codec.preset("sd")
    torch.manual_seed(0)
    mine = codec.AutoencoderKL(config).eval()
    with init_empty_weights():  # no second random init of 84M weights: ours are loaded into it
        theirs = diffusers.AutoencoderKL(**config.to_dict())
    theirs.load_state_dict(mine.state_dict(), assign=True)
    theirs.eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior, their_posterior = mine.encode(x).latent_dist, theirs.encode(x).latent_dist
        assert posterior.mean.shape == (1, 4, 4, 4)
        _assert_parity("sd mean", posterior.mean, their_posterior.mean)
        _assert_parity("sd logvar", posterior.logvar, their_posterior.logvar)
        z = their_posterior.sample(generator=torch.Generator().manual_seed(4))
        decoded, their_decoded = mine.decode(z).sample, theirs.decode(z).sample
    assert decoded.shape == (1, 3, 32, 32) and decoded.std() > 0.01  # a real output, not a constant
    _assert_parity("sd decode", decoded, their_decoded)


@pytest.mark.parametrize("size", [(37, 53), (33, 31)])
def test_odd_sizes_pad_up(ours, size):
    height, width = size
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        reconstruction = ours(x).sample
        latent = ours.encode(x).latent_dist.mean
        padded = ours.decode(ours.encode(x).latent_dist.mode()).sample  # whole latents decode to multiples of 8
    assert reconstruction.shape == x.shape
    assert torch.equal(reconstruction, padded[..., :height, :width])  # the padding is at the bottom and right
    assert latent.shape[-2:] == ours.config.latent_shape(height, width)[1:]
    if size == (37, 53):
        assert latent.shape[-2:] == (5, 7)


def test_odd_size_gradients_flow(ours):
    ours.train()
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = ours(x).sample
    assert out.shape == x.shape
    (out - x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


@pytest.fixture
def shifted_vae(tiny_config):
    config = dataclasses.replace(tiny_config, scaling_factor=0.3611, shift_factor=0.1159)
    torch.manual_seed(0)
    return codec.AutoencoderKL(config).eval()


def test_scale_and_unscale_latents_invert_each_other(shifted_vae):
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1
    scaled = shifted_vae.scale_latents(z)
    torch.testing.assert_close(scaled, (z - 0.1159) * 0.3611)
    torch.testing.assert_close(shifted_vae.unscale_latents(scaled), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shifted_vae.scale_latents(shifted_vae.unscale_latents(z)), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shifted_vae.unscale_latents(z), z / 0.3611 + 0.1159)
    assert not torch.allclose(scaled, z * 0.3611)  # the shift is applied


def test_scale_latents_without_shift(ours):
    assert ours.config.shift_factor is None
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours.scale_latents(z), z * ours.config.scaling_factor)
    torch.testing.assert_close(ours.unscale_latents(ours.scale_latents(z)), z)


def test_encode_and_decode_latents_apply_scaling(shifted_vae, images):
    with torch.no_grad():
        mean = shifted_vae.encode(images).latent_dist.mean
        latents = shifted_vae.encode_latents(images)
        torch.testing.assert_close(latents, (mean - 0.1159) * 0.3611)
        # Against the decode of the unscaled latents, not of `mean`: the scale-and-back round trip moves the mean by
        # fp32 rounding, which a random decoder amplifies past 1e-5 on some CPUs (1.2e-5 with AVX-512 kernels).
        torch.testing.assert_close(
            shifted_vae.decode_latents(latents), shifted_vae.decode(latents / 0.3611 + 0.1159).sample
        )
        assert (shifted_vae.decode_latents(latents) - shifted_vae.decode(mean).sample).abs().max() < 1e-4
