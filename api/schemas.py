"""Request and response bodies. `JobSpec` is strict: unknown fields are an error, values are bounded."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


AdapterFormat = Literal["diffusers", "comfyui"]
ADAPTER_FORMATS: tuple[AdapterFormat, ...] = ("diffusers", "comfyui")


class JobSpec(BaseModel):
    """What a client may set for a training job (the `spec` form field, as JSON). `[V]` marks the trigger word."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("tiny-z-image", description="Model preset; see GET /v1/presets.")
    trigger: str = Field("sks", min_length=1, max_length=50, description="The word that names the concept.")
    captions: dict[str, list[str]] = Field(
        default_factory=dict, description="Uploaded file name -> captions (several allowed)."
    )
    default_caption: str | None = Field("a photo of [V]", max_length=1000)
    steps: int | None = Field(None, ge=1, le=10_000, description="Optimizer steps (preset default if unset).")
    learning_rate: float | None = Field(None, gt=0, le=1e-2)
    rank: int | None = Field(None, ge=1, le=256)
    lora_alpha: float | None = Field(None, gt=0, le=1024)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    resolution: int | None = Field(None, ge=64, le=2048, multiple_of=16)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    train_batch_size: int = Field(1, ge=1, le=16)
    gradient_accumulation_steps: int = Field(1, ge=1, le=64)
    max_grad_norm: float = Field(1.0, ge=0, le=100)
    adam_weight_decay: float = Field(0.0, ge=0, le=1)
    loss_space: Literal["x0", "velocity"] = "x0"
    teacher_mode: Literal["ema", "frozen", "live"] = "ema"
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    rollout_schedule: Literal["distill4", "native"] | None = None
    teacher_context: Literal["vlm", "edit"] | None = None
    checkpointing_steps: int | None = Field(None, ge=0, le=10_000)
    sample_every: int | None = Field(None, ge=0, le=10_000)
    validation_prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(None, max_length=16)
    sample_seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        default_factory=lambda: [0, 1], min_length=1, max_length=8
    )
    sample_steps: int | None = Field(None, ge=1, le=100)
    output_formats: list[AdapterFormat] = Field(
        default_factory=lambda: list(ADAPTER_FORMATS),
        min_length=1,
        max_length=2,
        description="Adapter files to write: diffusers (`load_lora_weights`) and/or ComfyUI's LoRA loader.",
    )
    webhook_url: Annotated[str, Field(min_length=8, max_length=2000, pattern=r"^https?://")] | None = Field(
        None, description="Standard Webhooks POSTs of this job's events, signed with the key's secret."
    )
    webhook_events: (
        list[Literal["queued", "started", "progress", "checkpoint", "sample", "succeeded", "failed", "canceled"]]
        | None
    ) = Field(None, max_length=8, description="Event types to POST (default: started, sample and the outcome).")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    """The one shape of every error response."""

    error: ErrorDetail


class Progress(BaseModel):
    step: int
    total_steps: int
    loss: float | None
    eta_s: float | None


class JobError(BaseModel):
    code: str
    message: str


class ImagePublic(BaseModel):
    name: str
    size: int


class JobPublic(BaseModel):
    """A job as its owner sees it."""

    id: uuid.UUID
    kind: Literal["training", "preview"]
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    preset: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = Field(description="1 = next to run; set while queued.")
    progress: Progress | None = Field(description="Set once the job has started.")
    attempt: int
    gpu_seconds: float | None = Field(description="GPU worker time used, over all attempts; set when it ends.")
    cancel_requested: bool
    images: list[ImagePublic]
    config: dict[str, Any] = Field(description="The resolved training configuration.")
    error: JobError | None
    links: dict[str, str]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None


class EventPublic(BaseModel):
    id: int
    type: str
    created_at: datetime
    data: dict[str, Any]


class EventsPublic(BaseModel):
    data: list[EventPublic]
    next_after: int


class ArtifactPublic(BaseModel):
    name: str
    kind: str
    size: int
    content_type: str
    url: str
    expires_in_s: int


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]


class PresetPublic(BaseModel):
    name: str
    family: str
    description: str
    device: str
    min_image_side: int
    defaults: dict[str, Any]


class DryRunPublic(BaseModel):
    """What a submission would do, without creating anything."""

    dry_run: Literal[True] = True
    config: dict[str, Any] = Field(description="The resolved training configuration.")
    images: list[ImagePublic]
    estimated_gpu_seconds: float = Field(description="Model load, training steps and samples on the preset's device.")
    queue_position: int = Field(description="The position the job would take in its queue (1 = next).")


class PreviewImagePublic(BaseModel):
    prompt: str
    seed: int
    source: str = Field(description="The reference image whose features condition this image.")
    url: str


class PreviewPublic(JobPublic):
    """A preview job and, once it succeeded, its zero-shot images."""

    preview_images: list[PreviewImagePublic] = Field(
        default_factory=list, description="Set once it succeeded: one image per reference image and prompt."
    )


class WebhookAttemptPublic(BaseModel):
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float | None = None


class WebhookDeliveryPublic(BaseModel):
    id: int
    event_id: int
    event_type: str
    url: str
    status: Literal["pending", "delivered", "failed"]
    next_attempt_at: datetime | None = Field(description="When the next try is due; null once settled.")
    attempts: list[WebhookAttemptPublic]


class WebhookDeliveriesPublic(BaseModel):
    data: list[WebhookDeliveryPublic]
