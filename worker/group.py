"""A training job on several processes (`num_processes` > 1): this worker process starts the job's ranks as one
torchrun group and watches it; rank 0 (`worker.rank`) reports progress, events, checkpoints and samples through
the job's usual path, and writes how the run ended to a file this process reads.

What ends the group, and how fast:
- the owner's cancel: rank 0's reporter sees it at the next step and every rank stops there together;
- a lost lease (this worker's renewals, or rank 0's, found the job handed on): this process stops the group at once;
- a rank that died (killed, out of host memory, a crash): torchrun stops the others and starts the group again
  (`DOPSD_WORKER_GROUP_RESTARTS`), which resumes from its newest checkpoint; past the restarts the job goes back
  to the queue as a job whose worker died does;
- this process's own death: torchrun dies with it (PR_SET_PDEATHSIG), and every rank with torchrun.
Stopping means SIGTERM to torchrun, which passes it on to the ranks, then SIGKILL to all of them after a grace:
no process of a group outlives its job's attempt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from core.config import Settings
from dopsd.config import DOPSDConfig
from dopsd.distributed import die_with_parent, launcher_env, torchrun_command
from dopsd.errors import TrainingCancelled
from dopsd.trainer import RunWarning
from worker.reporting import JobReporter, LeaseLost


logger = logging.getLogger(__name__)

RANK_MODULE = "worker.rank"
STOP_GRACE_S = 20.0  # SIGTERM to SIGKILL, for a group this process stops
SETTLE_S = 30.0  # how long the other ranks may take to leave once rank 0 has written the outcome


class GroupFailed(Exception):
    """A multi-process job failed the way a single-process one fails, classified on the rank that saw it (`code`
    is the job's stable error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class GroupDied(Exception):
    """The job's ranks died past the group's restarts and wrote no outcome: the job goes back to the queue and
    resumes from its newest stored checkpoint, as a job whose worker died does."""


@dataclass(frozen=True)
class GroupResult:
    """What a finished group hands back: rank 0's `TrainingResult` metrics and warnings, and the outputs its
    reporter stored as they were made (samples)."""

    metrics: dict[str, Any]
    warnings: tuple[RunWarning, ...]
    uploaded: list[dict[str, Any]]


@dataclass(frozen=True)
class RankJob:
    """What every rank of a job reads from the job file: the job, the attempt's worker id (rank 0 reports and
    renews the lease under it), the resolved config and where the outcome goes."""

    job_id: uuid.UUID
    worker_id: str
    config: DOPSDConfig
    outcome_path: Path

    def save(self, path: Path) -> None:
        """Writes the job file the ranks are started with."""
        data = {
            "job_id": str(self.job_id),
            "worker_id": self.worker_id,
            "config": self.config.to_dict(),
            "outcome": str(self.outcome_path),
        }
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> RankJob:
        """The job file `save` wrote."""
        data = json.loads(path.read_text())
        return cls(
            job_id=uuid.UUID(data["job_id"]),
            worker_id=str(data["worker_id"]),
            config=DOPSDConfig.from_dict(data["config"]),
            outcome_path=Path(data["outcome"]),
        )


def write_outcome(path: Path, outcome: dict[str, Any]) -> bool:
    """Writes a rank's outcome unless another rank's is there already (the first to decide speaks for the group);
    atomic, so the watcher never reads half of one. Returns whether this one was written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(outcome))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def train_in_group(
    config: DOPSDConfig, *, job_id: uuid.UUID, reporter: JobReporter, settings: Settings, folder: Path
) -> GroupResult:
    """Trains `config` on `config.num_processes` ranks of one torchrun group on this machine and returns rank 0's
    result; raises what a single-process run would (`TrainingCancelled`, `LeaseLost`, or `GroupFailed` with the
    rank's classified error), or `GroupDied` when the ranks died past their restarts."""
    outcome_path = folder / "group-outcome.json"
    job_file = folder / "group-job.json"
    RankJob(job_id, reporter.worker_id, config, outcome_path).save(job_file)
    restarts = settings.worker_group_restarts
    env = {**os.environ, **launcher_env(max_restarts=restarts)}
    if settings.worker_torch_threads is not None:
        env["OMP_NUM_THREADS"] = str(settings.worker_torch_threads)
    reporter.devices = config.num_processes  # the attempt holds every GPU of the group
    command = torchrun_command(config.num_processes, RANK_MODULE, [str(job_file)], max_restarts=restarts)
    launcher = subprocess.Popen(command, env=env, preexec_fn=die_with_parent, start_new_session=True)
    logger.info("job %s: started %d ranks (torchrun pid %d)", job_id, config.num_processes, launcher.pid)
    try:
        code = _watch(launcher, reporter, outcome_path)
    finally:
        _stop(launcher)
    result = _result(outcome_path, code)
    reporter.uploaded_outputs += result.uploaded
    return result


def _watch(launcher: subprocess.Popen[bytes], reporter: JobReporter, outcome_path: Path) -> int | None:
    """Waits for the group to end; stops it on a lost lease, or when an outcome is written and the ranks do not
    leave (a rank's own error leaves the others waiting for it in a collective). The launcher's exit code, or None
    where this process stopped it."""
    decided_at: float | None = None
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return launcher.wait(timeout=0.25)
        if reporter.lease_lost.is_set():
            raise LeaseLost(reporter.job_id)
        if decided_at is None and outcome_path.exists():
            decided_at = time.monotonic()
            if json.loads(outcome_path.read_text()).get("rank", 0) != 0:
                return None
        if decided_at is not None and time.monotonic() - decided_at > SETTLE_S:
            logger.warning(
                "job %s: ranks still running %.0f s after the outcome; stopping them", reporter.job_id, SETTLE_S
            )
            return None


def _stop(launcher: subprocess.Popen[bytes]) -> None:
    """Ends a group that is still running: SIGTERM to torchrun (which passes it to its ranks), then SIGKILL to
    every process of the group after `STOP_GRACE_S`. Also sweeps ranks left by a launcher that already exited."""
    try:
        members = [launcher.pid, *(p.pid for p in psutil.Process(launcher.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        members = []
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(timeout=STOP_GRACE_S)
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if launcher.poll() is None:
        launcher.wait()


def _result(outcome_path: Path, code: int | None) -> GroupResult:
    if not outcome_path.is_file():
        raise GroupDied(f"the job's ranks died (torchrun exit code {code}) past the group's restarts")
    outcome = json.loads(outcome_path.read_text())
    status = outcome["status"]
    if status == "succeeded":
        warnings = tuple(RunWarning(str(w["stage"]), str(w["message"])) for w in outcome["warnings"])
        return GroupResult(metrics=dict(outcome["metrics"]), warnings=warnings, uploaded=list(outcome["uploaded"]))
    if status == "canceled":
        raise TrainingCancelled(int(outcome["step"]))
    if status == "lease_lost":
        raise LeaseLost(uuid.UUID(outcome["job_id"]))
    raise GroupFailed(str(outcome["code"]), str(outcome["message"]))
