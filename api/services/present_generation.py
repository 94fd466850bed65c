"""What a client sees of a generation: its resolved request, where it stands and its images with short-lived URLs
(signed as they are read). The generation counterpart of `api.services.present`."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.generation_schemas import AdapterRef, GeneratedImagePublic, GenerationPublic
from api.schemas import JobError
from core.jobs import client_side
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.storage import ArtifactStore, generation_image_name


def generation_public(job: Job, session: Session, store: ArtifactStore, ttl_s: int) -> GenerationPublic:
    """The generation resource its owner sees; once succeeded, its images in request order."""
    config = job.config
    prompts, seeds = list(config["prompts"]), list(config["seeds"])
    base = f"/v1/generations/{job.id}"
    links = {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}
    if job.webhook_url:
        links["webhook_deliveries"] = f"{base}/webhook-deliveries"
    images: list[GeneratedImagePublic] = []
    if job.job_status == JobStatus.SUCCEEDED:
        by_name = {a.name: a for a in job.artifacts}
        for index in range(len(prompts) * len(seeds)):
            seed = seeds[index % len(seeds)]
            artifact = by_name.get(generation_image_name(index, seed))
            if artifact is None:
                continue
            images.append(
                GeneratedImagePublic(
                    url=store.download_url(artifact.key, filename=artifact.name.rsplit("/", 1)[-1], ttl_s=ttl_s),
                    prompt=prompts[index // len(seeds)],
                    seed=seed,
                    width=config["width"],
                    height=config["height"],
                    expires_in_s=ttl_s,
                )
            )
    return GenerationPublic(
        id=job.id,
        status=job.status,
        preset=job.preset,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_position=client_side.queue_position(session=session, job=job),
        prompts=prompts,
        seeds=seeds,
        width=config["width"],
        height=config["height"],
        steps=config["steps"],
        guidance_scale=config["guidance_scale"],
        max_sequence_length=config["max_sequence_length"],
        adapters=[AdapterRef(job_id=a["job_id"], scale=a["scale"]) for a in config["adapters"]],
        attempt=job.attempt,
        gpu_seconds=None if job.gpu_seconds is None else round(job.gpu_seconds, 3),
        cancel_requested=job.cancel_requested,
        images=images,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code is not None else None,
        links=links,
    )
