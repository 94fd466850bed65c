"""Request and response bodies of generations (`/v1/generations`): images made with a key's trained adapters.

`GenerationSpec` is strict like `JobSpec`: unknown fields are an error and every value is bounded. Values left
unset (size, steps, guidance) take the preset's native few-step setting when the generation is resolved.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import JobError
from core.events import EventType


MAX_PROMPTS = 8
MAX_ADAPTERS = 4
MAX_SEED = 2**32 - 1

Prompt = Annotated[str, Field(min_length=1, max_length=1000)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class AdapterRef(BaseModel):
    """One trained adapter to apply: a succeeded training job of the same key and preset, at a strength."""

    model_config = ConfigDict(extra="forbid")

    job_id: uuid.UUID = Field(description="A succeeded training job of this key; its adapter is applied.")
    scale: float = Field(1.0, ge=-2.0, le=4.0, description="The adapter's strength (1: as trained; 0: off).")


class GenerationSpec(BaseModel):
    """What a client asks for: prompts x seeds images from a preset's base model with zero or more adapters.

    Images come prompt-major: for each prompt, one image per seed. `[V]` in a prompt becomes the trigger word of
    the first adapter's job. The same request with the same seeds gives the same images."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field(min_length=1, max_length=64, description="The base model (`GET /v1/presets`).")
    prompt: Prompt | list[Prompt] = Field(description=f"One prompt, or up to {MAX_PROMPTS}.")
    seeds: list[Seed] | None = Field(
        None, min_length=1, max_length=64, description="One image per seed and prompt; unset: `num_images` random."
    )
    num_images: int | None = Field(
        None, ge=1, le=64, description="Images per prompt when `seeds` is unset (their seeds are chosen and shown)."
    )
    adapters: list[AdapterRef] = Field(
        default_factory=list, max_length=MAX_ADAPTERS, description="Adapters combined, each at its scale."
    )
    width: int | None = Field(None, ge=16, le=4096, description="One of the preset's sizes; unset: its default.")
    height: int | None = Field(None, ge=16, le=4096, description="One of the preset's sizes; unset: its default.")
    steps: int | None = Field(None, ge=1, le=100, description="Denoising steps; unset: the preset's native few.")
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0, description="Unset: the preset's native setting.")
    webhook_url: Annotated[str, Field(min_length=8, max_length=2000, pattern=r"^https?://")] | None = Field(
        None, description="Standard Webhooks POSTs of this generation's events, signed with the key's secret."
    )
    webhook_events: list[EventType] | None = Field(
        None, max_length=len(EventType), description="Event types to POST (default: started, sample and the outcome)."
    )

    @property
    def prompts(self) -> list[str]:
        """The prompts as a list, whichever way they were given."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class GeneratedImagePublic(BaseModel):
    url: str = Field(description="A short-lived download URL of the PNG (valid for `expires_in_s`).")
    prompt: str
    seed: int
    width: int
    height: int
    expires_in_s: int


class GenerationPublic(BaseModel):
    """A generation as its owner sees it: the resolved request, where it stands and, once succeeded, its images."""

    id: uuid.UUID
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    preset: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = Field(description="1 = next to run; set while queued.")
    prompts: list[str] = Field(description="The prompts as rendered (`[V]` replaced by the trigger word).")
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance_scale: float
    max_sequence_length: int = Field(description="What each prompt is padded or cut to (pass it to diffusers).")
    adapters: list[AdapterRef]
    attempt: int
    gpu_seconds: float | None = Field(description="GPU worker time used; set when it ends.")
    cancel_requested: bool
    images: list[GeneratedImagePublic] = Field(description="Set once succeeded: prompt-major, one per seed.")
    error: JobError | None
    links: dict[str, str]


class GenerationsPublic(BaseModel):
    data: list[GenerationPublic]
    next_cursor: str | None
