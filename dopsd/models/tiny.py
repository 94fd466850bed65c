"""Tiny, offline builds of the real model classes, for tests, CI and the `tiny-*` presets.

Everything here is constructed in code from a fixed seed: the real diffusers and transformers classes at toy
sizes, plus a byte-level Qwen2 tokenizer with a Qwen3-style chat template. Nothing is ever downloaded.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3Model, Qwen3VLConfig


# Qwen3's own special tokens, in its order, so that the chat markup matches the real model's structure.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)

# The Qwen3 chat template reduced to what the pipelines render: user turns (text, or image + text parts for
# the VLM), the generation prompt, and the empty think block that `enable_thinking=False` appends.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

TINY_TEXT_HIDDEN = 32
TINY_TEXT_LAYERS = 4
TINY_LATENT_CHANNELS = 16
# The tiny text encoder has 4 layers, so FLUX.2-klein's layers (9, 18, 27) become (1, 2, 3): three hidden states
# concatenated, as the real model concatenates three of Qwen3's.
TINY_KLEIN_TEXT_LAYERS = (1, 2, 3)


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer (no merges) with Qwen's special tokens and chat template, built in code."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def tiny_text_config(vocab_size: int) -> Qwen3Config:
    """Config of the tiny Qwen3 text encoder; the tiny VLM's language model copies it exactly."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        pad_token_id=0,
    )


def build_tiny_z_image_transformer(
    dim: int = 64,
    n_layers: int = 2,
    n_refiner_layers: int = 1,
    n_heads: int = 2,
    axes_dims: tuple[int, ...] = (8, 12, 12),
) -> ZImageTransformer2DModel:
    """A Z-Image transformer reading the tiny text encoder's features; `dim / n_heads` must equal `sum(axes_dims)`."""
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=TINY_LATENT_CHANNELS,
        dim=dim,
        n_layers=n_layers,
        n_refiner_layers=n_refiner_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=TINY_TEXT_HIDDEN,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=list(axes_dims),
        axes_lens=[256, 64, 64],
    )


def build_tiny_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    """The Z-Image pipeline at toy size: real classes, random weights from `seed`, fp32, CPU."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(tiny_text_config(len(tokenizer)))
    torch.manual_seed(seed + 1)
    transformer = build_tiny_z_image_transformer()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    return pipe


def _token_id(tokenizer: Qwen2Tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def build_tiny_flux2_klein_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """The FLUX.2-klein pipeline at toy size (distilled: no guidance embedding): real classes, random weights."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(tiny_text_config(len(tokenizer)))
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # VAE channels x the 2x2 patchify
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=len(TINY_KLEIN_TEXT_LAYERS) * TINY_TEXT_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=False,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )


def tiny_vlm_config(text_config: Qwen3Config, tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    """A tiny Qwen3-VL whose language model has exactly the text encoder's shapes (so its weights can be copied)."""
    text = text_config.to_dict()
    text_cfg = {
        key: text[key]
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rms_norm_eps",
        )
    }
    rope = text_config.rope_parameters
    assert isinstance(rope, dict)
    rope_theta = rope["rope_theta"]
    text_cfg["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": rope_theta,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    }
    return Qwen3VLConfig(
        text_config=text_cfg,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": text_config.hidden_size,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
    )
