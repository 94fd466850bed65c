"""Submitting a job or a preview: stream and check the upload (within the key's upload limits), answer a dry run,
replay an `Idempotency-Key`, enforce the per-key queue limit and storage quota, store the images and the job row in
one go, then ring the broker's doorbell.

An invalid request leaves nothing behind: nothing is stored before every check passed, and a failure while storing
removes what was written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.estimate import estimate_gpu_seconds
from api.remote_archive import fetch_rules
from api.schemas import DryRunPublic, ImagePublic, JobSpec
from api.submission import ValidatedJob, check_fields, resolve_init_adapter, validate_submission
from api.upload_guards import upload_guards
from api.uploads import UploadedFile, UploadLimits, parse_multipart
from core.config import Settings
from core.errors import QuotaExceeded, TooManyRequests
from core.jobs import client_side, idempotency, usage
from core.jobs.models import Job
from core.queue import enqueue, queue_for_family
from core.storage import ArtifactStore, input_key, job_prefix
from core.webhooks import validate_webhook


logger = logging.getLogger(__name__)

MAX_PREVIEW_IMAGES = 8


@dataclass(frozen=True)
class Received:
    """An upload that passed every check, its files still in the request's temporary folder."""

    validated: ValidatedJob
    webhook_events: list[str] | None
    kind: str

    def request_hash(self) -> str:
        """What makes two submissions the same request (see `submission_hash`)."""
        spec = self.validated.spec
        return submission_hash(self.kind, spec, [] if spec.images_url else [u for u, _, _ in self.validated.images])

    @property
    def input_bytes(self) -> int:
        """The bytes the images would store."""
        return sum(upload.size for upload, _, _ in self.validated.images)


def submission_hash(kind: str, spec: JobSpec, files: list[UploadedFile]) -> str:
    """What makes two submissions the same request: the kind, the spec and every uploaded file's name and bytes.
    An archive fetched from `spec.images_url` counts as its URL (in the spec), not as the bytes fetched: a client's
    retry is the same request though the URL has expired since (a presigned URL) or now serves other bytes, and it
    is answered before anything is fetched again."""
    described = json.dumps({"kind": kind, **spec.model_dump(mode="json")}, sort_keys=True)
    digest = hashlib.sha256(described.encode())
    for upload in files:
        digest.update(f"\n{upload.safe_name}:{upload.digest.hexdigest()}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Submitted:
    """The job a submission made, or the earlier one an `Idempotency-Key` replayed."""

    job: Job
    replayed: bool


@asynccontextmanager
async def received_upload(
    request: Request,
    settings: Settings,
    kind: str,
    owner_id: uuid.UUID,
    replay: Callable[[str], Job | None] | None = None,
) -> AsyncIterator[Received | Job]:
    """Streams the multipart body to a temporary folder with the upload limits enforced while reading, then checks
    the spec, fetches a `spec.images_url` archive, checks every image (in the validation processes, within the
    key's limits) and the webhook target; the files live until the block ends. A key has at most
    `max_uploads_per_key` of these (fetches included) at once. With `replay`, a `spec.images_url` request whose
    hash it maps to an earlier job yields that job, before anything is fetched."""
    limits = UploadLimits(
        max_files=settings.max_images,
        max_file_bytes=settings.max_file_bytes,
        max_total_bytes=settings.max_total_bytes,
        max_field_bytes=settings.max_spec_bytes,
    )
    max_images = settings.max_images if kind == "training" else min(settings.max_images, MAX_PREVIEW_IMAGES)
    guards = upload_guards(request, settings)
    async with guards.uploads.slot(owner_id):
        with tempfile.TemporaryDirectory(prefix="dopsd-upload-") as tmp:
            upload = await parse_multipart(request, Path(tmp), limits)
            spec = check_fields(upload)
            earlier = replay(submission_hash(kind, spec, [])) if replay and spec.images_url else None
            if earlier is not None:
                yield earlier
                return
            validated = await validate_submission(
                upload, spec, max_images, owner_id=owner_id, settings=settings, guards=guards,
                fetch=fetch_rules(settings, request.app.state), folder=Path(tmp),
            )  # fmt: skip
            webhook_events = await run_in_threadpool(
                validate_webhook,
                validated.spec.webhook_url,
                validated.spec.webhook_events,
                allow_private=settings.webhook_allow_private,
            )
            yield Received(validated=validated, webhook_events=webhook_events, kind=kind)


def check_key_limits(
    *, session: Session, owner_id: uuid.UUID, settings: Settings, incoming_bytes: int, queued: bool = True
) -> None:
    """The key's standing limits, as a submission (or its dry run) meets them: its queued jobs (429
    `too_many_queued_jobs`; not with `queued=False`, for generations, which have their own) and its storage quota
    (403 `storage_quota_exceeded`), this upload's bytes included."""
    if queued and client_side.count_queued(session=session, owner_id=owner_id) >= settings.max_queued_per_key:
        raise TooManyRequests(
            f"this key already has {settings.max_queued_per_key} queued jobs", retry_after_s=60,
            code="too_many_queued_jobs",
        )  # fmt: skip
    quota = settings.max_stored_bytes_per_key
    if quota:
        stored = usage.stored_bytes(session=session, owner_id=owner_id)
        if stored + incoming_bytes > quota:
            raise QuotaExceeded(
                f"this key stores {stored} bytes; with this upload's {incoming_bytes} it would pass its quota of "
                f"{quota} bytes. Delete jobs you no longer need (GET /v1/usage shows what is stored)",
                code="storage_quota_exceeded",
                details={"stored_bytes": stored, "upload_bytes": incoming_bytes, "quota_bytes": quota},
            )


async def dry_run(
    request: Request, *, owner_id: uuid.UUID, session: Session, settings: Settings, kind: str
) -> DryRunPublic:
    """Every check of a submission, the key's limits included (it answers what the submission would), then what
    it would do (resolved config, estimate, queue position); creates nothing. It costs the key's upload limits as
    a submission does."""
    async with received_upload(request, settings, kind, owner_id) as received:
        assert isinstance(received, Received)  # no `replay`: never an earlier job
        validated = received.validated
        resolve_init_adapter(validated, session=session, owner_id=owner_id, kind=kind)
        check_key_limits(session=session, owner_id=owner_id, settings=settings, incoming_bytes=received.input_bytes)
        queue = _queue_of(validated, kind)
        return DryRunPublic(
            config=validated.config,
            images=[ImagePublic(name=u.safe_name, size=u.size) for u, _, _ in validated.images],
            estimated_gpu_seconds=estimate_gpu_seconds(
                session=session, preset=validated.preset, config=validated.config
            ),
            queue_position=client_side.queued_in(session=session, queue=queue) + 1,
        )


async def submit(
    request: Request,
    *,
    owner_id: uuid.UUID,
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    idempotency_key: str | None,
    kind: str,
) -> Submitted:
    """The one submission path of training jobs and previews: check, replay or store and record, then dispatch."""
    replay = functools.partial(find_replay, session, owner_id, idempotency_key or "", settings=settings)
    async with received_upload(request, settings, kind, owner_id, replay if idempotency_key else None) as received:
        if isinstance(received, Job):  # a `spec.images_url` request replayed before its fetch
            return Submitted(received, replayed=True)
        request_hash = received.request_hash()
        if idempotency_key:
            earlier = find_replay(session, owner_id, idempotency_key, request_hash, settings)
            if earlier is not None:
                return Submitted(earlier, replayed=True)
        resolve_init_adapter(received.validated, session=session, owner_id=owner_id, kind=kind)
        check_key_limits(session=session, owner_id=owner_id, settings=settings, incoming_bytes=received.input_bytes)
        job_id = uuid.uuid4()
        try:
            job = await _store_and_record(session, store, settings, owner_id, job_id, received, idempotency_key)
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the race: answer with its job.
            session.rollback()
            await run_in_threadpool(store.delete_prefix, job_prefix(job_id))
            earlier = find_replay(session, owner_id, idempotency_key or "", request_hash, settings)
            if earlier is None:
                raise
            return Submitted(earlier, replayed=True)
        except BaseException:
            session.rollback()
            await run_in_threadpool(store.delete_prefix, job_prefix(job_id))
            raise
    await dispatch(settings, job)
    return Submitted(job, replayed=False)


def find_replay(session: Session, owner_id: uuid.UUID, key: str, request_hash: str, settings: Settings) -> Job | None:
    """The job an earlier request with this `Idempotency-Key` made (409 when that request was a different one)."""
    return idempotency.find_idempotent_job(
        session=session, owner_id=owner_id, key=key, request_hash=request_hash, ttl_s=settings.idempotency_ttl_s
    )


async def _store_and_record(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    owner_id: uuid.UUID,
    job_id: uuid.UUID,
    received: Received,
    idempotency_key: str | None,
) -> Job:
    """Stores the images under the job's prefix, then commits the queued job (and its idempotency record)."""
    validated = received.validated
    images = await run_in_threadpool(_store_inputs, store, job_id, validated)
    # Under the key's row lock, so two submissions of one key cannot both fit in the last of its quota.
    usage.lock_key(session=session, owner_id=owner_id)
    check_key_limits(
        session=session, owner_id=owner_id, settings=settings, incoming_bytes=sum(i["size"] for i in images)
    )
    job = client_side.create_job(
        session=session,
        job_id=job_id,
        owner_id=owner_id,
        kind=received.kind,
        preset=validated.preset.name,
        queue=_queue_of(validated, received.kind),
        spec=validated.spec.model_dump(mode="json"),
        config=validated.config,
        images=images,
        webhook_url=validated.spec.webhook_url,
        webhook_events=received.webhook_events,
    )
    if idempotency_key:
        idempotency.record_idempotency(
            session=session, owner_id=owner_id, key=idempotency_key, request_hash=received.request_hash(),
            job_id=job_id, ttl_s=settings.idempotency_ttl_s,
        )  # fmt: skip
    session.commit()
    return job


def _queue_of(validated: ValidatedJob, kind: str) -> str:
    """The queue a job waits in: its model family's, for the GPUs it asks for (a preview trains nothing and runs on
    one)."""
    processes = int(validated.config.get("num_processes") or 1) if kind == "training" else 1
    return queue_for_family(validated.preset.family, processes)


def _store_inputs(store: ArtifactStore, job_id: uuid.UUID, validated: ValidatedJob) -> list[dict[str, Any]]:
    images = []
    for upload, ext, content_type in validated.images:
        key = input_key(job_id, upload.index, ext)
        size = store.put_file(key, upload.path, content_type)
        images.append({"name": upload.safe_name, "key": key, "size": size, "content_type": content_type})
    return images


async def dispatch(settings: Settings, job: Job) -> None:
    """Sends the committed job's message; a broker that is down leaves it to the reaper."""
    try:
        await run_in_threadpool(enqueue, settings, job.id, job.queue)
    except Exception as exc:
        # The job is committed and queued: the reaper sends its message once the broker is back.
        logger.warning("job %s: broker unreachable (%s); the reaper will dispatch it", job.id, type(exc).__name__)
