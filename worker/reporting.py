"""The trainer callback of a job: progress and events into the database (throttled), cancellation polled every
step, checkpoints and samples announced (checkpoints copied to object storage)."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core import events
from core.db import session_scope
from core.jobs import worker_side
from core.storage import ArtifactStore, checkpoint_prefix, output_key
from dopsd.callbacks import StepState, TrainerCallback, TrainerControl
from dopsd.evaluation.report import Report
from dopsd.sampling import SampleSet
from worker.dbretry import retry_db
from worker.uploads import upload_tree


logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """This worker's lease on the job ran out and the job was handed on (requeued, or taken by another worker).
    Whoever holds it now writes its outcome; the stopped worker leaves the job as it is."""

    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id}: lease lost")
        self.job_id = job_id


class JobReporter(TrainerCallback):
    """Connects one training run to its job row."""

    def __init__(
        self,
        job_id: uuid.UUID,
        *,
        worker_id: str,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        interval_s: float,
        lease_s: int,
        devices: int = 1,
    ) -> None:
        self.job_id = job_id
        self.devices = devices
        self.worker_id = worker_id
        self.sessions = sessions
        self.store = store
        self.interval_s = interval_s
        self.lease_s = lease_s
        self._last_write = 0.0
        # Set once a stop was asked for: the checkpoint the trainer writes on stopping stays on this machine (a
        # canceled job never resumes, and a deleted one must leave nothing behind).
        self.stopping = False
        self._claimed_at = time.monotonic()
        self.lease_lost = threading.Event()  # set once a renewal found the job handed on
        # Output files already in storage (samples, as they were made), named relative to the output folder.
        self.uploaded_outputs: list[dict[str, object]] = []

    def gpu_seconds(self) -> float:
        """GPU-seconds this attempt has held since the claim: its wall time on each of the worker's GPUs it uses."""
        return (time.monotonic() - self._claimed_at) * self.devices

    def renew_lease(self) -> None:
        """Heartbeat: keeps the job this worker's; raises `LeaseLost` once it is not (raised from a trainer callback,
        it stops training at once, with no checkpoint written over the new holder's)."""

        def renew() -> bool:
            with session_scope(self.sessions) as session:
                return worker_side.renew_lease(
                    session=session, job_id=self.job_id, worker_id=self.worker_id, lease_s=self.lease_s
                )

        if not retry_db(renew, what=f"job {self.job_id} heartbeat"):
            self.lease_lost.set()
            logger.warning("job %s: lease lost; stopping without touching the job", self.job_id)
            raise LeaseLost(self.job_id)

    def _event(self, payload: events.EventPayload) -> None:
        def write() -> None:
            with session_scope(self.sessions) as session:
                events.add_event(session=session, job_id=self.job_id, payload=payload)

        retry_db(write, what=f"job {self.job_id} {payload.event_type} event")

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renews the lease every third of its length while the block runs (loading, caching features, sampling,
        uploading with retries all take time between training steps)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    self.renew_lease()
                except LeaseLost:  # the job thread stops at its own next renewal
                    return
                except Exception:  # a failed beat is retried at the next one; the lease covers two misses
                    logger.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

        context = contextvars.copy_context()  # the beat's log lines carry the job id too
        thread = threading.Thread(target=context.run, args=(beat,), name=f"heartbeat-{self.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def model_loaded(self, load_s: float, *, cached: bool, resumed_from_step: int | None) -> None:
        """Writes the `model_loaded` event: the weights are in memory (how long that took, whether they were
        cached) and the step the run resumes from."""
        self._event(
            events.ModelLoadedPayload(load_s=round(load_s, 3), cached=cached, resumed_from_step=resumed_from_step)
        )

    def warn(self, stage: str, message: str) -> None:
        """Writes a `warning` event: a stage after training failed and the job goes on without what it makes."""
        self._event(events.WarningPayload(stage=stage, message=message))

    def on_train_begin(self, total_steps: int, start_step: int) -> None:
        self._event(events.TrainingPayload(total_steps=total_steps, start_step=start_step))

    def on_step_end(self, state: StepState) -> TrainerControl:
        now = time.monotonic()
        write = now - self._last_write >= self.interval_s or state.step == state.total_steps
        if write:
            self.renew_lease()

        def report() -> bool:
            with session_scope(self.sessions) as session:
                if write:
                    return worker_side.record_progress(
                        session=session,
                        job_id=self.job_id,
                        step=state.step,
                        total_steps=state.total_steps,
                        loss=state.loss,
                        eta_s=state.eta_s,
                        learning_rate=state.learning_rate,
                        elapsed_s=state.elapsed_s,
                    )
                # Between progress writes, still look for a cancel every step (one indexed read).
                return worker_side.cancel_requested(session=session, job_id=self.job_id)

        stop = retry_db(report, what=f"job {self.job_id} progress")
        if write:
            self._last_write = now
        self.stopping = self.stopping or stop
        return TrainerControl(should_stop=stop)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if self.stopping:
            return
        self.renew_lease()  # checkpoints go up only while the job is still this worker's
        prefix = f"{checkpoint_prefix(self.job_id)}{path.name}/"
        upload_tree(self.store, path, prefix)
        self._event(events.CheckpointPayload(step=step))

    def on_evaluation(self, report: Report) -> None:
        """Announces an evaluation's verdicts as an `evaluated` event (a quick check, or the final report)."""
        verdicts = events.Verdicts.model_validate(report.to_dict()["verdicts"])
        self._event(events.EvaluatedPayload(step=report.step, quick=report.quick, verdicts=verdicts))

    def on_samples(self, samples: SampleSet) -> None:
        """Uploads a step's samples and announces them as a `sample` event (keys; the API signs URLs on read)."""
        self.announce_samples(samples, f"samples/{samples.folder.name}/")
        self.renew_lease()

    def announce_samples(self, samples: SampleSet, relative_prefix: str) -> None:
        """Uploads `samples.folder` under the job's outputs at `relative_prefix`, then writes its `sample` event."""
        prefix = output_key(self.job_id, relative_prefix)
        records = upload_tree(self.store, samples.folder, prefix)
        self.uploaded_outputs += [{**r, "name": relative_prefix + r["name"]} for r in records]
        keys = {r["name"]: r["key"] for r in records}
        images = [
            events.SampleImage(
                name=relative_prefix + image.path.name,
                kind=image.kind,
                prompt=image.prompt,
                seed=image.seed,
                source=image.source,
                key=keys[image.path.name],
            )
            for image in samples.images
        ]
        self._event(
            events.SamplePayload(
                step=samples.step,
                final=samples.final,
                images=images,
                contact_sheet_key=keys[samples.contact_sheet.name],
            )
        )
