"""The ComfyUI copy of the adapter: the keys ComfyUI's loader maps, and exactly the diffusers file's delta weights.

Delta identity is checked twice per family: through diffusers' own loaders for non-diffusers LoRAs (its Z-Image
converter and its kohya FLUX.2 converter both read the ComfyUI file), and with ComfyUI's own arithmetic
(delta = alpha / rank * up @ down on the original fused weight) against the diffusers deltas in the original
row layout. The expected names come from the sources below, written out here as data, not from dopsd's own map.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import Flux2KleinPipeline, ZImagePipeline
from safetensors import safe_open
from safetensors.torch import load_file

from dopsd import DOPSDConfig, train
from dopsd.cli import build_parser
from dopsd.lora import (
    LORA_WEIGHT_NAME,
    STUDENT_ADAPTER,
    adapter_state,
    add_adapters,
    add_file_metadata,
    make_lora_config,
)
from dopsd.lora_formats import COMFYUI_WEIGHT_NAME, fuse_lora, to_comfyui_state_dict, write_comfyui_lora
from dopsd.models import tiny
from dopsd.models.flux2_klein import Flux2KleinFamily
from dopsd.models.z_image import ZImageFamily


# ComfyUI `comfy/lora.py::model_lora_keys_unet`: for every weight `k` of the loaded model,
#     key_map["lora_unet_{}".format(k[len("diffusion_model."):-len(".weight")].replace(".", "_"))] = k
# and `comfy/weight_adapter/lora.py::LoRAAdapter.load` reads `<key>.lora_up.weight` / `<key>.lora_down.weight`
# with `<key>.alpha` (read in `comfy/lora.py::load_lora`); `calculate_weight` adds alpha / down.shape[0] * up @ down.
def comfyui_lora_key(comfy_weight: str) -> str:
    return "lora_unet_" + comfy_weight[len("diffusion_model.") : -len(".weight")].replace(".", "_")


COMFYUI_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

# ComfyUI `comfy/utils.py::z_image_to_diffusers` (the Lumina2 branch of `model_lora_keys_unet` uses it): diffusers
# name within a block -> (ComfyUI name, which third of the rows). It maps to_q/to_k/to_v to
# (qkv, (0, 0, hidden)), (qkv, (0, hidden, hidden)), (qkv, (0, 2 * hidden, hidden)) and to_out.0 to `out`, for
# `layers`, `context_refiner` and `noise_refiner` blocks alike.
Z_IMAGE_COMFY: dict[str, tuple[str, int | None]] = {
    "attention.to_q": ("attention.qkv", 0),
    "attention.to_k": ("attention.qkv", 1),
    "attention.to_v": ("attention.qkv", 2),
    "attention.to_out.0": ("attention.out", None),
    "feed_forward.w1": ("feed_forward.w1", None),
    "feed_forward.w2": ("feed_forward.w2", None),
    "feed_forward.w3": ("feed_forward.w3", None),
}
Z_IMAGE_BLOCKS = {"layers": "layers", "noise_refiner": "noise_refiner", "context_refiner": "context_refiner"}

# FLUX.2: ComfyUI loads BFL's checkpoint names as they are (`comfy/ldm/flux/layers.py`: `img_attn.qkv`,
# `img_attn.proj`, `img_mlp` = Sequential(Linear, act, Linear), `single_blocks.N.linear1/linear2`). Their diffusers
# names are diffusers' `convert_flux2_transformer_checkpoint_to_diffusers` (FLUX2_TRANSFORMER_DOUBLE_BLOCK_KEY_MAP,
# FLUX2_TRANSFORMER_SINGLE_BLOCK_KEY_MAP; qkv split with torch.chunk(3) into q, k, v).
FLUX2_COMFY: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
    "attn.to_qkv_mlp_proj": ("linear1", None),  # single-stream blocks
    "attn.to_out": ("linear2", None),
}
FLUX2_BLOCKS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}

RANK, ALPHA = 4, 8.0  # alpha / rank = 2, so a lost alpha shows


def comfy_weight_of(
    module: str, names: dict[str, tuple[str, int | None]], blocks: dict[str, str]
) -> tuple[str, int | None]:
    """ComfyUI's model weight (and row third) for a diffusers module path such as `layers.0.attention.to_q`."""
    block, index, part = module.split(".", 2)
    name, third = names[part]
    return f"diffusion_model.{blocks[block]}.{index}.{name}.weight", third


FAMILIES: dict[str, dict[str, Any]] = {
    "z_image": {
        "build": tiny.build_tiny_z_image_pipeline,
        "pipeline": ZImagePipeline,
        "targets": list(ZImageFamily.lora_target_modules),
        "names": Z_IMAGE_COMFY,
        "blocks": Z_IMAGE_BLOCKS,
    },
    "flux2_klein": {
        "build": tiny.build_tiny_flux2_klein_pipeline,
        "pipeline": Flux2KleinPipeline,
        # The trained double-stream targets, plus the single-stream Linears to cover their mapping too.
        "targets": [
            *Flux2KleinFamily.lora_target_modules,
            "attn.to_qkv_mlp_proj",
            "single_transformer_blocks.0.attn.to_out",
        ],
        "names": FLUX2_COMFY,
        "blocks": FLUX2_BLOCKS,
    },
}


def write_random_adapter(family: str, folder: Path) -> Path:
    """A diffusers-format adapter file as the trainer writes it, with random non-zero A and B."""
    spec = FAMILIES[family]
    pipe = spec["build"](seed=0)
    transformer = pipe.transformer
    config = make_lora_config(RANK, ALPHA, 0.0, tuple(spec["targets"]))
    add_adapters(transformer, config, with_teacher=False)
    generator = torch.Generator().manual_seed(7)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=generator)
    spec["pipeline"].save_lora_weights(
        str(folder),
        transformer_lora_layers=adapter_state(transformer, STUDENT_ADAPTER),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    path = folder / LORA_WEIGHT_NAME
    add_file_metadata(path, {"dopsd.family": family, "dopsd.trigger": "sks", "dopsd.alpha": str(ALPHA)})
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def adapter_files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(family, diffusers file, ComfyUI file written by `write_comfyui_lora`) for each family."""
    family: str = request.param
    folder = tmp_path_factory.mktemp(f"lora-{family}")
    diffusers_file = write_random_adapter(family, folder)
    comfy_file = write_comfyui_lora(diffusers_file, folder / COMFYUI_WEIGHT_NAME, family)
    return family, diffusers_file, comfy_file


def fused_deltas(family: str, lora_file: Path) -> dict[str, torch.Tensor]:
    """W' - W of every transformer parameter after diffusers' `load_lora_weights` + `fuse_lora` of `lora_file`."""
    pipe = FAMILIES[family]["build"](seed=0)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora_file)
    pipe.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    assert fused.keys() == base.keys()
    return {k: fused[k] - base[k] for k in base}


def diffusers_file_deltas(diffusers_file: Path) -> dict[str, torch.Tensor]:
    """module -> lora_alpha / r * B @ A, straight from the diffusers-format file (peft's definition)."""
    tensors = load_file(str(diffusers_file))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            deltas[module] = ALPHA / a.shape[0] * tensors[key.replace(".lora_A.", ".lora_B.")] @ a
    return deltas


def test_diffusers_loads_the_comfyui_file_with_the_same_delta_weights(adapter_files: tuple[str, Path, Path]) -> None:
    """diffusers' loader for non-diffusers LoRAs reads the ComfyUI file into exactly the diffusers file's deltas."""
    family, diffusers_file, comfy_file = adapter_files
    expected = fused_deltas(family, diffusers_file)
    got = fused_deltas(family, comfy_file)
    targeted = {f"{m}.weight" for m in diffusers_file_deltas(diffusers_file)}
    assert targeted and targeted <= expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
        assert (expected[name].abs().max() > 0) == (name in targeted), name


def test_keys_are_those_comfyui_maps_for_the_model(adapter_files: tuple[str, Path, Path]) -> None:
    """Every module is `lora_unet_<original weight>` of a targeted module, with ComfyUI's three suffixes."""
    family, diffusers_file, comfy_file = adapter_files
    spec = FAMILIES[family]
    expected_modules = {
        comfyui_lora_key(comfy_weight_of(m, spec["names"], spec["blocks"])[0])
        for m in diffusers_file_deltas(diffusers_file)
    }
    with safe_open(str(comfy_file), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {module + suffix for module in expected_modules for suffix in COMFYUI_SUFFIXES}


def test_comfyui_arithmetic_gives_the_diffusers_deltas_in_the_original_layout(
    adapter_files: tuple[str, Path, Path],
) -> None:
    """alpha / down.shape[0] * up @ down on each original weight equals the diffusers deltas of its parts, with
    q, k, v in the thirds of the fused rows where ComfyUI's and diffusers' converters put them."""
    family, diffusers_file, comfy_file = adapter_files
    spec = FAMILIES[family]
    comfy = load_file(str(comfy_file))
    for module, delta in diffusers_file_deltas(diffusers_file).items():
        weight, third = comfy_weight_of(module, spec["names"], spec["blocks"])
        key = comfyui_lora_key(weight)
        down, up, alpha = comfy[key + ".lora_down.weight"], comfy[key + ".lora_up.weight"], comfy[key + ".alpha"]
        assert alpha.ndim == 0 and alpha.dtype == torch.float32
        comfy_delta = alpha.item() / down.shape[0] * up @ down
        if third is not None:
            rows = comfy_delta.shape[0] // 3
            comfy_delta = comfy_delta[third * rows : (third + 1) * rows]
        torch.testing.assert_close(comfy_delta, delta, atol=1e-6, rtol=0, msg=module)


def test_comfyui_file_keeps_our_header_but_not_diffusers_lora_config(adapter_files: tuple[str, Path, Path]) -> None:
    family, _, comfy_file = adapter_files
    with safe_open(str(comfy_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["dopsd.family"] == family and meta["dopsd.trigger"] == "sks" and meta["dopsd.format"] == "comfyui"
    # Its r / lora_alpha describe the unfused file; diffusers would scale the converted weights by them again.
    assert "lora_adapter_metadata" not in meta


def test_fused_lora_is_exact_for_unequal_ranks_and_scales() -> None:
    generator = torch.Generator().manual_seed(0)
    parts = [(torch.randn(r, 6, generator=generator), torch.randn(5, r, generator=generator)) for r in (2, 3, 4)]
    scales = [0.5, 2.0, 1.0]
    down, up, alpha = fuse_lora(parts, scales)
    assert down.shape == (9, 6) and up.shape == (15, 9)
    expected = torch.cat([s * b @ a for (a, b), s in zip(parts, scales, strict=True)])
    torch.testing.assert_close(alpha / down.shape[0] * up @ down, expected)
    _, _, equal_alpha = fuse_lora(parts[:1] * 3, [2.0] * 3)
    assert equal_alpha == 2.0 * 6  # one scale: factors untouched, alpha grows with the rank


def _lora(modules: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for m in modules:
        out[f"transformer.{m}.lora_A.weight"] = torch.ones(2, 4)
        out[f"transformer.{m}.lora_B.weight"] = torch.ones(4, 2)
    return out


@pytest.mark.parametrize(
    ("state_dict", "family", "message"),
    [
        (_lora(["layers.0.feed_forward.w1"]), "sdxl", "no ComfyUI LoRA key mapping for model family 'sdxl'"),
        (_lora(["layers.0.adaLN_modulation.0"]), "z_image", "'layers.0.adaLN_modulation.0' has no ComfyUI mapping"),
        (_lora(["layers.0.attention.to_q"]), "z_image", "layers.0.attention.qkv fuses"),
        (
            {"transformer.layers.0.feed_forward.w1.lora_A.weight": torch.ones(2, 4)},
            "z_image",
            "without both lora_A and lora_B",
        ),
        ({"transformer.layers.0.feed_forward.w1.lora_magnitude_vector": torch.ones(4)}, "z_image", "not a LoRA A/B"),
    ],
)
def test_unconvertible_adapters_are_refused_with_a_reason(
    state_dict: dict[str, torch.Tensor], family: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        to_comfyui_state_dict(state_dict, 1.0, family)


def test_write_refuses_an_unknown_family(adapter_files: tuple[str, Path, Path], tmp_path: Path) -> None:
    _, diffusers_file, _ = adapter_files
    with pytest.raises(ValueError, match="families with one: flux2_klein, shapes, z_image"):
        write_comfyui_lora(diffusers_file, tmp_path / "x.safetensors", "sd3")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "`output_formats` must have at least 1 item, got []"),
        (
            ["diffusers", "kohya"],
            "`output_formats` must be a list of values from diffusers, comfyui, got ['diffusers', 'kohya']",
        ),
        ("comfyui", "`output_formats` must be a list of values from diffusers, comfyui, got 'comfyui'"),
    ],
)
def test_output_formats_validation(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        DOPSDConfig.for_preset(output_formats=value)
    assert message in str(info.value)


def test_output_formats_round_trip_json_and_cli(tmp_path: Path) -> None:
    assert DOPSDConfig.for_preset().output_formats == ("diffusers", "comfyui")
    cfg = DOPSDConfig.for_preset(output_formats=["comfyui"])  # JSON and argparse give lists
    assert cfg.output_formats == ("comfyui",)
    cfg.save(tmp_path / "config.json")
    assert DOPSDConfig.load(tmp_path / "config.json") == cfg
    assert DOPSDConfig.from_dict(cfg.to_dict()) == cfg
    ns = build_parser().parse_args(["train", "--output-formats", "diffusers"])
    assert DOPSDConfig.for_preset(output_formats=ns.output_formats).output_formats == ("diffusers",)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--output-formats", "kohya"])


@pytest.mark.parametrize("formats", [("comfyui",), ("diffusers",)])
def test_trainer_writes_the_comfyui_file_when_asked(
    formats: tuple[str, ...], example_dir: Path, tmp_path: Path
) -> None:
    """The diffusers file is always written (the conversion's source); the ComfyUI file only when asked."""
    result = train(
        DOPSDConfig.for_preset(
            "tiny-z-image", instance_data_dir=str(example_dir), output_dir=str(tmp_path), max_train_steps=1,
            validation_prompts=["[V]"], sample_seeds=[0], sample_steps=1, gap_eval_seeds=0, output_formats=formats,
        )
    )  # fmt: skip
    assert result.adapter_path == tmp_path / LORA_WEIGHT_NAME and result.adapter_path.is_file()
    comfy_file = tmp_path / COMFYUI_WEIGHT_NAME
    assert comfy_file.is_file() == ("comfyui" in formats)
    if comfy_file.is_file():
        with safe_open(str(comfy_file), framework="pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["dopsd.preset"] == "tiny-z-image" and meta["dopsd.steps"] == "1"
        assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in keys
        converted = ZImagePipeline.lora_state_dict(str(comfy_file))
        assert converted.keys() == ZImagePipeline.lora_state_dict(str(result.adapter_path)).keys()
