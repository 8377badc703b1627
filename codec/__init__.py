"""latent-codec: the Stable Diffusion VAE (AutoencoderKL) family, weight-compatible with diffusers and LDM files.

Importing this package loads only torch, safetensors and huggingface_hub; diffusers, datasets, lpips and
accelerate are imported inside the commands that need them; `LatentDataset`, `BucketBatchSampler` and
`LatentStream` (which need pyarrow) load on first use.
"""

from codec.checkpoint import CheckpointError
from codec.config import PRESETS, AutoencoderKLConfig, ConfigError, preset
from codec.distributions import DiagonalGaussianDistribution
from codec.model import AutoencoderKL, AutoencoderKLOutput, DecoderOutput
from codec.version import __version__ as __version__

__all__ = [
    "PRESETS",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "AutoencoderKLOutput",
    "BucketBatchSampler",
    "CheckpointError",
    "ConfigError",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "LatentDataset",
    "LatentStream",
    "preset",
]

_LAZY = ("LatentDataset", "BucketBatchSampler", "LatentStream")


def __getattr__(name: str):
    # Lazily, so `import codec` stays free of pyarrow and the cache code until a trainer asks for them.
    if name in _LAZY:
        import codec.cache

        return getattr(codec.cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
