"""Request and response bodies. `JobSpec` is strict: unknown fields are an error, values are bounded."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from api.public_events import EventPublic
from api.spec_fields import job_spec_fields
from core.events import EventType


# The training fields, generated from the declarations of `dopsd.config.DOPSDConfig` (see api.spec_fields).
_TrainingSpec = create_model("_TrainingSpec", __config__=ConfigDict(extra="forbid"), **job_spec_fields())


class JobSpec(_TrainingSpec):  # its training fields are generated: read them with api.spec_fields.training_values
    """What a client may set for a training job (the `spec` form field, as JSON). `[V]` marks the trigger word."""

    model_config = ConfigDict(extra="forbid")

    images_url: Annotated[str, Field(min_length=8, max_length=2000)] | None = Field(
        None,
        description="Instead of uploading `images`: an https:// URL of one .zip, .tar or .tar.gz archive of the "
        "images (with sidecar .txt captions or a captions.json), fetched by the service during the submission.",
    )
    webhook_url: Annotated[str, Field(min_length=8, max_length=2000, pattern=r"^https?://")] | None = Field(
        None, description="Standard Webhooks POSTs of this job's events, signed with the key's secret."
    )
    webhook_events: list[EventType] | None = Field(
        None, max_length=len(EventType), description="Event types to POST (default: started, sample and the outcome)."
    )
    init_adapter: uuid.UUID | None = Field(
        None,
        description="Continue training from the adapter of an earlier succeeded training job of this key and "
        "preset (its id): more steps on the same concept, or a new concept on top. The student and the EMA "
        "teacher start from its weights, rank and alpha are its (leave them unset), and the report gains a "
        "`retention` section: that job's validation prompts rendered again, compared with its final samples.",
    )


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
    kind: Literal["training", "preview", "generation"]
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
    report: dict[str, Any] | None = Field(
        None,
        description="The evaluation report of a succeeded training job (`report.json`, schema `dopsd.evaluation/1`): "
        "`verdicts` (concept learned / not learned / inconclusive; few-step quality kept / degraded / "
        "inconclusive) and every figure with per-seed values, 95% interval and noise floor; see docs/evaluation.md.",
    )
    links: dict[str, str]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None


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
    example_images: list[str] = Field(
        default_factory=list,
        description="URLs (on this service) of bundled reference images of a concept the model has never seen, "
        "for a first job; empty for presets that take your own images",
    )


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
    teacher_check: dict[str, Any] | None = Field(
        None,
        description="Set once it succeeded: the teacher gate a training job passes before its first step (`blind`, "
        "`visibility` and the figures behind it, `message` when blind); see docs/evaluation.md.",
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
