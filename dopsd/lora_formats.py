"""The adapter in ComfyUI's key naming, converted exactly from our diffusers-format LoRA file.

Our trainer saves `pytorch_lora_weights.safetensors` with diffusers' module names (peft keys
`transformer.<module>.lora_A.weight` / `lora_B.weight`, alpha in the header). ComfyUI loads a model with its
original (non-diffusers) parameter names and maps LoRA keys onto them in `comfy/lora.py::model_lora_keys_unet`;
the one key form it registers for every weight of every model, in every version, is
`lora_unet_<original name with "." replaced by "_">`, read by `comfy/weight_adapter/lora.py` as
`.lora_down.weight` / `.lora_up.weight` / `.alpha` with delta = alpha / rank * up @ down (the kohya convention).

The original models fuse what diffusers splits: Z-Image's `attention.qkv` is diffusers' `to_q`/`to_k`/`to_v`, and
FLUX.2's `img_attn.qkv` / `txt_attn.qkv` are `to_q`/`to_k`/`to_v` and `add_{q,k,v}_proj` (rows in q, k, v order,
as diffusers' single-file converters split them with `torch.chunk(..., 3)`). A fused module gets the exact fused
LoRA: down = [A_q; A_k; A_v] stacked, up = block-diagonal(B_q, B_k, B_v), so up @ down = [B_q A_q; B_k A_k; B_v A_v]
and the rank grows to the sum of the parts' ranks; the alpha is scaled by the same factor so that alpha / rank, and
with it the delta weight, is unchanged. The block-diagonal zeros also let diffusers' kohya converters split the
file back exactly. See docs/lora-formats.md for the full key table and its sources.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"
COMFYUI_PREFIX = "lora_unet_"  # comfy/lora.py: key_map["lora_unet_{}".format(key_lora)] for every model weight
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
_DIFFUSERS_A, _DIFFUSERS_B = ".lora_A.weight", ".lora_B.weight"
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the peft LoraConfig of the file


@dataclass(frozen=True)
class OriginalModule:
    """One module of the original model and the diffusers modules it is made of, in its output-row order."""

    name: str  # within a block, e.g. "attention.qkv"
    parts: tuple[str, ...]  # diffusers names within the block, e.g. ("attention.to_q", "attention.to_k", ...)


@dataclass(frozen=True)
class ComfyUIKeyMap:
    """How one model family's diffusers module names become the original names ComfyUI loads the model with."""

    blocks: Mapping[str, str]  # diffusers block list -> original block list ("transformer_blocks" -> "double_blocks")
    modules: Mapping[str, tuple[OriginalModule, ...]]  # per diffusers block list: its LoRA-able modules

    def original_of(self, block: str, part: str) -> OriginalModule | None:
        """The original module that contains diffusers module `part` of a block in list `block`, if mapped."""
        for module in self.modules.get(block, ()):
            if part in module.parts:
                return module
        return None


def _same(*names: str) -> tuple[OriginalModule, ...]:
    return tuple(OriginalModule(n, (n,)) for n in names)


# Z-Image (ComfyUI runs it as its Lumina2/NextDiT model): the names of `comfy/utils.py::z_image_to_diffusers`,
# which diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` mirrors (qkv chunked in q, k, v order).
_Z_IMAGE_BLOCK = (
    OriginalModule("attention.qkv", ("attention.to_q", "attention.to_k", "attention.to_v")),
    OriginalModule("attention.out", ("attention.to_out.0",)),
    *_same("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
)
Z_IMAGE_KEY_MAP = ComfyUIKeyMap(
    blocks={"layers": "layers", "noise_refiner": "noise_refiner", "context_refiner": "context_refiner"},
    modules={"layers": _Z_IMAGE_BLOCK, "noise_refiner": _Z_IMAGE_BLOCK, "context_refiner": _Z_IMAGE_BLOCK},
)

# FLUX.2 (ComfyUI runs the BFL checkpoint as is): the names of diffusers'
# `convert_flux2_transformer_checkpoint_to_diffusers` (FLUX2_TRANSFORMER_DOUBLE/SINGLE_BLOCK_KEY_MAP), which are
# ComfyUI's `comfy/ldm/flux/layers.py` modules (`img_attn.qkv`, `img_mlp` = Sequential(Linear, act, Linear), ...).
FLUX2_KEY_MAP = ComfyUIKeyMap(
    blocks={"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"},
    modules={
        "transformer_blocks": (
            OriginalModule("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
            OriginalModule("img_attn.proj", ("attn.to_out.0",)),
            OriginalModule("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
            OriginalModule("txt_attn.proj", ("attn.to_add_out",)),
            OriginalModule("img_mlp.0", ("ff.linear_in",)),
            OriginalModule("img_mlp.2", ("ff.linear_out",)),
            OriginalModule("txt_mlp.0", ("ff_context.linear_in",)),
            OriginalModule("txt_mlp.2", ("ff_context.linear_out",)),
        ),
        "single_transformer_blocks": (
            OriginalModule("linear1", ("attn.to_qkv_mlp_proj",)),
            OriginalModule("linear2", ("attn.to_out",)),
        ),
    },
)

# Keyed by `ModelFamily.name` / `Preset.family`.
# The `shapes` model is a FLUX.2-klein transformer, so its adapters take klein's names.
COMFYUI_KEY_MAPS: dict[str, ComfyUIKeyMap] = {
    "z_image": Z_IMAGE_KEY_MAP,
    "flux2_klein": FLUX2_KEY_MAP,
    "shapes": FLUX2_KEY_MAP,
}

_MODULE = re.compile(r"^(?P<block>[A-Za-z_]+)\.(?P<index>\d+)\.(?P<part>.+)$")


def comfyui_key_map(family: str) -> ComfyUIKeyMap:
    """The ComfyUI key map of a model family; a family without one is an error that names the supported ones."""
    try:
        return COMFYUI_KEY_MAPS[family]
    except KeyError:
        raise ValueError(
            f"no ComfyUI LoRA key mapping for model family {family!r}; "
            f"families with one: {', '.join(sorted(COMFYUI_KEY_MAPS))}"
        ) from None


def comfyui_key(original_module: str) -> str:
    """ComfyUI's LoRA key for an original module path: `double_blocks.0.img_attn.qkv` -> `lora_unet_double_...`."""
    return COMFYUI_PREFIX + original_module.replace(".", "_")


def _split_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) from peft keys, with or without diffusers' `transformer.` prefix; anything else is an error."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix("transformer.")
        for suffix, slot in ((_DIFFUSERS_A, "A"), (_DIFFUSERS_B, "B")):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[slot] = tensor
                break
        else:
            raise ValueError(f"not a LoRA A/B weight of a diffusers-format adapter: {key!r}")
    missing = sorted(m for m, ab in pairs.items() if len(ab) != 2)
    if missing:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {', '.join(missing)}")
    return {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}


def fuse_lora(
    parts: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA (down, up, alpha) whose delta is the row-wise stack of the parts' deltas `scale_i * B_i @ A_i`.

    down = [A_1; ...; A_n] (rank = sum of ranks), up = block-diagonal(B_1, ..., B_n), so that
    alpha / rank * up @ down = [s_1 B_1 A_1; ...; s_n B_n A_n] exactly. With equal scales (one alpha, one rank:
    always the case for our adapters) alpha = s * rank and the factors are stored untouched; otherwise each B_i
    carries its own scale and alpha = rank (scale 1).
    """
    downs = [a for a, _ in parts]
    ups = [b for _, b in parts]
    rank = sum(a.shape[0] for a in downs)
    if len(set(scales)) == 1:
        alpha = scales[0] * rank
    else:
        ups = [b * s for b, s in zip(ups, scales, strict=True)]
        alpha = float(rank)
    return torch.cat(downs, dim=0), torch.block_diag(*ups), alpha


def to_comfyui_state_dict(
    state_dict: Mapping[str, torch.Tensor], lora_alpha: float, family: str
) -> dict[str, torch.Tensor]:
    """Our diffusers-format LoRA (peft A/B, one `lora_alpha`) as the state dict of a ComfyUI-loadable LoRA file.

    Every mapped module gets `lora_unet_<original>.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`
    (float32) with alpha / rank equal to peft's `lora_alpha / r`, so ComfyUI's delta alpha / rank * up @ down is the
    delta peft adds. Modules the original model fuses (q, k, v) become one exact fused LoRA (`fuse_lora`); all of a
    fused module's parts must be present. A module outside the family's map is an error, never silently dropped.
    """
    key_map = comfyui_key_map(family)
    groups: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    layout: dict[str, OriginalModule] = {}
    for module, (a, b) in _split_diffusers_state_dict(state_dict).items():
        match = _MODULE.match(module)
        original = key_map.original_of(match["block"], match["part"]) if match else None
        if match is None or original is None:
            raise ValueError(f"LoRA module {module!r} has no ComfyUI mapping for model family {family!r}")
        target = f"{key_map.blocks[match['block']]}.{match['index']}.{original.name}"
        groups.setdefault(target, {})[match["part"]] = (a, b)
        layout[target] = original

    out: dict[str, torch.Tensor] = {}
    for target in sorted(groups):
        original, found = layout[target], groups[target]
        missing = [p for p in original.parts if p not in found]
        if missing:
            raise ValueError(
                f"{target} fuses {', '.join(original.parts)}, but the adapter has no LoRA on {', '.join(missing)}"
            )
        parts = [found[p] for p in original.parts]
        down, up, alpha = fuse_lora(parts, [lora_alpha / a.shape[0] for a, _ in parts])
        key = comfyui_key(target)
        out[key + DOWN] = down.contiguous()
        out[key + UP] = up.contiguous()
        out[key + ALPHA] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _lora_alpha(metadata: Mapping[str, str]) -> float:
    """peft's `lora_alpha` of a file written by `save_lora_weights`, refusing configs the conversion can't express."""
    if _ADAPTER_METADATA_KEY in metadata:
        config = json.loads(metadata[_ADAPTER_METADATA_KEY])
        for flag in ("transformer.use_rslora", "transformer.use_dora"):
            if config.get(flag):
                raise ValueError(f"cannot convert an adapter with {flag.split('.')[1]}=True to the ComfyUI format")
        if config.get("transformer.alpha_pattern"):
            raise ValueError("cannot convert an adapter with a per-module alpha_pattern to the ComfyUI format")
        return float(config["transformer.lora_alpha"])
    if "dopsd.alpha" in metadata:
        return float(metadata["dopsd.alpha"])
    raise ValueError("the adapter file's header names no LoRA alpha (lora_adapter_metadata or dopsd.alpha)")


def write_comfyui_lora(diffusers_file: str | Path, out_file: str | Path, family_name: str) -> Path:
    """Writes the ComfyUI-format copy of a diffusers-format adapter file (atomically) and returns its path.

    The header keeps our metadata (`dopsd.*`) plus `dopsd.format=comfyui`, but not diffusers'
    `lora_adapter_metadata`: its `r` / `lora_alpha` describe the unfused file, and diffusers would apply them a second
    time on top of the alpha it folds in when it converts this file.
    """
    with safe_open(str(diffusers_file), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    converted = to_comfyui_state_dict(tensors, _lora_alpha(metadata), family_name)
    header = {k: v for k, v in metadata.items() if k != _ADAPTER_METADATA_KEY}
    header["dopsd.format"] = "comfyui"
    out = Path(out_file)
    tmp = out.with_name(out.name + ".tmp")
    save_file(converted, str(tmp), metadata=header)
    os.replace(tmp, out)
    return out
