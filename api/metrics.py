"""Prometheus metrics at `/metrics`: HTTP latency measured in this process; jobs by state, queue depth, job
duration and step time read from the job database at scrape time, so every API replica reports the same fleet."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session, sessionmaker

from api.estimate import observed_step_seconds
from core.jobs.models import Job
from core.jobs.states import JobStatus
from dopsd.presets import PRESETS


DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class JobCollector(Collector):
    """Fleet-wide job metrics, computed from the database when Prometheus scrapes."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        """Jobs by state and kind, queue depth per queue, job duration and recent step time per preset."""
        sessions: sessionmaker[Session] | None = getattr(self.app.state, "sessionmaker", None)
        if sessions is None:  # not started yet
            return
        with sessions() as session:
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


def install_metrics(app: FastAPI) -> None:
    """Adds the HTTP latency middleware and the `/metrics` route (its registry is the app's own)."""
    registry = CollectorRegistry()
    latency = Histogram(
        "dopsd_http_request_duration_seconds",
        "HTTP request latency by route template, method and status.",
        ["route", "method", "status"],
        buckets=HTTP_BUCKETS,
        registry=registry,
    )
    registry.register(JobCollector(app))

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        latency.labels(template, request.method, str(response.status_code)).observe(time.perf_counter() - started)
        return response

    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text exposition of this process's and the fleet's metrics."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
