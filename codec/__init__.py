"""latent-codec: the Stable Diffusion VAE (AutoencoderKL) family, weight-compatible with diffusers and LDM files.

Importing this package loads only torch, safetensors and huggingface_hub; diffusers, datasets, lpips and
accelerate are imported inside the commands that need them.
"""

from codec.checkpoint import CheckpointError
from codec.config import PRESETS, AutoencoderKLConfig, ConfigError, preset
from codec.distributions import DiagonalGaussianDistribution
from codec.model import AutoencoderKL, AutoencoderKLOutput, DecoderOutput

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "AutoencoderKLOutput",
    "CheckpointError",
    "ConfigError",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "preset",
]
