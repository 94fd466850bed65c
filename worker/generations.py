"""`run_generation()`: claim a generation (and the queued ones that can share its pipeline calls) -> fetch its
adapters -> render with the cached base model -> upload the images -> finish each, with failures recorded per
generation as a stable code and a readable message.

The database stays the source of truth: generations claimed together here are ordinary claims, so their own
messages, when they arrive, find them taken (or finished) and are dropped like any duplicate delivery.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core import events
from core.db import session_scope
from core.jobs import worker_side
from core.jobs.models import GENERATION, Job
from core.jobs.states import JobStatus
from core.storage import generation_image_name, output_key
from dopsd.config import DOPSDConfig
from dopsd.errors import GenerationCancelled, TrainingCancelled
from dopsd.generation import AdapterSpec, GeneratedImage, GenerationRequest, GenerationSettings, Generator
from dopsd.models.base import ModelFamily
from dopsd.sampling import contact_sheet
from worker.dbretry import retry_db
from worker.model_paths import with_local_weights
from worker.runner import WorkerResources, classify_failure, delete_if_deleted, process_resources
from worker.uploads import record_stored_bytes, with_retries


logger = logging.getLogger(__name__)

# One generator (its adapter cache) per loaded base model, dropped with the model when the model cache evicts it.
_generators: weakref.WeakKeyDictionary[ModelFamily, Generator] = weakref.WeakKeyDictionary()


@dataclass
class Claimed:
    """A generation this worker holds: its id, owner, resolved request and, once fetched, its adapters."""

    job_id: uuid.UUID
    config: dict[str, Any]
    adapters: tuple[AdapterSpec, ...] = ()
    lost: bool = False  # the lease went to another worker: not ours to finish
    images: list[GeneratedImage] = field(default_factory=list)

    @property
    def image_count(self) -> int:
        """How many images the generation asks for."""
        return len(self.config["prompts"]) * len(self.config["seeds"])


def run_generation(job_id: uuid.UUID, *, worker_id: str) -> None:
    """Runs generation `job_id` (and queued ones that share its batch) to a terminal state; a generation that is
    not claimable (a duplicate delivery, or one claimed with another's batch) is left alone."""
    resources = process_resources()
    worker_id = f"{worker_id}:{os.getpid()}"
    lead = _claim(resources, job_id, worker_id)
    if lead is None:
        logger.info("generation %s: not claimable (running elsewhere or finished); message dropped", job_id)
        return
    batch = [lead, *_claim_batch_mates(resources, lead, worker_id)]
    logger.info("generation %s: claimed by %s with %d more", job_id, worker_id, len(batch) - 1)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="dopsd-generation-") as tmp, _leases_kept(resources, batch, worker_id):
            _run_claimed(resources, batch, worker_id, Path(tmp), started)
    finally:
        for claimed in batch:
            delete_if_deleted(resources, claimed.job_id)
            record_stored_bytes(resources.sessions, resources.store, claimed.job_id)
    logger.info("generation %s: done in %.2f s (batch of %d)", job_id, time.perf_counter() - started, len(batch))


def _claim(resources: WorkerResources, job_id: uuid.UUID, worker_id: str) -> Claimed | None:
    settings = resources.settings
    with resources.sessions() as session:
        attempt = worker_side.claim_job(
            session=session, job_id=job_id, worker_id=worker_id, lease_s=settings.lease_s,
            max_running_per_key=settings.max_running_generations_per_key, generations=True,
        )  # fmt: skip
        if attempt is None:
            return None
        job = session.get_one(Job, job_id)
        claimed = Claimed(job_id=job_id, config=dict(job.config))
    if attempt > settings.max_attempts:
        _fail(resources, claimed, worker_id, "too_many_attempts", f"started {attempt - 1} times without finishing")
        return None
    return claimed


def _claim_batch_mates(resources: WorkerResources, lead: Claimed, worker_id: str) -> list[Claimed]:
    """Queued generations that can share the lead's pipeline calls (same batch key: preset, size, steps, guidance,
    adapters and scales), oldest first, while their images fit in one batch of `generation_max_batch`."""
    room = resources.settings.generation_max_batch - lead.image_count
    if room <= 0:
        return []
    with resources.sessions() as session:
        queue = session.scalar(select(Job.queue).where(Job.id == lead.job_id))
        candidates = session.execute(
            select(Job.id, Job.config)
            .where(
                Job.queue == queue,
                Job.kind == GENERATION,
                Job.status == JobStatus.QUEUED,
                Job.deleted.is_(False),
                Job.cancel_requested.is_(False),
            )
            .order_by(Job.created_at, Job.id)
            .limit(64)
        ).all()
    mates: list[Claimed] = []
    for candidate_id, config in candidates:
        images = len(config["prompts"]) * len(config["seeds"])
        if config.get("batch_key") != lead.config["batch_key"] or images > room:
            continue
        claimed = _claim(resources, candidate_id, worker_id)
        if claimed is not None:
            mates.append(claimed)
            room -= images
        if room <= 0:
            break
    return mates


@contextlib.contextmanager
def _leases_kept(resources: WorkerResources, batch: list[Claimed], worker_id: str) -> Iterator[None]:
    """Renews the lease of every generation of the batch every third of its length while the block runs; a lease
    that went to another worker marks its generation lost (this worker will not finish it)."""
    lease_s, stop = resources.settings.lease_s, threading.Event()

    def beat() -> None:
        while not stop.wait(lease_s / 3):
            for claimed in batch:
                if claimed.lost:
                    continue
                try:
                    with session_scope(resources.sessions) as session:
                        held = worker_side.renew_lease(
                            session=session, job_id=claimed.job_id, worker_id=worker_id, lease_s=lease_s
                        )
                    claimed.lost = not held
                except Exception:  # retried at the next beat; the lease covers two misses
                    logger.warning("generation %s: heartbeat failed", claimed.job_id, exc_info=True)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), name="heartbeat-generations")
    thread.daemon = True
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _run_claimed(resources: WorkerResources, batch: list[Claimed], worker_id: str, tmp: Path, started: float) -> None:
    preset = batch[0].config["preset"]
    try:
        config = with_local_weights(DOPSDConfig.for_preset(preset), resources.settings.model_paths)
        family, load_s, cached = resources.models.get(config)
    except Exception as exc:
        for claimed in batch:
            _fail_classified(resources, claimed, worker_id, exc)
        return
    for claimed in batch:
        _event(resources, claimed, events.ModelLoadedPayload(load_s=round(load_s, 3), cached=cached,
                                                             resumed_from_step=None))  # fmt: skip
    ready: list[Claimed] = []
    for claimed in batch:
        try:
            claimed.adapters = _fetch_adapters(resources, claimed, tmp)
            ready.append(claimed)
        except Exception as exc:
            _fail_classified(resources, claimed, worker_id, exc)
    if not ready:
        return
    generator = _generator_for(family, resources, int(batch[0].config["max_sequence_length"]))
    hits_before = generator.cache_stats()["hits"]
    render_started = time.perf_counter()
    try:
        results = generator.generate(
            [_request(c) for c in ready], should_stop=lambda: all(_cancel_requested(resources, c) for c in ready)
        )
    except (GenerationCancelled, TrainingCancelled):
        for claimed in ready:
            _cancel(resources, claimed, worker_id, time.perf_counter() - started)
        return
    except Exception as exc:
        for claimed in ready:
            _fail_classified(resources, claimed, worker_id, exc)
        return
    render_s = time.perf_counter() - render_started
    cached_adapters = generator.cache_stats()["hits"] - hits_before
    batch_images = sum(c.image_count for c in ready)
    for claimed, images in zip(ready, results, strict=True):
        claimed.images = images
        share = (time.perf_counter() - started) * claimed.image_count / batch_images
        try:
            _finish(resources, claimed, worker_id, tmp, render_s, batch_images, cached_adapters, share)
        except Exception as exc:
            _fail_classified(resources, claimed, worker_id, exc, share)


def _generator_for(family: ModelFamily, resources: WorkerResources, max_sequence_length: int) -> Generator:
    """The generator (with its adapter cache) of a loaded base model; requests that pad prompts to another length
    get a generator of their own."""
    generator = _generators.get(family)
    if generator is not None and generator.max_sequence_length != max_sequence_length:
        generator = None
    if generator is None:
        settings = resources.settings
        generator = Generator(
            family, adapter_cache_size=settings.generation_adapter_cache, max_batch=settings.generation_max_batch,
            max_sequence_length=max_sequence_length, adapter_cache_bytes=settings.generation_adapter_cache_bytes or None,
        )  # fmt: skip
        _generators[family] = generator
    return generator


def _adapter_folder() -> Path:
    """This process's folder of downloaded adapter files (one per training job, immutable once it succeeded)."""
    folder = Path(tempfile.gettempdir()) / f"dopsd-adapters-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    return folder


def _fetch_adapters(resources: WorkerResources, claimed: Claimed, tmp: Path) -> tuple[AdapterSpec, ...]:
    """The generation's adapters as local files: downloaded once per process and kept (the generator's cache
    then spares reading them again); an adapter whose job was deleted since is a `bad_input` failure."""
    adapters = claimed.config["adapters"]
    if not adapters:
        return ()
    ids = [uuid.UUID(a["job_id"]) for a in adapters]
    with resources.sessions() as session:
        alive = set(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.deleted.is_(False))))
    folder = _adapter_folder()
    specs = []
    for adapter, adapter_id in zip(adapters, ids, strict=True):
        if adapter_id not in alive:
            raise AdapterGone(f"the adapter of job {adapter_id} was deleted after this generation was submitted")
        path = folder / f"{adapter_id}.safetensors"
        if path.is_file():
            path.touch()  # recently used: kept longest
        else:
            part = tmp / f"{adapter_id}.part"
            with_retries(functools.partial(resources.store.get_file, adapter["key"], part), what="adapter download")
            part.replace(path)
        specs.append(AdapterSpec(name=str(adapter_id), path=path, scale=float(adapter["scale"])))
    _prune(folder, keep=max(2 * resources.settings.generation_adapter_cache, len(specs), 4))
    return tuple(specs)


def _prune(folder: Path, *, keep: int) -> None:
    """Deletes all but the `keep` most recently used adapter files (they are fetched again when needed)."""
    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
    for stale in files[keep:]:
        stale.unlink(missing_ok=True)


class AdapterGone(Exception):
    """An adapter a generation names was deleted before the generation ran."""


def _request(claimed: Claimed) -> GenerationRequest:
    c = claimed.config
    return GenerationRequest(
        prompts=tuple(c["prompts"]),
        seeds=tuple(int(s) for s in c["seeds"]),
        adapters=claimed.adapters,
        settings=GenerationSettings(
            width=int(c["width"]),
            height=int(c["height"]),
            num_steps=int(c["steps"]),
            guidance_scale=float(c["guidance_scale"]),
        ),
    )


def _finish(
    resources: WorkerResources,
    claimed: Claimed,
    worker_id: str,
    tmp: Path,
    render_s: float,
    batch_images: int,
    cached_adapters: int,
    gpu_s: float,
) -> None:
    """Uploads the images and a contact sheet, announces them (`sample`), and marks the generation succeeded; a
    generation canceled meanwhile is marked canceled instead, one lost to another worker is left alone."""
    store, job_id = resources.store, claimed.job_id
    folder = tmp / str(job_id)
    folder.mkdir()
    artifacts, shown = [], []
    for index, generated in enumerate(claimed.images):
        name = generation_image_name(index, generated.seed)
        path = folder / name.replace("/", "_")
        generated.image.save(path)
        key = output_key(job_id, name)
        size = with_retries(functools.partial(store.put_file, key, path, "image/png"), what=f"upload of {key}")
        artifacts.append({"name": name, "key": key, "size": size, "content_type": "image/png", "kind": "image"})
        shown.append(
            events.SampleImage(
                name=name, kind="generation", prompt=generated.prompt, seed=generated.seed, source=None, key=key
            )
        )
    seeds = len(claimed.config["seeds"])
    rows = [
        (generated.prompt, [g.image for g in claimed.images[i : i + seeds]])
        for i, generated in list(enumerate(claimed.images))[::seeds]
    ]
    sheet_path, sheet_key = folder / "contact_sheet.png", output_key(job_id, "images/contact_sheet.png")
    contact_sheet(rows, title=f"{claimed.config['preset']} - {len(claimed.images)} image(s)").save(sheet_path)
    sheet_size = with_retries(
        functools.partial(store.put_file, sheet_key, sheet_path, "image/png"), what="contact sheet upload"
    )
    artifacts.append({"name": "images/contact_sheet.png", "key": sheet_key, "size": sheet_size,
                      "content_type": "image/png", "kind": "contact_sheet"})  # fmt: skip
    _event(resources, claimed, events.SamplePayload(step=0, final=True, images=shown, contact_sheet_key=sheet_key))
    metrics = {
        "images": len(claimed.images), "render_s": round(render_s, 3), "batch_images": batch_images,
        "adapters_cached": cached_adapters,
    }  # fmt: skip

    def finish() -> bool:
        with session_scope(resources.sessions) as session:
            return worker_side.finish_job(
                session=session, job_id=job_id, worker_id=worker_id, artifacts=artifacts, metrics=metrics,
                gpu_seconds=gpu_s,
            )  # fmt: skip

    if retry_db(finish, what=f"generation {job_id} finish"):
        logger.info("generation %s: succeeded (%d images)", job_id, len(claimed.images))
        return
    with resources.sessions() as session:
        job = session.get_one(Job, job_id)
        ours = job.worker_id == worker_id and job.job_status is JobStatus.RUNNING
    if ours:  # a cancel or delete came in while rendering
        _cancel(resources, claimed, worker_id, gpu_s)


def _cancel_requested(resources: WorkerResources, claimed: Claimed) -> bool:
    with resources.sessions() as session:
        return claimed.lost or worker_side.cancel_requested(session=session, job_id=claimed.job_id)


def _cancel(resources: WorkerResources, claimed: Claimed, worker_id: str, gpu_s: float) -> None:
    def cancel() -> bool:
        with session_scope(resources.sessions) as session:
            return worker_side.mark_canceled(
                session=session, job_id=claimed.job_id, step=0, worker_id=worker_id, gpu_seconds=gpu_s
            )

    retry_db(cancel, what=f"generation {claimed.job_id} cancel")
    logger.info("generation %s: canceled", claimed.job_id)


def _event(resources: WorkerResources, claimed: Claimed, payload: events.EventPayload) -> None:
    def write() -> None:
        with session_scope(resources.sessions) as session:
            events.add_event(session=session, job_id=claimed.job_id, payload=payload)

    retry_db(write, what=f"generation {claimed.job_id} event")


def _fail_classified(
    resources: WorkerResources, claimed: Claimed, worker_id: str, exc: Exception, gpu_s: float = 0.0
) -> None:
    if isinstance(exc, AdapterGone):
        code, message = "bad_input", str(exc)
    else:
        code, message = classify_failure(exc, resources.settings.max_job_s)
        if code == "internal":
            logger.error("generation %s: unexpected error", claimed.job_id, exc_info=exc)
    _fail(resources, claimed, worker_id, code, message, gpu_s)


def _fail(
    resources: WorkerResources, claimed: Claimed, worker_id: str, code: str, message: str, gpu_s: float = 0.0
) -> None:
    logger.warning("generation %s failed: %s: %s", claimed.job_id, code, message)

    def write() -> None:
        with session_scope(resources.sessions) as session:
            worker_side.fail_job(
                session=session, job_id=claimed.job_id, code=code, message=message, worker_id=worker_id,
                gpu_seconds=gpu_s,
            )  # fmt: skip

    retry_db(write, what=f"generation {claimed.job_id} failure")
