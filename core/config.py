"""Service settings (pydantic-settings, `DOPSD_` environment prefix), made once per process by `get_settings()`.

Two shapes: the production stack (PostgreSQL, Redis, S3-compatible storage) and the embedded mode of `make run`
(SQLite, Celery's filesystem broker, a local artifact folder), which needs no server installed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the service; each is also an environment variable `DOPSD_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="DOPSD_", env_file=None, extra="ignore")

    environment: Literal["development", "production"] = Field(
        "production",
        description="`production` (the default) refuses the development signing key and the development API key; "
        "`make run` sets `development` for its local trial.",
    )
    database_url: str = Field("sqlite:///var/dopsd.db", description="SQLAlchemy URL of the job database.")
    broker_url: str = Field("filesystem://", description="Celery broker URL (redis://... in production).")
    broker_dir: Path = Field(Path("var/broker"), description="Folder of the embedded filesystem broker.")

    storage_backend: Literal["s3", "local"] = "local"
    storage_dir: Path = Field(Path("var/artifacts"), description="Artifact folder of the local store.")
    s3_endpoint_url: str | None = Field(None, description="Where the API and workers reach the S3 server.")
    s3_public_endpoint_url: str | None = Field(
        None,
        description="Where clients reach the same S3 server (e.g. https://s3.example.com), when that differs from "
        "DOPSD_S3_ENDPOINT_URL (an address inside the deployment's network): presigned URLs are signed for it. "
        "Used only for signing; unset: DOPSD_S3_ENDPOINT_URL.",
    )
    s3_bucket: str = "dopsd"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    presigned_url_ttl_s: int = Field(900, ge=10, le=7 * 24 * 3600)

    public_url: str = Field("http://127.0.0.1:8000", description="Base URL clients use to reach the API.")
    signing_key: SecretStr = Field(
        SecretStr("development-only-signing-key"), description="HMAC key of the API's own download URLs."
    )
    dev_api_key: SecretStr | None = Field(None, description="Registered at start-up in development, for scripts.")

    database_pool_size: int = Field(10, ge=1, description="Database connections an API process keeps open.")
    database_max_overflow: int = Field(
        20, ge=0, description="Further database connections an API process may open at peaks."
    )

    max_images: int = Field(64, ge=1, le=64)
    max_file_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_total_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_spec_bytes: int = Field(64 * 1024, ge=256)
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        le=64_000_000,
        description="Pixels (width x height, from the header) one uploaded image may have; more answers "
        "`image_too_large` (413) before anything is decoded. Above 64,000,000 an image is a `decompression_bomb`.",
    )
    max_request_pixels: int = Field(
        512_000_000,
        ge=1,
        description="Pixels all images of one upload (job, dry run or preview) may have together; more answers "
        "`too_many_pixels` (413) before anything is decoded.",
    )
    upload_pixels_per_minute: int = Field(
        1_536_000_000,
        ge=1,
        description="Image pixels one key may have checked per minute, jobs, dry runs and previews alike (a token "
        "bucket per API process); beyond, `upload_budget_exceeded` (429 with Retry-After).",
    )
    max_uploads_per_key: int = Field(
        2, ge=1, description="Uploads of one key that stream and are checked at once (per API process); one more "
        "waits up to `upload_slot_wait_s` before its body is read, then answers `too_many_uploads` (429).",
    )  # fmt: skip
    upload_slot_wait_s: float = Field(
        10.0, ge=0, description="How long an upload beyond `max_uploads_per_key` waits for one of its key's slots."
    )
    validation_workers: int = Field(
        2, ge=1, description="Processes (per API process, at a lower CPU priority) that decode uploaded images; "
        "one key uses one at a time.",
    )  # fmt: skip
    max_stored_bytes_per_key: int = Field(
        20 * 1024**3,
        ge=0,
        description="Bytes one key may have stored across its jobs (inputs, checkpoints, samples, adapters; see "
        "`GET /v1/usage`); a submission that would pass it answers `storage_quota_exceeded` (403). 0: no quota.",
    )

    max_job_s: int = Field(6 * 3600, description="Hard time limit of one training job.")
    lease_s: int = Field(600, ge=5, description="How long a running job stays its worker's without a heartbeat.")
    max_attempts: int = Field(3, ge=1, description="Deliveries of one job before it fails for good.")
    reaper_interval_s: float = Field(
        15.0, gt=0, description="How often maintenance re-queues and re-dispatches jobs (and applies retention)."
    )
    dispatch_grace_s: float = Field(
        60.0, gt=0, description="A queued job not taken within this time is dispatched again (lost messages)."
    )
    max_running_per_key: int = Field(2, ge=1, description="Jobs of one key that run at once; more wait queued.")
    max_queued_per_key: int = Field(20, ge=1, description="Queued jobs one key may have; more are refused (429).")
    max_processes_per_job: int = Field(
        1,
        ge=1,
        description="Processes (GPUs) one training job may ask for with `num_processes`: the most GPUs any worker of "
        "the deployment owns (`DOPSD_WORKER_GPUS`); more is refused (422 `num_processes_unavailable`). A job asking "
        "for N waits in its family's queue of N-GPU jobs (docs/distributed.md).",
    )
    max_running_generations_per_key: int = Field(
        4, ge=1, description="Generations of one key that run at once (apart from its training jobs); more wait."
    )
    max_queued_generations_per_key: int = Field(
        50, ge=1, description="Queued generations one key may have; more are refused (429 `too_many_queued_jobs`)."
    )
    generation_max_images: int = Field(
        16, ge=1, le=64, description="Images one generation may ask for (prompts x seeds); more are refused (400)."
    )
    generation_max_batch: int = Field(
        4,
        ge=1,
        description="Images a generation worker renders in one pipeline call; queued generations of the same preset, "
        "size, settings and adapters are claimed together up to this (1: no batching; docs/generations.md).",
    )
    generation_adapter_cache: int = Field(
        8, ge=0, description="Adapters a generation worker keeps loaded in memory between requests (an LRU)."
    )
    generation_adapter_cache_bytes: int = Field(
        4 * 1024**3,
        ge=0,
        description="Bytes of adapters a generation worker keeps in memory at most (a rank-64 Z-Image-Turbo adapter "
        "is about 0.64 GB in fp32); 0: no byte bound, only the count.",
    )
    rate_limit_per_minute: int = Field(600, ge=1, description="Requests per key and minute (429 beyond).")
    redis_url: str | None = Field(
        None,
        description="Redis the API replicas share for the per-key rate limit and open-stream counts; unset: the "
        "broker's when it is redis://, else each process counts alone (embedded mode).",
    )
    max_streams_per_key: int = Field(
        16,
        ge=1,
        description="Server-sent event streams one key may hold open at once, over all replicas (429 beyond).",
    )
    stream_max_s: float = Field(
        300.0, gt=0, description="An event stream ends after this long; the client reconnects with Last-Event-ID."
    )
    metrics_token: SecretStr | None = Field(
        None, description="If set, GET /metrics answers only `Authorization: Bearer <this token>` (401 otherwise)."
    )
    metrics_cache_s: float = Field(
        5.0, ge=0, description="How long /metrics reuses the job aggregates it read from the database (0: never)."
    )
    idempotency_ttl_s: int = Field(24 * 3600, description="How long an Idempotency-Key maps to its job.")
    retention_days: float = Field(
        30, ge=0, description="Finished jobs' images, checkpoints and artifacts are deleted after this (0: keep)."
    )
    deletion_grace_s: float = Field(
        86400,
        ge=0,
        description="A deleted job's personal data (spec, captions, prompts, file names, webhook URL, events) stays "
        "in the database this long after `DELETE` or retention, then is erased; its stored objects go at once. "
        "Longer than the webhook retries (about two hours), so the job's last events are still delivered.",
    )
    outage_tolerance_s: float = Field(
        600.0,
        gt=0,
        description="How long a running job rides out an outage of the database or object storage: its writes and "
        "transfers wait and retry (a broker blip never stops it); beyond this, it fails with "
        "`database_unavailable` or `storage_unavailable`.",
    )
    progress_interval_s: float = Field(1.0, description="Throttle of progress writes and events.")
    worker_model_cache: int = Field(1, ge=0, description="Loaded base models kept per worker process.")
    worker_gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs this worker owns (on a CPU worker: the CPU processes it may start for one job). It runs a "
        "job asking for up to this many `num_processes` as one torchrun group, one rank per GPU; a job asking for "
        "more fails with `num_processes_unavailable` (a deployment routes it to a larger worker by its queue).",
    )
    worker_group_restarts: int = Field(
        1,
        ge=0,
        description="Times a multi-process job's group is started again on this worker after one of its ranks died "
        "(torchrun's restarts; the group resumes from its newest checkpoint). Past them the job goes back to the "
        "queue as a job whose worker died does.",
    )
    worker_torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch uses in each worker process; unset, torch's default (one per core). On a "
        "machine whose cores other processes share (an API, a second worker, a test suite), 1 avoids the threads "
        "waiting on each other: a 6-step tiny CPU job beside one busy core took 37.5 s with 2 threads, 21.7 s with 1.",
    )
    model_paths: dict[str, str] = Field(
        default_factory=dict,
        description="Where a worker finds model weights on its own disk: a JSON object from a model id that presets "
        "name for their base model or teacher encoder (`Tongyi-MAI/Z-Image-Turbo`, `Qwen/Qwen3-VL-4B-Instruct`, ...) "
        "to an absolute folder holding that model as published (e.g. `hf download ID --local-dir FOLDER`). A job "
        "naming a mapped id loads it from the folder, its row still showing the id; a mapped folder that is missing "
        "or incomplete fails the job with `model_unavailable`. Ids not mapped load through the Hugging Face cache.",
    )

    @field_validator("model_paths")
    @classmethod
    def _model_folders_are_absolute(cls, value: dict[str, str]) -> dict[str, str]:
        if "" in value:
            raise ValueError("DOPSD_MODEL_PATHS names an empty model id")
        relative = {model: folder for model, folder in value.items() if not folder.startswith("/")}
        if relative:  # a relative folder would depend on where the worker happens to start
            raise ValueError(f"DOPSD_MODEL_PATHS must map model ids to absolute folders, not {relative}")
        return value

    eval_embedding_model: str | None = Field(
        None,
        description="Local folder of a CLIP or DINOv2 model (transformers format) for the evaluation report's "
        "similarity and prompt-adherence figures; unset: those figures are reported as not measured.",
    )

    webhook_allow_private: bool = Field(
        False, description="Allow webhook URLs on loopback/private addresses (tests, on-premises receivers)."
    )
    webhook_retry_delays_s: list[float] = Field(
        [5, 30, 120, 600, 1800, 4500],
        description="Waits before each retry of a failed webhook delivery (about two hours in all).",
    )
    webhook_poll_interval_s: float = Field(1.0, gt=0, description="How often maintenance sends due webhooks.")
    webhook_attempt_timeout_s: float = Field(
        10.0,
        gt=0,
        description="The longest one webhook attempt may take in all (resolution, connection, request, answer); a "
        "slower receiver's attempt fails and is retried.",
    )
    webhook_concurrency: int = Field(
        8, ge=1, description="Webhook attempts one sender process makes at once (and claims per pass)."
    )
    webhook_max_per_key: int = Field(
        2,
        ge=1,
        description="Deliveries of one API key's jobs in one sender pass, so one tenant's backlog or slow receiver "
        "cannot hold up another tenant's deliveries.",
    )
    webhook_max_response_bytes: int = Field(
        4096, ge=0, description="Bytes of a receiver's answer the sender reads at most (never decompressed)."
    )
    images_url_allow_private: bool = Field(
        False,
        description="Allow `spec.images_url` on loopback/private addresses, and plain http:// there (tests, "
        "on-premises object stores); otherwise only https:// URLs on public addresses are fetched.",
    )
    images_url_max_bytes: int | None = Field(
        None, ge=1024, description="Bytes a `spec.images_url` archive may have, counted as it streams; unset: "
        "DOPSD_MAX_TOTAL_BYTES (what an uploaded archive may have).",
    )  # fmt: skip
    images_url_timeout_s: float = Field(
        120.0,
        gt=0,
        description="The longest a `spec.images_url` fetch may take in all (resolution, connections, redirects, "
        "the whole body); a server that trickles is cut at this, not per read.",
    )
    images_url_max_redirects: int = Field(
        3, ge=0, description="Redirects a `spec.images_url` fetch follows, each target checked again like the URL."
    )
    images_url_ca_bundle: Path | None = Field(
        None,
        description="CA certificates (PEM) that `spec.images_url` servers are verified against; unset: certifi's.",
    )
    maintenance_in_api: bool | None = Field(
        None,
        description=(
            "Whether the API process runs maintenance (reaper, retention, webhook sender) itself. Unset: yes in "
            "development (embedded mode), no in production, where `dopsd maintain` runs it as its own process."
        ),
    )
    log_format: Literal["json", "text"] = Field("json", description="Worker log lines: JSON or plain.")

    @model_validator(mode="after")
    def _production_needs_real_secrets(self) -> Settings:
        if self.environment == "production":
            if self.signing_key.get_secret_value() == "development-only-signing-key":
                raise ValueError(
                    "DOPSD_SIGNING_KEY must be set in production (or DOPSD_ENVIRONMENT=development for a local trial)"
                )
            if self.dev_api_key is not None:
                raise ValueError("DOPSD_DEV_API_KEY is for development only (DOPSD_ENVIRONMENT=development)")
        if self.storage_backend == "s3" and not self.s3_endpoint_url:
            raise ValueError("DOPSD_S3_ENDPOINT_URL is required with DOPSD_STORAGE_BACKEND=s3")
        return self

    @property
    def api_runs_maintenance(self) -> bool:
        """Whether the API starts maintenance inside itself (`maintenance_in_api`, or else: not in production)."""
        if self.maintenance_in_api is not None:
            return self.maintenance_in_api
        return self.environment != "production"

    @property
    def shared_redis_url(self) -> str | None:
        """The Redis the API replicas share (`redis_url`, else a redis:// broker's), or None: count in process."""
        if self.redis_url:
            return self.redis_url
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else None

    @property
    def is_sqlite(self) -> bool:
        """Whether the database is the embedded SQLite file."""
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
