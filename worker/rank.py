"""One rank of a multi-process training job, as torchrun starts it: `python -m worker.rank JOB_FILE` (see
`worker.group`). Every rank trains its share of each step; rank 0 alone reports through the job's usual path (the
same `JobReporter` a single-process job uses, under the attempt's worker id) and writes the outcome file the
worker reads. A rank exits 0 whenever the outcome is known (written by it or by rank 0), so torchrun restarts the
group only after a real death: a kill, a crash, the OOM killer."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from core.config import get_settings
from core.logs import configure_logging, job_context
from dopsd.checkpoint import find_checkpoint
from dopsd.config import DOPSDConfig
from dopsd.distributed import (
    die_with_parent,
    local_rank_from_env,
    rank_from_env,
    relayed_from_main,
    resume_after_restart,
)
from dopsd.errors import CheckpointError, TrainingCancelled
from worker.group import RANK_MODULE, RankJob, write_outcome
from worker.reporting import JobReporter, LeaseLost


logger = logging.getLogger(__name__)

PEER_DEATH_WAIT_S = 3.0  # torchrun polls its ranks every 0.1 s (`--monitor-interval`)


def main(argv: list[str]) -> int:
    """Runs this rank of the job in the job file `argv[0]`; its exit code is 0 once the outcome is written."""
    die_with_parent()  # before anything slow: a launcher killed while this rank loads takes it along
    if not _launched_by_torchrun():  # the launcher died while this rank imported, before the line above
        return 1
    settings = get_settings()
    configure_logging(settings.log_format)
    job = RankJob.load(Path(argv[0]))
    rank = rank_from_env()
    with job_context(job.job_id):
        outcome = _run(job, rank, settings)
        if outcome is not None:
            write_outcome(job.outcome_path, {**outcome, "rank": rank, "job_id": str(job.job_id)})
    return 0


def _run(job: RankJob, rank: int, settings: Any) -> dict[str, Any] | None:
    """This rank's part of the run, and the outcome it has to write (None: rank 0 writes it)."""
    import torch

    from dopsd.models.loading import load_family_for
    from dopsd.trainer import resolve_device, train
    from worker.runner import WorkerResources, classify_failure

    if settings.worker_torch_threads is not None:
        torch.set_num_threads(settings.worker_torch_threads)
    config = resume_after_restart(job.config)
    reporter: JobReporter | None = None
    if rank == 0:
        reporter = WorkerResources.from_settings(settings).reporter(job.job_id, job.worker_id)
    try:
        device, dtype = resolve_device(config)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank_from_env())
        started = time.perf_counter()
        family = load_family_for(config, device=device, dtype=dtype)
        if reporter is not None:
            reporter.model_loaded(time.perf_counter() - started, cached=False, resumed_from_step=_resumed_step(config))
        result = train(config, [reporter] if reporter is not None else [], family=family)
    except TrainingCancelled as exc:
        return {"status": "canceled", "step": exc.step} if rank == 0 else None
    except LeaseLost:
        return {"status": "lease_lost"} if rank == 0 else None
    except Exception as exc:
        if rank != 0 and relayed_from_main(exc):
            return None
        if _a_peer_died(job.outcome_path):  # the dead rank's echo (a collective that lost its partner): no outcome
            logger.warning("job %s: rank %d stopped: another rank of the group died", job.job_id, rank)
            raise SystemExit(1) from exc
        code, message = classify_failure(exc, settings.max_job_s)
        if code == "internal":
            logger.exception("job %s: rank %d failed", job.job_id, rank)
        return {"status": "failed", "code": code, "message": message}
    if reporter is None:
        return None
    return {
        "status": "succeeded",
        "metrics": result.metrics,
        "warnings": [{"stage": w.stage, "message": w.message} for w in result.warnings],
        "uploaded": reporter.uploaded_outputs,
    }


def _a_peer_died(outcome_path: Path, within_s: float = PEER_DEATH_WAIT_S) -> bool:
    """Whether another rank of this group on this machine has died (gone, or a zombie its launcher has not reaped
    yet) without an outcome, waiting up to `within_s` for it to show: a rank's death reaches the others first as an
    error of their next collective, and torchrun, which stops them, sees it within its monitor interval. A rank that
    left after writing the outcome (every rank hit the same error, and it was first) did not die."""
    expected = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    deadline = time.monotonic() + within_s
    while True:
        if outcome_path.exists():
            return False
        try:
            siblings = psutil.Process(os.getppid()).children()
        except psutil.NoSuchProcess:  # the launcher itself is gone
            return True
        alive = [p for p in siblings if _a_live_rank(p)]
        if len(alive) < expected:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _launched_by_torchrun() -> bool:
    """Whether this rank's parent is still the torchrun that started it (an orphan's parent is init, or a
    subreaper)."""
    try:
        return "torch.distributed.run" in psutil.Process(os.getppid()).cmdline()
    except psutil.NoSuchProcess:
        return False


def _a_live_rank(process: psutil.Process) -> bool:
    """Whether a child of the launcher is a rank (not a helper process of its own) and still alive."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE and RANK_MODULE in process.cmdline()
    except psutil.NoSuchProcess:
        return False


def _resumed_step(config: DOPSDConfig) -> int | None:
    """The step the run resumes from (None: a fresh start; a bad checkpoint fails the run in the trainer)."""
    from worker.runner import step_of

    try:
        return step_of(find_checkpoint(config.resume_from)) if config.resume_from else None
    except CheckpointError:
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
