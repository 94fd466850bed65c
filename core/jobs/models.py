"""ORM models: API keys, jobs, their events and their artifacts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db import Base, UTCDateTime
from core.jobs.states import JobStatus


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the models use."""
    return datetime.now(UTC)


# What a job is (`Job.kind`): a training run, a zero-shot preview, or a generation of images with adapters.
TRAINING, PREVIEW, GENERATION = "training", "preview", "generation"

# BigInteger autoincrement ids on PostgreSQL; SQLite only autoincrements INTEGER primary keys.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class ApiKey(Base):
    """A client's key; only its SHA-256 is stored, the key itself is shown once."""

    __tablename__ = "api_key"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    # The HMAC key of this key's webhooks (Standard Webhooks `whsec_...`); the server must keep it to sign.
    webhook_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Job(Base):
    """A training job: its spec, where it is, its progress and its outcome. The source of truth for status."""

    __tablename__ = "job"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_key.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED.value)
    kind: Mapped[str] = mapped_column(String(16), default="training", server_default="training")
    preset: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    images: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    # A running job belongs to its worker until this time; the worker renews it while it makes progress, and a
    # redelivered message may take over a job whose lease ran out (its worker died).
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # When a message for this job was last sent; the reaper sends again when a queued job waits too long.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, default=None)
    eta_s: Mapped[float | None] = mapped_column(Float, default=None)
    # Wall time the job held a GPU worker, summed over attempts (set as attempts end).
    gpu_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    webhook_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    # When the job was deleted (`DELETE`, or retention); when the sweep found its stored objects gone after its
    # worker stopped; when its personal data was erased from the database, `deletion_grace_s` later.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    objects_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    data_erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    # The evaluation report of a succeeded training job (`report.json`, docs/evaluation.md); null before or without.
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Bytes stored under the job's prefix: its inputs from submission on, then what its worker listed there when
    # an attempt ended (checkpoints, samples, outputs). The storage quota sums it over a key's jobs not deleted.
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    artifacts: Mapped[list[JobArtifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobArtifact.name"
    )

    @property
    def job_status(self) -> JobStatus:
        """`status` as the enum."""
        return JobStatus(self.status)


class JobEvent(Base):
    """One entry of a job's event log; `id` orders events and is the client's `after` cursor."""

    __tablename__ = "job_event"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class JobArtifact(Base):
    """A file a finished job produced, stored under the job's prefix."""

    __tablename__ = "job_artifact"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(300))
    key: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))

    job: Mapped[Job] = relationship(back_populates="artifacts")


class WebhookDelivery(Base):
    """One event to POST to a job's webhook (written with the event: an outbox), with every attempt made."""

    __tablename__ = "webhook_delivery"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2000))
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending, delivered, failed
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdempotencyRecord(Base):
    """An `Idempotency-Key` a client sent with a job submission, and the job it created."""

    __tablename__ = "idempotency_record"
    __table_args__ = (UniqueConstraint("owner_id", "key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_key.id"))
    key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
