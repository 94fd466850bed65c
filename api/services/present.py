"""What a client sees of a job, a preview, an event, an artifact and a webhook delivery: the one place where rows
become response bodies (download URLs signed as they are read)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.public_events import EVENT_PUBLIC, EventPublic, public_payload
from api.schemas import (
    ArtifactPublic,
    ArtifactsPublic,
    ImagePublic,
    JobError,
    JobPublic,
    PreviewImagePublic,
    PreviewPublic,
    Progress,
    WebhookAttemptPublic,
    WebhookDeliveriesPublic,
    WebhookDeliveryPublic,
)
from core.events import EventType, SamplePayload, parse_payload
from core.jobs import client_side
from core.jobs.models import Job, JobArtifact, JobEvent
from core.jobs.states import JobStatus
from core.storage import ArtifactStore
from core.webhooks import list_deliveries


def job_public(job: Job, session: Session) -> JobPublic:
    """The job resource its owner sees: status, queue position, progress, resolved config, error and links."""
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}
    if job.webhook_url:
        links["webhook_deliveries"] = f"{base}/webhook-deliveries"
    if job.job_status == JobStatus.SUCCEEDED:
        links["artifacts"] = f"{base}/artifacts"
        if job.kind == "training":
            links["adapter"] = f"{base}/adapter"
    started = job.started_at is not None
    return JobPublic(
        id=job.id,
        kind=job.kind,
        status=job.status,
        preset=job.preset,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_position=client_side.queue_position(session=session, job=job),
        progress=Progress(step=job.step, total_steps=job.total_steps, loss=job.loss, eta_s=job.eta_s)
        if started
        else None,
        attempt=job.attempt,
        gpu_seconds=None if job.gpu_seconds is None else round(job.gpu_seconds, 3),
        cancel_requested=job.cancel_requested,
        images=[ImagePublic(name=i["name"], size=i["size"]) for i in job.images],
        config=job.config,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code is not None else None,
        report=job.report,
        links=links,
    )


def preview_public(job: Job, session: Session, store: ArtifactStore, ttl_s: int) -> PreviewPublic:
    """A preview job and, once it succeeded, its zero-shot images (from its last `sample` event)."""
    images: list[PreviewImagePublic] = []
    if job.job_status == JobStatus.SUCCEEDED:
        event = client_side.latest_event(session=session, job_id=job.id, type=EventType.SAMPLE)
        for image in SamplePayload.model_validate(event.data).images if event else []:
            url = store.download_url(image.key, filename=image.name.rsplit("/", 1)[-1], ttl_s=ttl_s)
            images.append(PreviewImagePublic(prompt=image.prompt, seed=image.seed, source=image.source or "", url=url))
    public = job_public(job, session).model_dump(exclude={"report"})
    check = (job.report or {}).get("teacher_check")
    return PreviewPublic(**public, report=None, preview_images=images, teacher_check=check)


def event_public(event: JobEvent, store: ArtifactStore, ttl_s: int) -> EventPublic:
    """One event as the events endpoint, the stream and webhooks show it (stored keys become URLs)."""
    data = public_payload(parse_payload(event.type, event.data), store, ttl_s)
    return EVENT_PUBLIC.validate_python(
        {"id": event.id, "type": event.type, "created_at": event.created_at, "data": data}
    )


def artifacts_public(artifacts: list[JobArtifact], store: ArtifactStore, ttl_s: int) -> ArtifactsPublic:
    """Every output of a succeeded job with a short-lived URL each."""
    return ArtifactsPublic(
        data=[
            ArtifactPublic(
                name=a.name,
                kind=a.kind,
                size=a.size,
                content_type=a.content_type,
                url=store.download_url(a.key, filename=a.name.rsplit("/", 1)[-1], ttl_s=ttl_s),
                expires_in_s=ttl_s,
            )
            for a in artifacts
        ]
    )


def deliveries_public(session: Session, job: Job) -> WebhookDeliveriesPublic:
    """Every webhook delivery of the job with each attempt (when, the receiver's status or error, duration)."""
    return WebhookDeliveriesPublic(
        data=[
            WebhookDeliveryPublic(
                id=d.id,
                event_id=d.event_id,
                event_type=d.event_type,
                url=d.url,
                status=d.status,
                next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
                attempts=[WebhookAttemptPublic.model_validate(a) for a in d.attempts],
            )
            for d in list_deliveries(session=session, job_id=job.id)
        ]
    )
