"""A job's event log, typed: every event type, the payload each one carries, writing one and reading one back.

Writers pass a payload model to `add_event` (the model says which type it is); readers get the model back from
`parse_payload`. The stored JSON is the model's dump, so what is written, read and published cannot drift apart.
Fields with a default are optional and left out when not given (a `canceled` event says either why, `while`, or
at which `step`), never `null`; fields without one are always there, `null` when unknown.
"""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.jobs.models import Job, JobEvent, WebhookDelivery


class EventType(enum.StrEnum):
    """What happened to a job (the `type` of its events, and of its webhooks as `job.<type>`)."""

    QUEUED = "queued"
    STARTED = "started"
    MODEL_LOADED = "model_loaded"
    TRAINING = "training"
    PROGRESS = "progress"
    CHECKPOINT = "checkpoint"
    SAMPLE = "sample"
    EVALUATED = "evaluated"
    CANCEL_REQUESTED = "cancel_requested"
    REQUEUED = "requeued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    PURGED = "purged"
    WARNING = "warning"


def _absent(value: object) -> bool:
    return value is None


class EventPayload(BaseModel):
    """The data of one event type (a subclass per type; `event_type` names it)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )
    event_type: ClassVar[EventType]


class QueuedPayload(EventPayload):
    """The job was accepted: how many images came with it and where it stands in its queue."""

    event_type: ClassVar[EventType] = EventType.QUEUED
    images: int
    position: int | None


class StartedPayload(EventPayload):
    """A worker took the job (attempt 2 and later: another worker took over a job whose worker died)."""

    event_type: ClassVar[EventType] = EventType.STARTED
    worker: str
    attempt: int


class ModelLoadedPayload(EventPayload):
    """The base model is on the worker (`cached`: it was already loaded); the step resumed from, if any."""

    event_type: ClassVar[EventType] = EventType.MODEL_LOADED
    load_s: float
    cached: bool
    resumed_from_step: int | None


class TrainingPayload(EventPayload):
    """Training began (at `start_step` > 0 when resumed from a checkpoint)."""

    event_type: ClassVar[EventType] = EventType.TRAINING
    total_steps: int
    start_step: int


class ProgressPayload(EventPayload):
    """A training step finished (written at most every progress interval, and at the last step)."""

    event_type: ClassVar[EventType] = EventType.PROGRESS
    step: int
    total_steps: int
    loss: float
    learning_rate: float | None
    eta_s: float
    elapsed_s: float | None


class CheckpointPayload(EventPayload):
    """A checkpoint of this step is in storage (a job handed to another worker resumes from it)."""

    event_type: ClassVar[EventType] = EventType.CHECKPOINT
    step: int


SampleKind = Literal["base", "adapter", "teacher", "preview", "generation"]


class SampleImage(BaseModel):
    """One stored sample image (by object key; readers turn the key into a download URL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: SampleKind
    prompt: str
    seed: int
    source: str | None
    key: str


class SamplePayload(EventPayload):
    """Sample images of a step (`final`: of the trained adapter) and their contact sheet, as stored."""

    event_type: ClassVar[EventType] = EventType.SAMPLE
    step: int
    final: bool
    images: list[SampleImage]
    contact_sheet_key: str


class Verdict(BaseModel):
    """One axis of an evaluation in plain words, the sentence behind it, and the figures it rests on."""

    model_config = ConfigDict(extra="allow", frozen=True)
    verdict: str
    summary: str
    figures: list[str] = Field(default_factory=list)


class Verdicts(BaseModel):
    """Whether the concept was learned, and whether the few-step quality was kept (docs/evaluation.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    concept: Verdict
    few_step_quality: Verdict


class EvaluatedPayload(EventPayload):
    """An evaluation of the adapter against the base model on the same seeds: a quick check at a sample `step`
    (`quick`), or the final report (whole on `GET /v1/jobs/{id}` as `report`, and in `report.json`)."""

    event_type: ClassVar[EventType] = EventType.EVALUATED
    step: int | None
    quick: bool
    verdicts: Verdicts


class CancelRequestedPayload(EventPayload):
    """The owner asked a running job to stop; its worker stops within one training step."""

    event_type: ClassVar[EventType] = EventType.CANCEL_REQUESTED


class RequeuedPayload(EventPayload):
    """The job's worker died; the job waits for another one."""

    event_type: ClassVar[EventType] = EventType.REQUEUED
    after_attempt: int


class TrainingSucceededPayload(EventPayload):
    """A training job finished: GPU time over all attempts and the run's metrics."""

    event_type: ClassVar[EventType] = EventType.SUCCEEDED
    gpu_seconds: float
    steps: int
    final_loss: float | None
    gap_before: float | None
    gap_after: float | None
    train_s: float
    images: int


class PreviewSucceededPayload(EventPayload):
    """A preview job finished: GPU time, how many images it rendered and how long that took."""

    event_type: ClassVar[EventType] = EventType.SUCCEEDED
    gpu_seconds: float
    images: int
    render_s: float


class GenerationSucceededPayload(EventPayload):
    """A generation finished: GPU time, its images (they came in its `sample` event), how long rendering took, and
    how many images shared its pipeline calls (`batch_images`; more than `images` when other requests joined)."""

    event_type: ClassVar[EventType] = EventType.SUCCEEDED
    gpu_seconds: float
    images: int
    render_s: float
    batch_images: int
    adapters_cached: int


class FailedPayload(EventPayload):
    """The job failed with a stable `code` (the readable `message` is left out when there is none)."""

    event_type: ClassVar[EventType] = EventType.FAILED
    code: str
    message: str | SkipJsonSchema[None] = Field(None, exclude_if=_absent)


class CanceledPayload(EventPayload):
    """The job was canceled: `while` it was queued or after its worker was lost, or at the `step` it stopped."""

    event_type: ClassVar[EventType] = EventType.CANCELED
    while_: Literal["queued", "worker lost"] | SkipJsonSchema[None] = Field(None, alias="while", exclude_if=_absent)
    step: int | SkipJsonSchema[None] = Field(None, exclude_if=_absent)


class PurgedPayload(EventPayload):
    """Retention deleted the job's data; the job is gone."""

    event_type: ClassVar[EventType] = EventType.PURGED
    reason: Literal["retention"]


class WarningPayload(EventPayload):
    """A stage after training failed (`report`, `gap`, `samples`, `formats`); the job still succeeds with its
    adapter and what the other stages made, and `message` says what is missing and why."""

    event_type: ClassVar[EventType] = EventType.WARNING
    stage: str
    message: str


SucceededPayload = TrainingSucceededPayload | GenerationSucceededPayload | PreviewSucceededPayload
AnyPayload = (
    QueuedPayload
    | StartedPayload
    | ModelLoadedPayload
    | TrainingPayload
    | ProgressPayload
    | CheckpointPayload
    | SamplePayload
    | EvaluatedPayload
    | CancelRequestedPayload
    | RequeuedPayload
    | SucceededPayload
    | FailedPayload
    | CanceledPayload
    | PurgedPayload
    | WarningPayload
)

# How each type's stored data is read back (a `succeeded` event is one of three shapes: training, generation or
# preview, tried in that order; a generation's carries `batch_images`, which a preview's lacks).
PAYLOADS: dict[EventType, TypeAdapter[Any]] = {
    EventType.QUEUED: TypeAdapter(QueuedPayload),
    EventType.STARTED: TypeAdapter(StartedPayload),
    EventType.MODEL_LOADED: TypeAdapter(ModelLoadedPayload),
    EventType.TRAINING: TypeAdapter(TrainingPayload),
    EventType.PROGRESS: TypeAdapter(ProgressPayload),
    EventType.CHECKPOINT: TypeAdapter(CheckpointPayload),
    EventType.SAMPLE: TypeAdapter(SamplePayload),
    EventType.EVALUATED: TypeAdapter(EvaluatedPayload),
    EventType.CANCEL_REQUESTED: TypeAdapter(CancelRequestedPayload),
    EventType.REQUEUED: TypeAdapter(RequeuedPayload),
    EventType.SUCCEEDED: TypeAdapter(Annotated[SucceededPayload, Field(union_mode="left_to_right")]),
    EventType.FAILED: TypeAdapter(FailedPayload),
    EventType.CANCELED: TypeAdapter(CanceledPayload),
    EventType.PURGED: TypeAdapter(PurgedPayload),
    EventType.WARNING: TypeAdapter(WarningPayload),
}

# The webhooks a job gets when its spec names none.
DEFAULT_WEBHOOK_EVENTS = (
    EventType.STARTED,
    EventType.SAMPLE,
    EventType.SUCCEEDED,
    EventType.FAILED,
    EventType.CANCELED,
)


def parse_payload(type_: str, data: dict[str, Any]) -> AnyPayload:
    """An event's stored data as its payload model (`ValueError` for an unknown type, a validation error for data
    that is not that type's shape)."""
    payload: AnyPayload = PAYLOADS[EventType(type_)].validate_python(data)
    return payload


def succeeded_payload(data: dict[str, Any]) -> SucceededPayload:
    """The payload of a `succeeded` event from its fields (`gpu_seconds` and the worker's metrics)."""
    payload: SucceededPayload = PAYLOADS[EventType.SUCCEEDED].validate_python(data)
    return payload


def add_event(*, session: Session, job_id: uuid.UUID, payload: EventPayload) -> JobEvent:
    """Appends `payload` to a job's event log as an event of its type; when the job has a webhook that wants this
    type, the delivery is queued in the same transaction (an outbox: an event is never announced without being
    stored, nor stored unannounced)."""
    type_ = payload.event_type
    event = JobEvent(job_id=job_id, type=type_.value, data=payload.model_dump(mode="json"))
    session.add(event)
    hook = session.execute(select(Job.webhook_url, Job.webhook_events).where(Job.id == job_id)).one_or_none()
    if hook is not None and hook[0] and type_ in (hook[1] or ()):
        session.flush()  # the event's id is the delivery's stable webhook-id
        session.add(WebhookDelivery(job_id=job_id, event_id=event.id, event_type=type_.value, url=hook[0]))
    return event
