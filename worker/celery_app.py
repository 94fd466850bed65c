"""The worker's Celery app: late acks, reject on worker loss, prefetch 1, one queue per model family, and a
visibility timeout longer than the longest job, so a job is neither lost nor handed to two GPUs."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init

from core.config import get_settings
from core.queue import celery_config


def make_celery() -> Celery:
    """The worker app for the environment's settings."""
    settings = get_settings()
    app = Celery("dopsd-worker", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one job per GPU; run one worker process per GPU
        task_time_limit=settings.max_job_s + 600,
        task_soft_time_limit=settings.max_job_s,
        # A broker blip must not stop a job: the task keeps running, and the message redelivered after the
        # reconnect finds the job claimed (or finished) and is dropped, since claims live in the database.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_proc_alive_timeout=120,  # the pool process imports torch and the trainer while it starts
    )
    return app


app = make_celery()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_connections(**_: Any) -> None:
    """Database engines must not cross a fork: each pool process builds its own on first use. The trainer (and
    torch) are imported now, while the worker starts, not when its first job is already waiting (3.4 s measured by
    bench/service.py). The torch thread count is the settings' `worker_torch_threads` where it is set."""
    import torch

    import dopsd.trainer  # noqa: F401
    from worker import runner

    threads = get_settings().worker_torch_threads
    if threads is not None:
        torch.set_num_threads(threads)
    runner.reset_process_state()


@setup_logging.connect  # type: ignore[untyped-decorator]
def _structured_logs(**_: Any) -> None:
    """The worker logs through our handler (JSON lines with the job id), not Celery's default format."""
    from core.logs import configure_logging

    configure_logging(get_settings().log_format)
