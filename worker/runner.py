"""`run_job()`: claim -> fetch inputs (and the newest checkpoint) -> train -> upload -> finish, with every failure
recorded on the job as a stable code and a readable message."""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings, get_settings
from core.db import make_engine, make_sessionmaker, session_scope
from core.errors import NotFound, ServiceUnavailable
from core.jobs import worker_side
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.storage import (
    ADAPTER_FILES,
    ArtifactStore,
    checkpoint_prefix,
    job_prefix,
    make_store,
    output_key,
)
from dopsd.checkpoint import list_checkpoints
from dopsd.config import DOPSDConfig
from dopsd.data import DataError
from dopsd.errors import CheckpointError, ModelLoadError, TeacherBlind, TrainingCancelled
from dopsd.outputs import TRANSFORMER_FOLDER
from dopsd.trainer import TrainingResult
from worker.dbretry import DatabaseUnavailable, retry_db
from worker.group import GroupDied, GroupFailed, GroupResult
from worker.model_cache import ModelCache
from worker.model_paths import with_local_weights
from worker.reporting import JobReporter, LeaseLost
from worker.uploads import download_prefix, record_stored_bytes, upload_tree, with_retries


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerResources:
    """What a pool process makes once and keeps between jobs: its settings, database sessions, artifact store
    and cache of loaded base models. Made on first use, never at import: engines and clients must not cross a
    fork."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    models: ModelCache

    def reporter(self, job_id: uuid.UUID, worker_id: str) -> JobReporter:
        """The trainer callback that reports `job_id`'s attempt under `worker_id` (this process's, or a rank's of
        a multi-process job, which reports under its worker's id)."""
        return JobReporter(
            job_id,
            worker_id=worker_id,
            sessions=self.sessions,
            store=self.store,
            interval_s=self.settings.progress_interval_s,
            lease_s=self.settings.lease_s,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerResources:
        """Connects to what `settings` describe (lazily: nothing is opened until the first query or transfer)."""
        return cls(
            settings=settings,
            sessions=make_sessionmaker(make_engine(settings.database_url)),
            store=make_store(settings),
            models=ModelCache(settings.worker_model_cache),
        )


@functools.cache
def process_resources() -> WorkerResources:
    """This process's resources, made on first use."""
    return WorkerResources.from_settings(get_settings())


def reset_process_state() -> None:
    """Forgets resources made before a fork (called in each new pool process)."""
    process_resources.cache_clear()


def _artifact_kind(name: str) -> str:
    if name in ADAPTER_FILES.values():
        return "adapter"
    if name.startswith("samples/"):
        return "sample"
    if name.startswith("preview/"):
        return "preview"
    if name.startswith(f"{TRANSFORMER_FOLDER}/"):  # a full fine-tune's transformer, in diffusers' format
        return "model"
    return name.rsplit(".", 1)[0]  # config, metrics


def _fetch_inputs(store: ArtifactStore, job: Job, folder: Path) -> None:
    folder.mkdir(parents=True)
    for image in job.images:
        key, target = str(image["key"]), folder / str(image["name"])
        with_retries(functools.partial(store.get_file, key, target), what=f"download of {key}")


def _fetch_latest_checkpoint(store: ArtifactStore, job_id: uuid.UUID, out: Path) -> Path | None:
    """Downloads the job's checkpoints from storage (a redelivered job resumes instead of starting over)."""
    prefix = checkpoint_prefix(job_id)
    download_prefix(store, prefix, out / "checkpoints")
    found = list_checkpoints(out / "checkpoints")
    return found[-1] if found else None


def _fetch_init_adapter(
    resources: WorkerResources, config_values: dict[str, Any], folder: Path, *, resuming: bool
) -> dict[str, Any]:
    """For a job that continues an earlier one (`init_adapter` in its config: that job's id): downloads that job's
    adapter, config.json, metrics.json and final adapter samples into `folder/<id>/` (its output layout, which the
    trainer's retention check reads) and returns the config change that points the trainer there. An earlier job
    deleted before this one started fails it (`bad_input`); a resumed job has the weights in its checkpoint and
    goes on without it (the trainer then says that retention could not be measured)."""
    parent_id = config_values.get("init_adapter")
    if not parent_id:
        return {}
    with resources.sessions() as session:
        parent = session.get(Job, uuid.UUID(str(parent_id)))
        usable = parent is not None and not parent.deleted and parent.job_status is JobStatus.SUCCEEDED
        artifacts = {a.name: a.key for a in parent.artifacts} if parent is not None and usable else {}
    gone = DataError(
        "init_adapter_gone",
        f"the job this one continues ({parent_id}) was deleted before this job started, and its adapter with it; "
        "submit this job again with another `init_adapter`, or without one",
    )
    if ADAPTER_FILES["diffusers"] not in artifacts:
        if resuming:
            return {}
        raise gone
    target = folder / str(parent_id)

    def get(name: str) -> None:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        get_file = functools.partial(resources.store.get_file, artifacts[name], target / name)
        with_retries(get_file, what=f"download of {artifacts[name]}")

    try:
        for name in (ADAPTER_FILES["diffusers"], "config.json", "metrics.json"):
            if name in artifacts:
                get(name)
        metrics = json.loads((target / "metrics.json").read_text()) if (target / "metrics.json").is_file() else {}
        for name in metrics.get("samples") or []:  # the final samples, which retention renders again
            if str(name).endswith("-adapter.png") and name in artifacts:
                get(str(name))
    except NotFound:  # deleted while this worker downloaded it
        if resuming:
            return {}
        raise gone from None
    return {"init_adapter": str(target)}


def _fail(
    sessions: sessionmaker[Session], job_id: uuid.UUID, code: str, message: str, worker_id: str, gpu_s: float = 0.0
) -> None:
    logger.warning("job %s failed: %s: %s", job_id, code, message)

    def write() -> None:
        with session_scope(sessions) as session:
            worker_side.fail_job(
                session=session, job_id=job_id, code=code, message=message, worker_id=worker_id, gpu_seconds=gpu_s
            )

    retry_db(write, what=f"job {job_id} failure")


def run_job(job_id: uuid.UUID, *, worker_id: str) -> None:
    """Runs one job to a terminal state; a job that is not claimable (a duplicate delivery) is left alone, and so
    is one whose lease this worker lost (its outcome is the new holder's to write)."""
    resources = process_resources()
    settings, sessions = resources.settings, resources.sessions
    worker_id = f"{worker_id}:{os.getpid()}"
    with sessions() as session:
        attempt = worker_side.claim_job(
            session=session,
            job_id=job_id,
            worker_id=worker_id,
            lease_s=settings.lease_s,
            max_running_per_key=settings.max_running_per_key,
        )
    if attempt is None:
        logger.info("job %s: not claimable (running elsewhere or finished); message dropped", job_id)
        return
    if attempt > settings.max_attempts:
        _fail(
            sessions,
            job_id,
            "too_many_attempts",
            f"the job was started {attempt - 1} times without finishing",
            worker_id,
        )
        return
    logger.info("job %s: claimed by %s (attempt %d)", job_id, worker_id, attempt)
    reporter = resources.reporter(job_id, worker_id)
    try:
        with tempfile.TemporaryDirectory(prefix=f"dopsd-job-{job_id}-") as tmp, reporter.heartbeat():
            _run_claimed(job_id, Path(tmp), resources, reporter)
    except LeaseLost:
        logger.warning("job %s: stopped after losing its lease; left to the worker that holds it now", job_id)
    except GroupDied as exc:  # as if this worker had died: the job goes back to the queue and resumes
        logger.warning("job %s: %s; handed back to the queue", job_id, exc)
        _give_up(sessions, job_id, worker_id)
    except TrainingCancelled as exc:
        _cancel(resources, job_id, exc.step, worker_id, reporter.gpu_seconds())
    except Exception as exc:
        code, message = classify_failure(exc, settings.max_job_s)
        if code == "internal":
            logger.exception("job %s: unexpected error", job_id)
        _fail(sessions, job_id, code, message, worker_id, reporter.gpu_seconds())
    finally:
        delete_if_deleted(resources, job_id)
        record_stored_bytes(resources.sessions, resources.store, job_id)  # what the key's storage quota counts


def _give_up(sessions: sessionmaker[Session], job_id: uuid.UUID, worker_id: str) -> None:
    def give_up() -> bool:
        with session_scope(sessions) as session:
            return worker_side.give_up_lease(session=session, job_id=job_id, worker_id=worker_id)

    retry_db(give_up, what=f"job {job_id} lease")


def delete_if_deleted(resources: WorkerResources, job_id: uuid.UUID) -> None:
    """Deletes every stored object of a job that was deleted while this worker ran it, however the attempt ended
    (stopped, failed, lease lost). This worker uploads nothing after it, and `DELETE` marks the job before its
    own last pass over the prefix, so between the two nothing this worker wrote can stay. A failure here is left
    to the maintenance sweep of deleted jobs."""
    try:
        with resources.sessions() as session:
            job = session.get(Job, job_id)
            deleted = job is not None and job.deleted
        if deleted:
            removed = resources.store.delete_prefix(job_prefix(job_id))
            logger.info("job %s: deleted while running; removed its %d stored object(s)", job_id, removed)
    except Exception:
        logger.warning("job %s: could not remove a deleted job's objects; the sweep will", job_id, exc_info=True)


def _cancel(resources: WorkerResources, job_id: uuid.UUID, step: int, worker_id: str, gpu_s: float) -> None:
    """Records a stop its owner asked for. A canceled job never resumes, so its checkpoints go, before the job
    reads as canceled: a client that sees `canceled` finds none left (the other order left a window, seen in CI,
    in which both were true). A storage error leaves them to retention; a deleted job's objects all go,
    in `delete_if_deleted`."""

    def cancel() -> bool:
        with session_scope(resources.sessions) as session:
            return worker_side.mark_canceled(
                session=session, job_id=job_id, step=step, worker_id=worker_id, gpu_seconds=gpu_s
            )

    try:
        resources.store.delete_prefix(checkpoint_prefix(job_id))
    except ServiceUnavailable:
        logger.warning("job %s: could not remove a canceled job's checkpoints; retention will", job_id, exc_info=True)
    retry_db(cancel, what=f"job {job_id} cancel")
    logger.info("job %s: canceled at step %d", job_id, step)


def classify_failure(exc: Exception, max_job_s: int) -> tuple[str, str]:
    """The stable error code and readable message of a failure: the one place failures are classified."""
    if isinstance(exc, GroupFailed):  # a rank of a multi-process job, classified there
        return exc.code, exc.message
    if isinstance(exc, TeacherBlind):
        return "teacher_blind", exc.message
    if isinstance(exc, DataError):
        return "bad_input", str(exc)
    if isinstance(exc, (ModelLoadError, CheckpointError)):
        return "model_unavailable", str(exc)
    if isinstance(exc, (ServiceUnavailable, NotFound)):
        return "storage_unavailable", exc.message
    if isinstance(exc, DatabaseUnavailable):
        return "database_unavailable", exc.message
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return "out_of_memory", "the GPU ran out of memory; lower the resolution or the batch size"
    if type(exc).__name__ == "SoftTimeLimitExceeded":
        return "timeout", f"the job exceeded its time limit of {max_job_s} s"
    return "internal", f"internal error ({type(exc).__name__})"


def _run_claimed(job_id: uuid.UUID, tmp: Path, resources: WorkerResources, reporter: JobReporter) -> None:
    sessions, store = resources.sessions, resources.store
    with sessions() as session:
        job = session.get_one(Job, job_id)
        config_values, images, kind = dict(job.config), list(job.images), job.kind
        session.expunge(job)
    inputs, out = tmp / "inputs", tmp / "out"
    _fetch_inputs(store, job, inputs)
    resume = _fetch_latest_checkpoint(store, job_id, out) if kind == "training" else None
    init = _fetch_init_adapter(resources, config_values, tmp / "init", resuming=resume is not None)
    config = DOPSDConfig.from_dict(
        {
            **config_values,
            **init,
            "instance_data_dir": str(inputs),
            "output_dir": str(out),
            "resume_from": str(resume) if resume else None,
            "eval_embedding_model": config_values.get("eval_embedding_model")
            or resources.settings.eval_embedding_model,
        }
    )
    config = with_local_weights(config, resources.settings.model_paths)  # the row keeps the ids, the worker folders
    in_group = kind == "training" and config.num_processes > 1
    if in_group:
        _check_gpus(config, resources.settings)
    else:
        family, load_s, cached = resources.models.get(config)
        reporter.renew_lease()  # loading real weights takes a while
        reporter.model_loaded(load_s, cached=cached, resumed_from_step=step_of(resume))
    started = time.perf_counter()
    if kind == "preview":
        from dopsd.preview import preview

        samples = preview(config, out / "preview", family=family)
        reporter.announce_samples(samples, "preview/")
        records = upload_tree(store, out, output_key(job_id, ""), skip=("preview",)) + reporter.uploaded_outputs
        metrics: dict[str, Any] = {"images": len(samples.images), "render_s": round(time.perf_counter() - started, 3)}
    else:
        if in_group:  # the ranks load the model themselves, rank 0 reports as this process would
            from worker.group import train_in_group

            result: TrainingResult | GroupResult = train_in_group(
                config, job_id=job_id, reporter=reporter, settings=resources.settings, folder=tmp
            )
        else:
            from dopsd.trainer import train

            result = train(config, [reporter], family=family)
        reporter.renew_lease()
        for warning in result.warnings:  # a stage after training failed: the job succeeds, and says what is missing
            reporter.warn(warning.stage, warning.message)
        # Samples went up as they were rendered; checkpoints live under their own prefix.
        records = upload_tree(store, out, output_key(job_id, ""), skip=("checkpoints", "samples"))
        records += reporter.uploaded_outputs
        gap = result.metrics["teacher_student_gap"]
        metrics = {
            "steps": result.metrics["steps"],
            "final_loss": result.metrics["final_loss"],
            "gap_before": gap["before"],
            "gap_after": gap["after"],
            "train_s": round(time.perf_counter() - started, 3),
            "images": len(images),
        }
    artifacts = [{**r, "kind": _artifact_kind(r["name"])} for r in records]
    report = _report_of(out, kind)
    steps = metrics.get("steps", 0)

    def finish() -> bool:
        with session_scope(sessions) as session:
            return worker_side.finish_job(
                session=session,
                job_id=job_id,
                worker_id=reporter.worker_id,
                artifacts=artifacts,
                metrics=metrics,
                gpu_seconds=reporter.gpu_seconds(),
                report=report,
            )

    if not retry_db(finish, what=f"job {job_id} finish"):
        # Not ours any more (lease lost), or a cancel/delete came in while finishing.
        with sessions() as session:
            job_now = session.get_one(Job, job_id)
            if job_now.worker_id != reporter.worker_id or job_now.job_status is not JobStatus.RUNNING:
                raise LeaseLost(job_id)
        raise TrainingCancelled(steps)
    logger.info("job %s: succeeded", job_id)


def _check_gpus(config: DOPSDConfig, settings: Settings) -> None:
    """Refuses a job asking for more processes than this worker owns GPUs (`DOPSD_WORKER_GPUS`): a deployment
    routes jobs by their queue (`train.<family>.gpus<N>`), so this is a worker started on the wrong queue."""
    if config.num_processes > settings.worker_gpus:
        raise GroupFailed(
            "num_processes_unavailable",
            f"the job asks for {config.num_processes} processes, and the worker that took it owns "
            f"{settings.worker_gpus} GPU(s) (DOPSD_WORKER_GPUS); it waits on the wrong queue",
        )


def _report_of(out: Path, kind: str) -> dict[str, Any] | None:
    """What the job's `report` holds: a training run's evaluation report, or a preview's teacher check."""
    if kind == "training":
        path = out / "report.json"
        return json.loads(path.read_text()) if path.is_file() else None
    path = out / "preview" / "teacher_check.json"
    return {"teacher_check": json.loads(path.read_text())} if path.is_file() else None


def step_of(checkpoint: Path | None) -> int | None:
    """The step a checkpoint folder (`step-00000040`) was written at; None for no checkpoint."""
    return int(checkpoint.name.split("-")[-1]) if checkpoint else None
