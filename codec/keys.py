"""State-dict key layouts: diffusers' (ours), the original LDM/CompVis one of single files, and diffusers' legacy.

LDM names the decoder's levels from the lowest resolution up (`decoder.up.0` is the last block to run),
diffusers from the first block run (`decoder.up_blocks.0`), so decoder levels are reversed between them.
"""

from __future__ import annotations

import re

import torch

# (LDM pattern, diffusers replacement) for every part that is not a decoder level index.
_LDM_TO_DIFFUSERS = [
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
]
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_PROJECTION = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_LDM_ATTENTION_PROJECTION = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def is_ldm_layout(keys) -> bool:
    return any(key.startswith(("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")) for key in keys)


def _decoder_levels(keys) -> int:
    levels = {int(m.group(1)) for key in keys if (m := re.match(r"decoder\.up\.(\d+)\.", key))}
    return max(levels) + 1 if levels else 0


def ldm_to_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = _decoder_levels(tensors)
    converted = {}
    for key, value in tensors.items():
        new = key
        if m := re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.", new):
            index = levels - 1 - int(m.group(1))
            part = "resnets." if m.group(2) == "block" else "upsamplers.0."
            new = f"decoder.up_blocks.{index}.{part}" + new[m.end() :]
        for pattern, replacement in _LDM_TO_DIFFUSERS:
            new = re.sub(pattern, replacement, new)
        if _ATTENTION_PROJECTION.search(new) and value.dim() == 4:
            value = value[:, :, 0, 0]  # LDM stores these projections as 1x1 convolutions
        converted[new] = value
    return converted


def diffusers_to_ldm(tensors: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Inverse of `ldm_to_diffusers`, with attention projections written as 1x1 convs as LDM did."""
    converted = {}
    for key, value in tensors.items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", new)
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", new):
            part = "block." if m.group(2) == "resnets" else "upsample."
            new = f"decoder.up.{levels - 1 - int(m.group(1))}.{part}" + new[m.end() :]
        new = re.sub(r"\.mid_block\.resnets\.0\.", ".mid.block_1.", new)
        new = re.sub(r"\.mid_block\.resnets\.1\.", ".mid.block_2.", new)
        new = re.sub(r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm.", new)
        new = re.sub(r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1.", new)
        new = re.sub(r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out.", new)
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)
        new = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", new)
        if _LDM_ATTENTION_PROJECTION.search(new) and value.dim() == 2:
            value = value[:, :, None, None]
        converted[new] = value
    return converted


def upgrade_legacy_attention_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers before 0.14 named the attention projections query/key/value/proj_attn; rename them."""
    pattern = re.compile(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.")
    if not any(pattern.search(key) for key in tensors):
        return tensors
    return {pattern.sub(lambda m: m.group(1) + _LEGACY_ATTENTION[m.group(2)] + ".", k): v for k, v in tensors.items()}
