"""The SQL of a transition: every status change of a job is `move(Transition.X, ...)`, never a hand-written WHERE."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, Update, update

from core.jobs.models import Job, utcnow
from core.jobs.states import Transition


# The execution option naming the transition an UPDATE makes (tests check every status change carries one).
TRANSITION_OPTION = "job_transition"


def move(transition: Transition, *where: ColumnElement[bool], now: datetime | None = None) -> Update:
    """The conditional UPDATE of one transition: jobs in one of its source states that also meet `where` enter its
    target state; a terminal target also sets `finished_at` (to `now`, default the current time).

    The caller adds its own `.values(...)` and `.returning(...)`; how many rows changed says whether it happened,
    so two racing writers (a claim and a cancel, a finish and a reap) cannot both win.
    """
    statement = (
        update(Job)
        .where(Job.status.in_(sorted(transition.sources)), *where)
        .values(status=transition.target)
        .execution_options(**{TRANSITION_OPTION: transition.name})
    )
    if transition.target.is_terminal:
        statement = statement.values(finished_at=now or utcnow())
    return statement
