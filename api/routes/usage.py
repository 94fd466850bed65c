"""`GET /v1/usage`: what the calling key uses (jobs, GPU-seconds, stored bytes against its quota) and its limits."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.routes.shared import ERRORS
from api.services.usage import UsagePublic, usage_public


router = APIRouter(prefix="/v1/usage", tags=["usage"], responses=ERRORS)


@router.get("", response_model=UsagePublic, operation_id="usage-read")
def read_usage(principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> UsagePublic:
    """The calling key's jobs and previews by status, GPU-seconds, stored bytes and quota, and its limits.

    **What "stored" counts**: every byte under the key's jobs' storage prefixes. A job's input images count from
    the moment it is submitted; what its worker uploads (checkpoints, samples, adapters, `config.json`,
    `metrics.json`, `report.json`) counts once each attempt ends, as the bytes the worker then lists under the job's
    prefix (during a run, the figure lags by the current attempt's uploads). A deleted job stops counting once it is
    in a final state: `DELETE` removes a finished job's objects before it answers, and the worker of a running job
    removes what it stored when it stops; retention removes a job's objects before it marks the job deleted.

    **The quota** (`quota_bytes`, the `DOPSD_MAX_STORED_BYTES_PER_KEY` setting) is checked at each submission (job,
    preview and dry run) against `stored_bytes` plus the upload's images: a submission that would pass it answers
    403 `storage_quota_exceeded`. What a job stores later (its outputs) is not refused; it counts toward the next
    submission. `gpu_seconds` sums the wall time every job held a worker, deleted jobs included."""
    return usage_public(session=session, owner_id=principal.id, settings=settings)
