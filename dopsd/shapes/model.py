"""The `shapes` base model: a real diffusers `Flux2Transformer2DModel` at toy size, in 2x2-packed pixel space, with
a word-level caption encoder and FLUX.2-klein's edit branch for in-context references.

Conventions are klein's (see dopsd/models/flux2_klein.py): the transformer takes sigma (1 = noise) and returns
v = noise - x0, so x0 = x - sigma * v and an Euler step is x + (sigma_next - sigma) * v. Pixels in [-1, 1] are
patchified 2x2 (`Flux2KleinPipeline._patchify_latents`: 3 channels -> 12, 16x16 -> 8x8 = 64 tokens) and packed as the
pipeline packs latents. A reference image is patchified the same way and appended after the noisy tokens with its
own 2-D positions at time coordinate 10 (`Flux2KleinPipeline._prepare_image_ids`), exactly as
`Flux2KleinPipeline(image=...)` and the D-OPSD edit-branch teacher do; the output is cropped to the generated tokens.
The caption encoder stands in for klein's Qwen3 (whose features are frozen LLM states): a trainable word embedding
plus a position embedding, giving `[MAX_TOKENS, joint_attention_dim]` features.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from dopsd.shapes import world


REFERENCE_TIME_COORDINATE = 10  # `_prepare_image_ids(scale=10)`: the first reference image sits at T = 10
PIXEL_CHANNELS = 3
PACKED_CHANNELS = 4 * PIXEL_CHANNELS


@dataclass(frozen=True)
class ShapesModelConfig:
    """Sizes of the base model; `heads * head_dim` is the width, `sum(axes_dims_rope)` must equal `head_dim`."""

    heads: int = 4
    head_dim: int = 32
    double_layers: int = 2
    single_layers: int = 2
    text_dim: int = 64
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, int, int, int] = (8, 8, 8, 8)
    timestep_channels: int = 64


class CaptionEncoder(nn.Module):
    """Word embedding + learned position embedding over the world's vocabulary: captions -> [B, MAX_TOKENS, D]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.words = nn.Embedding(len(world.VOCABULARY), dim)
        self.positions = nn.Parameter(torch.zeros(world.MAX_TOKENS, dim))
        nn.init.normal_(self.words.weight, std=1.0)
        nn.init.normal_(self.positions, std=0.1)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (what diffusers pipelines read of their components)."""
        return self.positions.dtype

    @property
    def device(self) -> torch.device:
        """The weights' device."""
        return self.positions.device

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`token_ids` [B, MAX_TOKENS] -> features [B, MAX_TOKENS, D]."""
        return self.words(token_ids) + self.positions

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions (world vocabulary) -> features [B, MAX_TOKENS, D]."""
        ids = torch.tensor([world.tokenize(c) for c in captions], dtype=torch.long, device=self.positions.device)
        return self(ids)


class ShapesModel(nn.Module):
    """The caption encoder and the FLUX.2-klein transformer of the `shapes` world, as one module."""

    def __init__(self, config: ShapesModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ShapesModelConfig()
        c = self.config
        if sum(c.axes_dims_rope) != c.head_dim:
            raise ValueError("sum(axes_dims_rope) must equal head_dim")
        self.text = CaptionEncoder(c.text_dim)
        self.transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=PACKED_CHANNELS,
            num_layers=c.double_layers,
            num_single_layers=c.single_layers,
            attention_head_dim=c.head_dim,
            num_attention_heads=c.heads,
            joint_attention_dim=c.text_dim,
            timestep_guidance_channels=c.timestep_channels,
            mlp_ratio=c.mlp_ratio,
            axes_dims_rope=c.axes_dims_rope,
            rope_theta=2000,
            guidance_embeds=False,
        )

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        text: torch.Tensor,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Klein's prediction v = noise - x0 for noisy pixels `x` [B, 3, S, S] at `sigma` [B], caption features
        `text` [B, L, D] and optionally clean reference pixels [B, 3, S, S] in the edit branch."""
        packed = patchify(x)
        batch, _, h, w = packed.shape
        tokens = pack(packed)
        ids = latent_ids(h, w, batch, x.device)
        if reference is not None:
            ref = patchify(reference)
            tokens = torch.cat([tokens, pack(ref)], dim=1)
            ids = torch.cat([ids, latent_ids(h, w, batch, x.device, time=REFERENCE_TIME_COORDINATE)], dim=1)
        out = self.transformer(
            hidden_states=tokens,
            timestep=sigma.to(tokens.dtype),
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=text_ids(batch, text.shape[1], x.device),
            img_ids=ids,
            return_dict=False,
        )[0]
        out = out[:, : h * w]  # the reference tokens are context, not output
        return unpatchify(out.permute(0, 2, 1).reshape(batch, PACKED_CHANNELS, h, w))

    @torch.no_grad()
    def sample(
        self,
        captions: Sequence[str],
        *,
        steps: int,
        generator: torch.Generator,
        references: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Euler sampling from noise (drawn by the CPU `generator`) over `sigma_schedule(steps)`, on the model's
        device; returns pixels in [-1, 1], [B, 3, S, S], on that device."""
        text = self.text.encode(captions)
        device = text.device
        x = torch.randn(len(captions), PIXEL_CHANNELS, world.SIZE, world.SIZE, generator=generator).to(device)
        references = None if references is None else references.to(device)
        return self.euler(x, sigma_schedule(steps), text, references).clamp(-1, 1)

    def euler(
        self,
        x: torch.Tensor,
        sigmas: Sequence[float],
        text: torch.Tensor,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Euler ODE from `x` at `sigmas[0]` through each of `sigmas` in turn: the state at `sigmas[-1]`. One
        integrator for sampling, the distillation's teacher segments and the benchmarks that mix two models."""
        for s, s_next in itertools.pairwise(sigmas):
            v = self.velocity(x, torch.full((x.shape[0],), float(s), device=x.device), text, reference)
            x = x + (float(s_next) - float(s)) * v
        return x


def sigma_schedule(steps: int) -> list[float]:
    """Sampling sigmas: linear from 1 to 0 in `steps` Euler steps (no shift: the images are tiny)."""
    return [float(s) for s in np.linspace(1.0, 0.0, steps + 1)]


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], as `Flux2KleinPipeline._patchify_latents`."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`, as `Flux2KleinPipeline._unpatchify_latents`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C], as `Flux2KleinPipeline._pack_latents`."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def latent_ids(h: int, w: int, batch: int, device: torch.device, time: int = 0) -> torch.Tensor:
    """(T, H, W, L) position ids of an h x w token grid at time coordinate `time`: [B, h*w, 4]."""
    ids = torch.cartesian_prod(torch.tensor([time]), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.to(device)[None].expand(batch, -1, -1)


def text_ids(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(0, 0, 0, l) position ids of the caption tokens, as `Flux2KleinPipeline._prepare_text_ids`: [B, L, 4]."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.to(device)[None].expand(batch, -1, -1)


def to_pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 RGB arrays [S, S, 3] -> float pixels in [-1, 1], [B, 3, S, S]."""
    arr = np.stack(list(images)).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels in [-1, 1], [B, 3, S, S] -> uint8 RGB arrays [B, S, S, 3]."""
    arr = ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def save_model(model: ShapesModel, path: Path, metadata: dict[str, Any] | None = None) -> None:
    """The model's weights as one safetensors file; its config (and `metadata`) go in the file's header."""
    header = {"config": json.dumps(asdict(model.config)), **{k: str(v) for k, v in (metadata or {}).items()}}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=header)
    tmp.replace(path)


def load_model(path: Path) -> ShapesModel:
    """A model saved by `save_model`, in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    raw = json.loads(header["config"])
    raw["axes_dims_rope"] = tuple(raw["axes_dims_rope"])
    model = ShapesModel(ShapesModelConfig(**raw))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
