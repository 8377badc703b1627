"""training.losses and training.discriminator: values against hand computations, and where gradients go.

CPU only, tiny tensors, no network: LPIPS runs with a random trunk (pretrained=False), and the offline failure
of pretrained=True is simulated by an empty hub cache plus a download that raises.
"""

from __future__ import annotations

import socket
import urllib.error

import pytest
import torch
from torch import nn

import codec
from codec.distributions import DiagonalGaussianDistribution
from training.discriminator import (
    PatchGANDiscriminator,
    adaptive_weight,
    discriminator_step_loss,
    frozen,
    generator_adversarial_loss,
    generator_step_loss,
    hinge_d_loss,
)
from training.losses import KLLoss, LPIPSLoss, LPIPSUnavailable, PixelLoss, lpips_available


@pytest.fixture
def vae() -> codec.AutoencoderKL:
    torch.manual_seed(0)
    return codec.AutoencoderKL(codec.preset("tiny")).train()


@pytest.fixture
def disc() -> PatchGANDiscriminator:
    torch.manual_seed(1)
    return PatchGANDiscriminator(channels=8, layers=3).train()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1


@pytest.fixture(scope="module")
def lpips_loss() -> LPIPSLoss:
    torch.manual_seed(3)
    return LPIPSLoss(net="alex", weight=0.5, pretrained=False)


def reconstruct(vae: codec.AutoencoderKL, x: torch.Tensor) -> tuple[DiagonalGaussianDistribution, torch.Tensor]:
    # The raw training path: no padding, tiling or fallbacks.
    posterior = DiagonalGaussianDistribution(vae.encode_moments(x))
    return posterior, vae.decode_raw(posterior.sample(torch.Generator().manual_seed(4)))


class Counting(nn.Module):
    """Wraps a discriminator and counts its forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(images)


# ---- pixel, KL, hinge --------------------------------------------------------------------------


def test_pixel_loss_matches_manual(x):
    y = x.flip(0)
    l1, logs = PixelLoss("l1", weight=2.0)(x, y)
    assert torch.allclose(l1, 2.0 * (x - y).abs().mean())
    assert float(logs["pixel_l1"]) == pytest.approx((x - y).abs().mean().item())
    # Detached tensors, left on the device: the trainer reads them at log steps, not a GPU sync per step.
    assert isinstance(logs["pixel_loss"], torch.Tensor) and not logs["pixel_loss"].requires_grad
    l2, logs = PixelLoss("l2", weight=0.5)(x, y)
    assert torch.allclose(l2, 0.5 * ((x - y) ** 2).sum() / x.numel())
    assert float(logs["pixel_l2"]) == pytest.approx(((x - y) ** 2).mean().item())
    with pytest.raises(ValueError):
        PixelLoss("l3")  # type: ignore[arg-type]


def test_kl_is_sum_over_latent_mean_over_batch():
    params = torch.randn(3, 8, 4, 5, generator=torch.Generator().manual_seed(5))
    posterior = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    by_hand = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / 3
    loss, logs = KLLoss(weight=1e-3)(posterior)
    assert torch.allclose(loss, 1e-3 * by_hand)
    assert float(logs["kl"]) == pytest.approx(by_hand.item(), rel=1e-5)
    assert float(logs["kl_loss"]) == pytest.approx(1e-3 * by_hand.item(), rel=1e-5)


def test_hinge_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)).item() == 0.0
    assert generator_adversarial_loss(fake).item() == pytest.approx(1 / 3)


# ---- LPIPS -------------------------------------------------------------------------------------


def test_lpips_gradient_reaches_reconstruction_only(lpips_loss, x):
    rec = (x.flip(0) * 0.5).requires_grad_(True)
    loss, logs = lpips_loss(rec, x)
    loss.backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips_loss.parameters())
    assert float(logs["lpips_loss"]) == pytest.approx(0.5 * float(logs["lpips"]))


def test_lpips_stays_frozen_and_in_eval_under_parent_train(lpips_loss):
    parent = nn.ModuleDict({"lpips": lpips_loss, "other": nn.Linear(2, 2)})
    parent.train()
    assert lpips_loss.training and parent["other"].training
    assert not any(m.training for m in lpips_loss.lpips.modules())
    assert not any(p.requires_grad for p in lpips_loss.parameters())


def test_lpips_is_zero_for_identical_images_and_grows_with_noise(lpips_loss, x):
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    same, _ = lpips_loss(x, x)
    small, _ = lpips_loss((x + 0.05 * noise).clamp(-1, 1), x)
    large, _ = lpips_loss((x + 0.5 * noise).clamp(-1, 1), x)
    assert abs(same.item()) < 1e-6
    assert 0 < small.item() < large.item()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache and a download that fails as it does without a network, whatever the machine."""

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    lpips_available.cache_clear()
    yield no_network
    lpips_available.cache_clear()


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_pretrained_offline_raises_lpips_unavailable(offline, net, tmp_path):
    with pytest.raises(LPIPSUnavailable, match="could not be fetched") as caught:
        LPIPSLoss(net=net, pretrained=True)
    message = str(caught.value)
    assert "lpips_weight=0" in message and str(tmp_path / "hub") in message
    assert isinstance(caught.value.__cause__, OSError)


def test_lpips_other_oserrors_and_random_trunk_offline(offline, monkeypatch):
    def refused(url, *args, **kwargs):
        raise ConnectionRefusedError("proxy refused")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refused)
    with pytest.raises(LPIPSUnavailable):
        LPIPSLoss(net="alex", pretrained=True)
    assert lpips_available("alex") is False
    LPIPSLoss(net="alex", pretrained=False)  # a random trunk downloads nothing
    with pytest.raises(ValueError):
        LPIPSLoss(net="squeezenet", pretrained=False)  # type: ignore[arg-type]


# ---- discriminator and the two GAN steps -------------------------------------------------------


def test_patchgan_shape_and_ldm_init():
    torch.manual_seed(7)
    disc = PatchGANDiscriminator(in_channels=3, channels=64, layers=3)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and convs[-1].out_channels == 1
    assert [c.out_channels for c in convs[:-1]] == [64, 128, 256, 512]
    assert all(abs(c.weight.std().item() - 0.02) < 0.005 for c in convs)
    norms = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3 and all(torch.equal(n.bias, torch.zeros_like(n.bias)) for n in norms)
    assert all(abs(n.weight.mean().item() - 1.0) < 0.01 for n in norms)
    assert "main.0.weight" in disc.state_dict()  # LDM's key layout


def test_adaptive_weight_is_the_gradient_norm_ratio(vae, disc, x):
    _, rec = reconstruct(vae, x)
    last = vae.decoder.conv_out.weight
    nll = (rec - x).abs().mean()
    g = generator_adversarial_loss(disc(rec))
    weight = adaptive_weight(nll, g, last)
    nll.backward(retain_graph=True)
    nll_grad, last.grad = last.grad.clone(), None
    g.backward(retain_graph=True)
    expected = nll_grad.norm() / (last.grad.norm() + 1e-4)
    assert torch.allclose(weight, expected, rtol=1e-5)
    assert not weight.requires_grad
    assert adaptive_weight(nll, g, last, max_weight=expected.item() / 2).item() == pytest.approx(expected.item() / 2)


def test_discriminator_step_puts_no_gradient_into_the_vae(vae, disc, x):
    _, rec = reconstruct(vae, x)
    assert rec.requires_grad  # not detached by the test: the function must do it
    loss, logs = discriminator_step_loss(disc, x, rec, step=10, disc_start=0)
    loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in disc.parameters())
    assert logs["disc_active"] == 1.0 and float(logs["d_loss"]) == pytest.approx(loss.item())


def test_generator_step_puts_no_gradient_into_the_discriminator(vae, disc, x):
    disc.main[0].bias.requires_grad_(False)  # a parameter frozen beforehand must stay frozen afterwards
    _, rec = reconstruct(vae, x)
    nll = (rec - x).abs().mean()
    last = vae.decoder.conv_out.weight
    g, logs = generator_step_loss(disc, rec, nll, last, step=5, disc_start=5, disc_weight=0.5)
    (nll + g).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert last.grad is not None and last.grad.abs().sum() > 0
    assert [p.requires_grad for p in disc.parameters()].count(False) == 1 and not disc.main[0].bias.requires_grad
    expected = 0.5 * float(logs["adaptive_weight"]) * float(logs["g_adv"])
    assert float(logs["g_adv_loss"]) == pytest.approx(expected, rel=1e-5)


def test_generator_step_without_adaptive_weight(vae, disc, x):
    _, rec = reconstruct(vae, x)
    g, logs = generator_step_loss(disc, rec, rec.mean(), None, step=0, disc_start=0, disc_weight=0.25, adaptive=False)
    assert torch.allclose(g, 0.25 * -disc(rec).mean())
    assert float(logs["adaptive_weight"]) == 1.0
    with torch.no_grad():  # validation: no gradients to compare, so LDM's adaptive weight of 0
        g, logs = generator_step_loss(disc, rec, rec.mean(), vae.decoder.conv_out.weight, 0, 0, 0.5)
    assert g.item() == 0.0 and float(logs["adaptive_weight"]) == 0.0


def test_before_disc_start_both_losses_are_zero_without_running_the_discriminator(vae, disc, x):
    counting = Counting(disc)
    _, rec = reconstruct(vae, x)
    nll = (rec - x).abs().mean()
    last = vae.decoder.conv_out.weight
    g, g_logs = generator_step_loss(counting, rec, nll, last, step=99, disc_start=100, disc_weight=0.5)
    d, d_logs = discriminator_step_loss(counting, x, rec, step=99, disc_start=100)
    assert g.item() == 0.0 and d.item() == 0.0 and counting.calls == 0
    assert not d.requires_grad and g_logs["disc_active"] == d_logs["disc_active"] == 0.0
    (nll + g).backward()  # the zero adds to the VAE's loss harmlessly
    assert all(p.grad is None for p in disc.parameters())
    generator_step_loss(counting, rec.detach(), nll, last, step=100, disc_start=100, disc_weight=0.5, adaptive=False)
    discriminator_step_loss(counting, x, rec, step=100, disc_start=100)
    assert counting.calls == 3  # active from disc_start on: one pass for the generator, two for the discriminator


def test_frozen_restores_flags_on_error():
    layer = nn.Linear(2, 2)
    with pytest.raises(KeyError), frozen(layer):
        assert not any(p.requires_grad for p in layer.parameters())
        raise KeyError
    assert all(p.requires_grad for p in layer.parameters())


def test_adaptive_weight_under_fp16_autocast_takes_the_loss_scale():
    # A reconstruction loss whose per-pixel gradients are too small for fp16 (a mean over many pixels): the head's
    # fp16 gradients round to a few units of 6e-8, and the ratio drifts; scaled first, it is fp32's.
    torch.manual_seed(0)
    x, target = torch.randn(2, 16, 64, 64), torch.randn(2, 3, 64, 64)
    last = torch.nn.Parameter(torch.randn(3, 16, 3, 3) * 0.05)

    def weight(half: bool, loss_scale: float = 1.0) -> float:
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            y = torch.nn.functional.conv2d(x, last, padding=1)
        nll = 1e-3 * (y.float() - target).abs().mean()
        g = -y.float()[:, :, ::4, ::4].mean()
        return adaptive_weight(nll, g, last, loss_scale=loss_scale).item()

    exact = weight(half=False)
    assert abs(weight(half=True) / exact - 1) > 0.1  # what fp16 alone gives
    assert weight(half=True, loss_scale=2.0**16) == pytest.approx(exact, rel=1e-3)
    assert weight(half=True, loss_scale=float("inf")) == 0.0  # an overflowed scale: no adversarial term this step
