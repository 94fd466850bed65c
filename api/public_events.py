"""What clients see of stored events: sample images and contact sheets are stored by object key and turned into
short-lived download URLs when read (an event stays readable after any URL in it would have expired). The events
endpoint, the server-sent stream and webhooks all go through here.

`EventPublic` is one model per event type, told apart by `type`, so the OpenAPI document says which `data` each
type carries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from core.events import (
    AnyPayload,
    CanceledPayload,
    CancelRequestedPayload,
    CheckpointPayload,
    EvaluatedPayload,
    EventPayload,
    EventType,
    FailedPayload,
    ModelLoadedPayload,
    ProgressPayload,
    PurgedPayload,
    QueuedPayload,
    RequeuedPayload,
    SampleKind,
    SamplePayload,
    StartedPayload,
    SucceededPayload,
    TrainingPayload,
    WarningPayload,
    parse_payload,
)
from core.storage import ArtifactStore


class SampleImagePublic(BaseModel):
    """One sample image, with a download URL valid for the event's `expires_in_s`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: SampleKind
    prompt: str
    seed: int
    source: str | None
    url: str


class SamplePublicPayload(EventPayload):
    """Sample images of a step (`final`: of the trained adapter) and their contact sheet, as download URLs."""

    event_type: ClassVar[EventType] = EventType.SAMPLE
    step: int
    final: bool
    images: list[SampleImagePublic]
    contact_sheet: str
    expires_in_s: int


PublicPayload = (
    QueuedPayload
    | StartedPayload
    | ModelLoadedPayload
    | TrainingPayload
    | ProgressPayload
    | CheckpointPayload
    | SamplePublicPayload
    | EvaluatedPayload
    | CancelRequestedPayload
    | RequeuedPayload
    | SucceededPayload
    | FailedPayload
    | CanceledPayload
    | PurgedPayload
    | WarningPayload
)


def public_payload(payload: AnyPayload, store: ArtifactStore, ttl_s: int) -> PublicPayload:
    """`payload` as clients see it: a `sample` event's object keys become download URLs valid for `ttl_s`."""
    if not isinstance(payload, SamplePayload):
        return payload

    def url(key: str, name: str) -> str:
        return store.download_url(key, filename=name.rsplit("/", 1)[-1], ttl_s=ttl_s)

    return SamplePublicPayload(
        step=payload.step,
        final=payload.final,
        images=[
            SampleImagePublic(
                **image.model_dump(exclude={"key"}),
                url=url(image.key, image.name),
            )
            for image in payload.images
        ],
        contact_sheet=url(payload.contact_sheet_key, "contact_sheet.png"),
        expires_in_s=ttl_s,
    )


def public_event_data(type_: str, data: dict[str, Any], store: ArtifactStore, ttl_s: int) -> dict[str, Any]:
    """Stored event data as the JSON clients see (webhook bodies): `public_payload` of its parsed payload."""
    return public_payload(parse_payload(type_, data), store, ttl_s).model_dump(mode="json")


class _Event(BaseModel):
    id: int
    type: EventType
    created_at: datetime
    data: PublicPayload


class QueuedEvent(_Event):
    type: Literal[EventType.QUEUED]
    data: QueuedPayload


class StartedEvent(_Event):
    type: Literal[EventType.STARTED]
    data: StartedPayload


class ModelLoadedEvent(_Event):
    type: Literal[EventType.MODEL_LOADED]
    data: ModelLoadedPayload


class TrainingEvent(_Event):
    type: Literal[EventType.TRAINING]
    data: TrainingPayload


class ProgressEvent(_Event):
    type: Literal[EventType.PROGRESS]
    data: ProgressPayload


class CheckpointEvent(_Event):
    type: Literal[EventType.CHECKPOINT]
    data: CheckpointPayload


class SampleEvent(_Event):
    type: Literal[EventType.SAMPLE]
    data: SamplePublicPayload


class EvaluatedEvent(_Event):
    type: Literal[EventType.EVALUATED]
    data: EvaluatedPayload


class CancelRequestedEvent(_Event):
    type: Literal[EventType.CANCEL_REQUESTED]
    data: CancelRequestedPayload


class RequeuedEvent(_Event):
    type: Literal[EventType.REQUEUED]
    data: RequeuedPayload


class SucceededEvent(_Event):
    type: Literal[EventType.SUCCEEDED]
    data: SucceededPayload


class FailedEvent(_Event):
    type: Literal[EventType.FAILED]
    data: FailedPayload


class CanceledEvent(_Event):
    type: Literal[EventType.CANCELED]
    data: CanceledPayload


class PurgedEvent(_Event):
    type: Literal[EventType.PURGED]
    data: PurgedPayload


class WarningEvent(_Event):
    type: Literal[EventType.WARNING]
    data: WarningPayload


EventPublic = Annotated[
    QueuedEvent
    | StartedEvent
    | ModelLoadedEvent
    | TrainingEvent
    | ProgressEvent
    | CheckpointEvent
    | SampleEvent
    | EvaluatedEvent
    | CancelRequestedEvent
    | RequeuedEvent
    | SucceededEvent
    | FailedEvent
    | CanceledEvent
    | PurgedEvent
    | WarningEvent,
    Field(discriminator="type"),
]
# Validates one event into its type's model (`data` already a payload model: it is kept as it is).
EVENT_PUBLIC: TypeAdapter[EventPublic] = TypeAdapter(EventPublic)
