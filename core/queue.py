"""The producer side of Celery: task names, queue names per model family, and the send. No worker code here.

Postgres is the source of truth; a message is only the doorbell that tells a worker to look at a job.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery

from core.config import Settings


TASK_TRAIN = "dopsd.train_job"
TASK_GENERATE = "dopsd.generate"
_GENERATION_PREFIX = "generate."


def queue_for_family(family: str, num_processes: int = 1) -> str:
    """One training queue per model family and GPU count, so GPU workers are routed by the weights they hold and
    the GPUs they own: `train.z_image` for one-GPU jobs, `train.z_image.gpus4` for jobs of 4 processes."""
    return f"train.{family}" if num_processes <= 1 else f"train.{family}.gpus{num_processes}"


def generation_queue_for_family(family: str) -> str:
    """One generation queue per model family, apart from training: a generation of seconds never waits behind a
    training job of hours when the deployment gives generations workers of their own (docs/generations.md)."""
    return f"{_GENERATION_PREFIX}{family}"


def task_for_queue(queue: str) -> str:
    """The task a job's message names, by the queue the job waits in."""
    return TASK_GENERATE if queue.startswith(_GENERATION_PREFIX) else TASK_TRAIN


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings shared by producer and worker."""
    transport: dict[str, Any] = {"visibility_timeout": settings.max_job_s + 3600}
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_dir.resolve()
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport.update(
            data_folder_in=str(folder / "out"),
            data_folder_out=str(folder / "out"),
            processed_folder=str(folder / "processed"),
            control_folder=str(folder / "control"),  # kombu's default is ./control in the working directory
            store_processed=False,
        )
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": queue_for_family("z_image"),
    }


_producers: dict[str, Celery] = {}


def producer(settings: Settings) -> Celery:
    """A Celery app that only sends, one per broker URL and process."""
    app = _producers.get(settings.broker_url)
    if app is None:
        app = Celery("dopsd-producer")
        app.conf.update(celery_config(settings))
        _producers[settings.broker_url] = app
    return app


def enqueue(settings: Settings, job_id: uuid.UUID, queue: str) -> None:
    """Rings the doorbell for `job_id` on `queue` (training or generation); call only after the job row is
    committed."""
    producer(settings).send_task(task_for_queue(queue), args=[str(job_id)], queue=queue)
