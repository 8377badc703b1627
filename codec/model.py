"""`AutoencoderKL`: the SD VAE with diffusers' API and state-dict keys.

    vae = AutoencoderKL.from_pretrained("path/or/hub-id")
    posterior = vae.encode(x).latent_dist          # x: (B, 3, H, W) in [-1, 1]
    z = posterior.sample(generator)                # or posterior.mode()
    x_hat = vae.decode(z).sample

`encode`/`decode` also pad sizes that are not multiples of the downsampling factor (FLUX.2's: of twice it, so that
its latent splits into whole 2x2 patches), split large batches,
tile images that would not fit the memory budget, and recompute in fp32 whatever half precision turns
non-finite. `encode_latents`/`decode_latents` add the scaling and shift a diffusion model expects.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from codec import latent_norm, loading, single_file, weights
from codec.checkpoint import LoadedWeights, Provenance, load_checked
from codec.config import AutoencoderKLConfig, check_setting_names
from codec.distributions import DiagonalGaussianDistribution
from codec.inference import (
    DECODE,
    ENCODE,
    InferenceOptions,
    InferenceSetting,
    check_compile_mode,
    check_tile_size,
    run_pass,
)
from codec.layers import preferred_memory_format
from codec.networks import Decoder, Encoder
from codec.precision import forget_fp32_copy


@dataclass
class _Output:
    """As diffusers' BaseOutput: indexed by position or by field name, and `to_tuple()`."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __getitem__(self, key: int | str):
        if isinstance(key, str):
            if key not in {f.name for f in dataclasses.fields(self)}:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def items(self) -> list[tuple[str, object]]:
        return [(name, getattr(self, name)) for name in self.keys()]


@dataclass
class AutoencoderKLOutput(_Output):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(_Output):
    sample: torch.Tensor


class AutoencoderKL(nn.Module):
    # Inference settings, named as in diffusers where it has them: each reads and writes `inference_options`.
    use_tiling = InferenceSetting()
    use_slicing = InferenceSetting()
    memory_budget = InferenceSetting()  # checked where it is used: a bad one fails the next encode or decode
    tile_latent_size = InferenceSetting(check_tile_size)
    compile_mode = InferenceSetting(check_compile_mode)

    def __init__(self, config: AutoencoderKLConfig | None = None) -> None:
        super().__init__()
        self.inference_options = InferenceOptions()
        self.provenance = Provenance()  # a loader's record of where the weights came from
        self.config = config or AutoencoderKLConfig()
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if self.config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if self.config.use_post_quant_conv else None
        # FLUX.2's statistics of patchified latents (diffusers' `bn`); None where the config scales the latents.
        self.bn = latent_norm.build(self.config)
        # Convolution weights in the layout inference feeds activations in on their device (channels-last on a
        # CPU, codec.layers.preferred_memory_format), so that no call reorders every weight. Values and keys are
        # unchanged; the savers write contiguous copies. Moving to another kind of device re-picks it (_apply).
        self._layout_device: str | None = None
        self._match_layout_to_device()
        self._register_state_dict_hook(AutoencoderKL._contiguous_state)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._match_layout_to_device()
        forget_fp32_copy(self)
        return self

    @staticmethod
    def _contiguous_state(module, state_dict, prefix, local_metadata) -> None:
        # Channels-last weights (on a CPU) are not contiguous, and safetensors' save_file refuses those: a state
        # dict is for saving and copying, so it holds the standard layout.
        for key, value in state_dict.items():
            if key.startswith(prefix) and isinstance(value, torch.Tensor) and not value.is_contiguous():
                state_dict[key] = value.contiguous()

    def _match_layout_to_device(self) -> None:
        """Give the conv weights their device's preferred layout when the model lands on a new kind of device;
        on the same device an explicit `.to(memory_format=...)` is left as the caller set it."""
        weights = [p for p in self.parameters() if p.dim() == 4]
        device = weights[0].device if weights else None
        if device is None or device.type == self._layout_device:
            return
        fmt = preferred_memory_format(device)
        for weight in weights:
            if not weight.is_contiguous(memory_format=fmt):
                weight.data = weight.data.contiguous(memory_format=fmt)
        self._layout_device = device.type

    # ---- properties ---------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the weights are, or, offloaded by accelerate (a pipeline's `enable_sequential_cpu_offload`:
        weights on the meta device until each layer runs), where its hooks run them."""
        device = next(self.parameters()).device
        if device.type == "meta":
            for module in self.modules():
                execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
                if execution_device is not None:
                    return torch.device(execution_device)
        return device

    @property
    def offloaded(self) -> bool:
        """Whether accelerate's sequential offload holds the weights (they reach a layer only as it runs)."""
        return next(self.parameters()).device.type == "meta"

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def about(self) -> str | None:
        """The embedded model's description, where the model is the embedded one (`provenance.about`)."""
        return self.provenance.about

    @property
    def scaling_is_guess(self) -> bool:
        """Whether the scaling factor was guessed from a single file's shapes (`provenance.scaling_is_guess`)."""
        return self.provenance.scaling_is_guess

    # ---- raw network passes (no padding, tiling or fallback) ----------------------------------

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Mean and log-variance stacked on channels, for an input whose sides are multiples of the factor."""
        return self.encode_tail(self.encoder.forward_head(x))

    def encode_tail(self, features: torch.Tensor) -> torch.Tensor:
        """Latent-resolution features -> moments: the encoder's mid block and output, then quant_conv."""
        moments = self.encoder.forward_tail(features)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.forward_tail(self.decode_head(z))

    def decode_head(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> latent-resolution features: post_quant_conv, then the decoder's input conv and mid block."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder.forward_head(z)

    # ---- diffusers-compatible API -------------------------------------------------------------

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        self._run_offload_hook()
        posterior = DiagonalGaussianDistribution(run_pass(self, x, ENCODE))
        return AutoencoderKLOutput(posterior) if return_dict else (posterior,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        self._run_offload_hook()
        sample = run_pass(self, z, DECODE)
        return DecoderOutput(sample) if return_dict else (sample,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Reconstruct `sample`; the output has the input's size even when that is not a multiple of 8."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample[..., : sample.shape[-2], : sample.shape[-1]]
        return DecoderOutput(decoded) if return_dict else (decoded,)

    def _run_offload_hook(self) -> None:
        # accelerate's offload hooks (a pipeline's enable_model_cpu_offload) wrap forward, and pipelines call
        # encode and decode: diffusers runs the hook from those too, so that the model is on the execution device.
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)

    # ---- latents as a diffusion model sees them -----------------------------------------------

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> the unit-variance latent a diffusion model is trained on (see `codec.model.scale_latents`);
        for FLUX.2, its 2x2 patches batch-normalised (codec/latent_norm.py), as its pipelines make them."""
        if self.bn is not None:
            return self.bn.normalize(z)
        return scale_latents(z, self.config)

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `scale_latents`."""
        if self.bn is not None:
            return self.bn.denormalize(latents)
        return unscale_latents(latents, self.config)

    def encode_latents(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the posterior mean unless `sample`)."""
        posterior = self.encode(x).latent_dist
        return self.scale_latents(posterior.sample(generator) if sample else posterior.mode())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.decode(self.unscale_latents(latents)).sample

    # ---- switches, named as in diffusers ------------------------------------------------------

    def enable_tiling(self, tile_latent_size: int | None = None) -> None:
        """Tile encode and decode; `tile_latent_size`: the tile's side in latent pixels (None: the largest that
        fits the memory budget, at least 16). Under 16 the shared statistics are estimated from few pixels."""
        self.use_tiling = True
        self.tile_latent_size = tile_latent_size

    # diffusers' names for the tile size, in pixels and in latent positions (the overlap is ours, an eighth).
    @property
    def tile_sample_min_size(self) -> int | None:
        return None if self.tile_latent_size is None else self.tile_latent_size * self.config.downsample_factor

    @tile_sample_min_size.setter
    def tile_sample_min_size(self, pixels: int | None) -> None:
        factor = self.config.downsample_factor
        checked = check_tile_size(pixels, "tile_sample_min_size", "pixels", 2 * factor)
        self.tile_latent_size = None if checked is None else checked // factor

    @property
    def tile_latent_min_size(self) -> int | None:
        return self.tile_latent_size

    @tile_latent_min_size.setter
    def tile_latent_min_size(self, size: int | None) -> None:
        self.tile_latent_size = check_tile_size(size, "tile_latent_min_size")

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_compile(self, mode: str = "default") -> None:
        """Opt in to torch.compile for untiled, gradient-free encode and decode (tiled inference stays eager).

        The first call for each input shape and dtype compiles, which takes minutes on a CPU; it pays off over
        many calls of one shape, such as encoding a dataset cached at one resolution.
        """
        self.compile_mode = check_compile_mode(mode)

    def disable_compile(self) -> None:
        self.compile_mode = None

    def enable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = False

    @property
    def gradient_checkpointing(self) -> bool:
        return self.decoder.gradient_checkpointing

    # ---- weights ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        use_safetensors: bool | None = None,
        low_cpu_mem_usage: bool = True,
        **settings,
    ) -> AutoencoderKL:
        """Load a diffusers folder (or a pipeline's `vae/` subfolder) or a hub id (at `revision`: a branch, tag or
        commit; sharded weights are fetched shard by shard). Hub access follows huggingface_hub's environment
        (HF_TOKEN, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 for the cache alone) or cache_dir, token and
        local_files_only. As in diffusers, keyword arguments named after settings (`force_upcast=False`,
        `scaling_factor=...`) override config.json's. use_safetensors and low_cpu_mem_usage are accepted for
        diffusers' callers and change nothing: safetensors is read first when both formats are there, straight
        into place."""
        check_setting_names(settings)  # a typo fails now, not after a download
        hub = weights.HubOptions(cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        loaded = weights.read_pretrained(pretrained_model_name_or_path, subfolder, variant, revision, hub)
        model = cls._build(loaded, torch_dtype)
        if settings:
            model.register_to_config(**settings)
        return model

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        variant: str | None = None,
        *,
        is_main_process: bool = True,
        safe_serialization: bool = True,
    ) -> None:
        """Write config.json and diffusion_pytorch_model.safetensors, as diffusers does (only the main process
        writes, where a training script says which it is). Weights are written as safetensors only."""
        if not safe_serialization:
            raise ValueError("save_pretrained writes safetensors only (a pickled .bin can carry code)")
        if is_main_process:
            weights.write_pretrained(directory, self.state_dict(), self.config, variant=variant)

    @classmethod
    def from_config(cls, config: AutoencoderKLConfig | Mapping) -> AutoencoderKL:
        """A model with freshly initialised weights, from a config or a dict of one (diffusers' `from_config`,
        which also takes a diffusers model's `config`)."""
        if not isinstance(config, AutoencoderKLConfig):
            # Keys a newer diffusers adds are ignored with a warning, as diffusers does.
            config = AutoencoderKLConfig.from_dict(dict(config), source="from_config", strict=False)
        return cls(config)

    def register_to_config(self, **settings) -> None:
        """Change settings that leave the weights' meaning alone (`codec.config.SETTING_FIELDS`: scaling and
        shift, latent statistics, force_upcast, sample_size), as diffusers' `register_to_config` does."""
        self.config = self.config.with_settings(**settings)

    # Accepted for diffusers' and kohya's callers, and nothing to do: attention runs through torch's
    # scaled_dot_product_attention, which picks a memory-efficient kernel by itself.
    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        pass

    def disable_xformers_memory_efficient_attention(self) -> None:
        pass

    def set_use_memory_efficient_attention_xformers(self, valid: bool = True, attention_op=None) -> None:
        pass

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config: AutoencoderKLConfig | str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> AutoencoderKL:
        """Load an LDM-layout `.safetensors`/`.ckpt` (VAE alone or a whole SD checkpoint)."""
        return cls._build(single_file.read_single_file(path, config=config), torch_dtype)

    def save_single_file(self, path: str | os.PathLike) -> None:
        """Write the LDM layout that A1111, ComfyUI and diffusers' `from_single_file` read."""
        single_file.write_single_file(path, self.state_dict(), self.config, self.provenance.scaling_is_guess)

    @classmethod
    def load(cls, spec: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> AutoencoderKL:
        """Whatever a user names: a diffusers folder, a single file, a hub id, a preset or 'builtin'."""
        return cls._build(loading.read_model(spec), torch_dtype)

    @classmethod
    def _build(cls, loaded: LoadedWeights, torch_dtype: torch.dtype | None) -> AutoencoderKL:
        """The one place a model is built from what a loader read: every weight checked against the config
        before any is loaded, and the provenance kept."""
        if loaded.state_dict is None:
            with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
                torch.manual_seed(0)
                model = cls(loaded.config)
        else:
            model = cls(loaded.config)
            load_checked(model, loaded.state_dict, loaded.provenance.source or "the weights")
        model.provenance = loaded.provenance
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model.eval()


def scale_latents(z: torch.Tensor, config: AutoencoderKLConfig) -> torch.Tensor:
    """Raw latent -> what a diffusion model sees, as diffusers' pipelines make it: `(z - latents_mean) *
    scaling_factor / latents_std` where the config has per-channel statistics (SDXL's pipelines apply them when
    set: Playground v2.5, `codec stats --channel-stats`), else `(z - shift_factor) * scaling_factor` (SD, SDXL,
    SD3, FLUX)."""
    statistics = _latent_statistics(config, z)
    if statistics is not None:
        return (z - statistics[0]) * config.scaling_factor / statistics[1]
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(latents: torch.Tensor, config: AutoencoderKLConfig) -> torch.Tensor:
    """Inverse of `scale_latents`."""
    statistics = _latent_statistics(config, latents)
    if statistics is not None:
        return latents * statistics[1] / config.scaling_factor + statistics[0]
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def _latent_statistics(config: AutoencoderKLConfig, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if config.latents_mean is None or config.latents_std is None:
        return None
    if like.dim() not in (3, 4):  # (C, 1, 1) below would scale a video's (B, C, T, h, w) along T
        raise ValueError(f"latents of shape {tuple(like.shape)}: expected (C, h, w) or (B, C, h, w)")
    shape = (-1, 1, 1)  # per channel: (C, 1, 1) broadcasts over (C, h, w) and (B, C, h, w) alike
    mean, std = (
        torch.tensor(v, dtype=like.dtype, device=like.device).view(shape)
        for v in (config.latents_mean, config.latents_std)
    )
    return mean, std
