"""A codec's identity: sha256 over what makes its latents, so a cache can never be read with another codec.

What makes the latents: the encoder's weights (`encoder.*`, `quant_conv.*`) and the config, minus the fields that
do not change what the encoder outputs. The decoder is left out, as are its config fields: a decoder-only
fine-tune (sd-vae-ft-mse is one of SD's VAE) decodes the same latents and may train on the same cache. Scaling
(`scaling_factor`, `shift_factor`, `latents_mean`, `latents_std`, and FLUX.2's batch-norm statistics of patched
latents with their patch size and eps) is left out too: a cache stores raw posteriors
and scales them when read, so `codec stats --write-config` does not orphan the cache it was computed from;
`force_upcast` and `sample_size` are hints. The hash takes the config as sorted JSON, then, in the order of
their names, each tensor's name, dtype, shape and bytes; so ours and diffusers' AutoencoderKL with the same
weights have the same identity.

Caches written before 0.2 record the older identity ("sha256:..."), which hashed every weight, decoder included,
in our state_dict's order; `same_codec` and the cache writer compare a model (ours or diffusers') against those
in that scheme, so such caches stay valid.

Cost: one pass over the encoder's weights per precision hashed. For the SD VAE (84 M parameters, 34 M in the
encoder) on a 2-core CPU: 0.35 s for the fp32 identity (the older one, every weight: 0.7 s), 1.4 s for
`model_identities` (fp16 and bf16 casts included), once per run.

Weights cast to half precision are other numbers, so they hash differently; a cache records the identity of
the codec at float32, float16 and bfloat16, and a trainer holding the same weights in any of these matches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from codec.model import AutoencoderKL

PREFIX = "sha256-encoder:"
LEGACY_PREFIX = "sha256:"  # before 0.2: config and every weight
IGNORED_CONFIG_FIELDS = (
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "sample_size",
    "patch_size", "batch_norm_eps", "batch_norm_momentum",  # FLUX.2's normalisation, applied when read
)  # fmt: skip
DECODER_CONFIG_FIELDS = ("out_channels", "up_block_types", "use_post_quant_conv", "decoder_block_out_channels")
ENCODER_WEIGHTS = ("encoder.", "quant_conv.")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _as_our_config(config):
    if hasattr(config, "to_dict"):
        return config
    from codec.config import AutoencoderKLConfig  # diffusers' AutoencoderKL: a FrozenDict of config.json's fields

    # Keys this version does not know (a newer diffusers' fields) are left out, as from_json leaves them.
    return AutoencoderKLConfig.from_dict(dict(config), source="the diffusers model's config", strict=False)


def _config_bytes(config, legacy: bool) -> bytes:
    config = _as_our_config(config)
    left_out = IGNORED_CONFIG_FIELDS + (() if legacy else DECODER_CONFIG_FIELDS)
    data = {key: value for key, value in config.to_dict().items() if key not in left_out}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _hash(config, tensors, dtype: torch.dtype | None, legacy: bool) -> str:
    digest = hashlib.sha256(_config_bytes(config, legacy))
    for name, tensor in tensors:
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        tensor = tensor.detach().to("cpu", cast, memory_format=torch.contiguous_format).reshape(-1)  # one copy
        digest.update(f"\n{name}:{str(tensor.dtype).removeprefix('torch.')}:{list(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)  # raw bytes; works for bfloat16, which numpy lacks
    return (LEGACY_PREFIX if legacy else PREFIX) + digest.hexdigest()


def _state(vae, legacy: bool) -> list[tuple[str, torch.Tensor]]:
    if legacy:
        state = vae.state_dict()
        return [(name, state[name]) for name in _our_order(vae, state)]
    # The encoder's parts alone (the whole state_dict would copy the decoder too), sorted by name: diffusers'
    # AutoencoderKL registers the same tensors in another order.
    parts = [
        (prefix + name, tensor)
        for prefix in ENCODER_WEIGHTS
        if getattr(vae, prefix[:-1], None) is not None
        for name, tensor in getattr(vae, prefix[:-1]).state_dict().items()
    ]
    return sorted(parts, key=lambda item: item[0])


def _our_order(vae, state: dict) -> list[str]:
    """The legacy identity hashed weights in our AutoencoderKL's state_dict order; diffusers' registers the same
    names in another order, so its weights are put in ours (a model of ours built on the meta device: no memory)."""
    from codec.model import AutoencoderKL

    if isinstance(vae, AutoencoderKL):
        return list(state)
    with torch.device("meta"):
        ours = list(AutoencoderKL(_as_our_config(vae.config)).state_dict())
    return ours if sorted(ours) == sorted(state) else list(state)


def is_legacy(identity: str) -> bool:
    return identity.startswith(LEGACY_PREFIX)


def model_identity(vae: AutoencoderKL, *, legacy: bool = False) -> str:
    """The identity of a codec as it is now (its weights at their current dtype); `legacy`: as before 0.2."""
    return _hash(vae.config, _state(vae, legacy), None, legacy)


def model_identities(vae: AutoencoderKL) -> dict[str, str]:
    """Identities of these weights at float32, float16 and bfloat16; call it on the weights as loaded (float32)."""
    state = _state(vae, legacy=False)
    identities = {DTYPE_NAMES.get(vae.dtype, str(vae.dtype)): _hash(vae.config, state, None, False)}
    for dtype, name in DTYPE_NAMES.items():
        identities.setdefault(name, _hash(vae.config, state, dtype, False))
    return identities


def same_codec(codec: AutoencoderKL | str, recorded: Iterable[str]) -> bool:
    """Whether `codec` (an AutoencoderKL at any recorded precision, or an identity string) is one of `recorded`,
    comparing in the scheme the recorded identities were made in."""
    recorded = set(recorded)
    if isinstance(codec, str):
        _check_identity_string(codec)
        return codec in recorded
    return any(model_identity(codec, legacy=legacy) in recorded for legacy in {is_legacy(i) for i in recorded})


def _check_identity_string(text: str) -> None:
    if not text.startswith((PREFIX, LEGACY_PREFIX)):
        raise ValueError(
            f"codec={text!r}: a string here is an identity from a cache's manifest ({PREFIX}...); for a model, "
            f"pass the model itself, e.g. codec=AutoencoderKL.load({text!r})"
        )


def identity_of(codec: AutoencoderKL | str) -> str:
    """An identity string as given, or the identity of an AutoencoderKL (or anything with config + state_dict)."""
    if isinstance(codec, str):
        return codec
    if hasattr(codec, "state_dict") and hasattr(codec, "config"):
        return model_identity(codec)
    raise TypeError(f"expected an AutoencoderKL or an identity string, got {type(codec).__name__}")
