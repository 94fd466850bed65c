"""Job states and the one table of named transitions between them.

Every status change a job makes is one of `Transition`'s members; `core.jobs.transitions.move` turns a member into
its conditional UPDATE (`WHERE status IN <sources>`, `SET status = <target>`), so what the code does and what this
table declares are the same thing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """Whether the job can no longer change."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class Actor(enum.StrEnum):
    """Who makes a transition."""

    OWNER = "owner"
    WORKER = "worker"
    REAPER = "reaper"


@dataclass(frozen=True)
class Move:
    """Who makes a transition, the states it leaves and the state it enters."""

    actor: Actor
    sources: frozenset[JobStatus]
    target: JobStatus

    def allows(self, current: JobStatus) -> bool:
        """Whether a job in `current` may make this move."""
        return current in self.sources


def _move(actor: Actor, sources: set[JobStatus], target: JobStatus) -> Move:
    return Move(actor, frozenset(sources), target)


@enum.unique  # two members with the same move would silently be one
class Transition(enum.Enum):
    """Every status change a job can make, by name (the UPDATE of each adds its own guards: lease, worker)."""

    # A worker takes a queued job, or a running one whose lease ran out (its worker died; the job resumes from its
    # last checkpoint). Only a running job has a lease, so "queued, or running with an expired lease" is one rule.
    CLAIM = _move(Actor.WORKER, {JobStatus.QUEUED, JobStatus.RUNNING}, JobStatus.RUNNING)
    # The reaper hands a job whose worker died back to the queue.
    REQUEUE = _move(Actor.REAPER, {JobStatus.RUNNING}, JobStatus.QUEUED)
    # The reaper gives up on a job started too many times.
    EXHAUST = _move(Actor.REAPER, {JobStatus.RUNNING}, JobStatus.FAILED)
    # The reaper closes a job whose worker died after its owner asked to stop or delete it.
    ABANDON = _move(Actor.REAPER, {JobStatus.RUNNING}, JobStatus.CANCELED)
    # The worker holding the job: it finished, it failed, it stopped on request.
    SUCCEED = _move(Actor.WORKER, {JobStatus.RUNNING}, JobStatus.SUCCEEDED)
    FAIL = _move(Actor.WORKER, {JobStatus.RUNNING}, JobStatus.FAILED)
    STOP = _move(Actor.WORKER, {JobStatus.RUNNING}, JobStatus.CANCELED)
    # The owner cancels a job no worker has taken yet (a running one is asked to stop instead).
    CANCEL = _move(Actor.OWNER, {JobStatus.QUEUED}, JobStatus.CANCELED)

    @property
    def sources(self) -> frozenset[JobStatus]:
        """The states this transition leaves."""
        return self.value.sources

    @property
    def target(self) -> JobStatus:
        """The state this transition enters."""
        return self.value.target

    @property
    def actor(self) -> Actor:
        """Who makes this transition."""
        return self.value.actor

    def allows(self, current: JobStatus) -> bool:
        """Whether a job in `current` may make this transition."""
        return self.value.allows(current)
