"""Prometheus metrics at `/metrics`: HTTP latency measured in this process; jobs by state, queue depth, job
duration and step time read from the job database at scrape time, so every API replica reports the same fleet.

The job aggregates scan the job table, so a replica reuses them for `DOPSD_METRICS_CACHE_S` (one query set at a
time, however many scrapers ask); with `DOPSD_METRICS_TOKEN` set, `/metrics` answers only that bearer token."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.database import Database
from api.estimate import observed_step_seconds
from core.config import Settings
from core.errors import Unauthorized
from core.jobs.models import Job
from core.jobs.states import JobStatus
from dopsd.presets import PRESETS


DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class JobCollector(Collector):
    """Fleet-wide job metrics, computed from the database before a scrape (`refresh`) and reused for `cache_s`."""

    def __init__(self, cache_s: float) -> None:
        self.cache_s = cache_s
        self._cached: tuple[float, list[Metric]] | None = None
        self._lock = threading.Lock()  # concurrent scrapes wait for one computation instead of each running it

    def _fresh(self) -> bool:
        return self._cached is not None and time.monotonic() - self._cached[0] < self.cache_s

    async def refresh(self, database: Database) -> None:
        """Reads the job metrics again, in a session of the API's database slots, once the cached ones are older
        than `cache_s`."""
        if not self._fresh():
            await database.run(self._refresh)

    def _refresh(self, session: Session) -> None:
        with self._lock:
            if not self._fresh():
                self._cached = (time.monotonic(), list(self._compute(session)))

    def collect(self) -> Iterator[Metric]:
        """The job metrics last read (none before the first `refresh`)."""
        cached = self._cached
        if cached is not None:
            yield from cached[1]

    def _compute(self, session: Session) -> Iterator[Metric]:
        """Jobs by state and kind, queue depth per queue, job duration and recent step time per preset."""
        by_state = GaugeMetricFamily(
            "dopsd_jobs", "Jobs by state and kind (deleted jobs excluded).", labels=["status", "kind"]
        )
        rows = session.execute(
            select(Job.status, Job.kind, func.count()).where(Job.deleted.is_(False)).group_by(Job.status, Job.kind)
        )
        counts = {(status, kind): n for status, kind, n in rows}
        for status in JobStatus:
            for kind in ("training", "preview"):
                by_state.add_metric([status.value, kind], counts.get((status.value, kind), 0))
        yield by_state

        depth = GaugeMetricFamily("dopsd_queue_depth", "Jobs waiting per worker queue.", labels=["queue"])
        queued = session.execute(
            select(Job.queue, func.count())
            .where(Job.status == JobStatus.QUEUED.value, Job.deleted.is_(False))
            .group_by(Job.queue)
        )
        for queue, n in queued:
            depth.add_metric([queue], n)
        yield depth

        yield self._durations(session)

        step = GaugeMetricFamily(
            "dopsd_step_seconds", "Median seconds per training step of the preset's last jobs.", labels=["preset"]
        )
        for name in PRESETS:
            observed = observed_step_seconds(session=session, preset=name)
            if observed is not None:
                step.add_metric([name], observed)
        yield step

    def _durations(self, session: Session) -> Metric:
        """From start to end of every finished job (all time, so the histogram only grows), by kind and outcome."""
        seconds: ColumnElement[Any] = func.extract("epoch", Job.finished_at - Job.started_at)
        if session.get_bind().dialect.name == "sqlite":
            seconds = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
        columns = [func.sum(case((seconds <= b, 1), else_=0)) for b in DURATION_BUCKETS]
        rows = session.execute(
            select(Job.kind, Job.status, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
            .where(Job.finished_at.is_not(None), Job.started_at.is_not(None))
            .group_by(Job.kind, Job.status)
        )
        family = HistogramMetricFamily(
            "dopsd_job_duration_seconds", "Run time of finished jobs, start to end.", labels=["kind", "status"]
        )
        for kind, status, count, total, *cumulative in rows:
            buckets = [(str(b), float(c or 0)) for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)]
            family.add_metric([kind, status], [*buckets, ("+Inf", float(count))], sum_value=float(total))
        return family


class DatabaseSlotsCollector(Collector):
    """This process's database session slots (`api.database`): how many there are, held and waited for."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        """The slots' capacity, the sessions open and the callers waiting for one, now (none before start-up)."""
        database: Database | None = getattr(self.app.state, "database", None)
        if database is None:
            return
        for name, help_text, value in (
            ("dopsd_database_session_slots", "Database sessions this API process may hold: its pool's connections.",
             database.capacity),
            ("dopsd_database_sessions", "Database sessions this API process holds now.", database.in_use),
            ("dopsd_database_session_waiters", "Requests of this API process waiting for a database session.",
             database.waiting),
        ):  # fmt: skip
            yield GaugeMetricFamily(name, help_text, value=value)


class LatencyMiddleware:
    """ASGI middleware timing each request until its response starts, by route template, method and status.

    A plain ASGI class, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs every request through a
    task group and a memory stream, a measured share of a status poll's time (bench/service.py)."""

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self.app = app
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                template = getattr(scope.get("route"), "path", "unmatched")
                elapsed = time.perf_counter() - started
                self.latency.labels(template, scope["method"], str(message["status"])).observe(elapsed)
            await send(message)

        await self.app(scope, receive, timed_send)


_bearer = HTTPBearer(auto_error=False)


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Adds the HTTP latency middleware and the `/metrics` route (its registry is the app's own)."""
    registry = CollectorRegistry()
    latency = Histogram(
        "dopsd_http_request_duration_seconds",
        "HTTP request latency by route template, method and status.",
        ["route", "method", "status"],
        buckets=HTTP_BUCKETS,
        registry=registry,
    )
    jobs = JobCollector(settings.metrics_cache_s)
    registry.register(jobs)
    registry.register(DatabaseSlotsCollector(app))
    app.add_middleware(LatencyMiddleware, latency=latency)
    token = settings.metrics_token.get_secret_value().encode() if settings.metrics_token else None

    def scraper(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        """With a metrics token configured, only a request bearing it may read the metrics."""
        if token is None:
            return
        presented = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(presented, token):
            raise Unauthorized("send `Authorization: Bearer <metrics token>`")

    router = APIRouter()

    @router.get("/metrics", include_in_schema=False, dependencies=[Depends(scraper)])
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition of this process's and the fleet's metrics."""
        await jobs.refresh(request.app.state.database)
        return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
