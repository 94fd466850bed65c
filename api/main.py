"""`create_app()`: the FastAPI application. Engines and clients are made in the lifespan, never at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from sqlalchemy.orm import Session

from api.database import Database
from api.errors import install_error_handlers
from api.maintenance import service_maintenance
from api.metrics import install_metrics
from api.principals import Principals
from api.ratelimit import make_rate_limiter
from api.routes import api_router
from api.routes.shared import publish_job_spec
from api.routes.web import router as web_router
from api.security_headers import SecurityHeaders
from api.stream_slots import make_stream_slots
from core import api_keys
from core.config import Settings, get_settings
from core.db import make_engine, make_sessionmaker
from core.storage import S3Store, make_store


logger = logging.getLogger(__name__)


def _ensure_dev_key(session: Session, key: str) -> None:
    api_keys.ensure_api_key(session=session, name="dev", key=key)
    session.commit()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool_size, max_overflow = settings.database_pool_size, settings.database_max_overflow
        # Every session the API opens holds one of as many slots as this pool has connections (api.database).
        database = Database(
            make_engine(settings.database_url, pool_size=pool_size, max_overflow=max_overflow),
            pool_size + max_overflow,
        )
        app.state.database = database
        app.state.settings = settings
        app.state.store = make_store(settings)
        if isinstance(app.state.store, S3Store):
            try:
                app.state.store.ensure_bucket()
            except Exception as exc:  # readiness reports it; the API still starts
                logger.warning("object storage not reachable at start-up: %s", type(exc).__name__)
        # Per-key limits: shared by every replica through Redis when there is one, else counted in this process.
        shared = settings.shared_redis_url
        app.state.redis = (
            redis.Redis.from_url(shared, socket_timeout=1.0, socket_connect_timeout=1.0) if shared else None
        )
        app.state.rate_limiter = make_rate_limiter(settings.rate_limit_per_minute, app.state.redis)
        app.state.principals = Principals(app.state.rate_limiter, app.state.redis)
        app.state.stream_slots = make_stream_slots(settings.max_streams_per_key, app.state.redis)
        if settings.dev_api_key is not None:
            dev_key = settings.dev_api_key.get_secret_value()
            await database.run(lambda session: _ensure_dev_key(session, dev_key))
        # Embedded mode runs maintenance here, on an engine (a pool) of its own, as `dopsd maintain` has one: its
        # threads never take a request's connection. The production shape runs it as `dopsd maintain`.
        maintenance = None
        if settings.api_runs_maintenance:
            maintenance_engine = make_engine(settings.database_url)
            maintenance = service_maintenance(settings, make_sessionmaker(maintenance_engine), app.state.store)
            maintenance.start()
        yield
        if maintenance is not None:
            maintenance.stop()
            maintenance_engine.dispose()
        if app.state.redis is not None:
            app.state.redis.close()
        database.close()

    app = FastAPI(
        title="D-OPSD fine-tuning service",
        description="LoRA fine-tuning of step-distilled image models with on-policy self-distillation.",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks look for a configured provider on every request; the service reports
        # through Prometheus (/metrics) and its JSON logs, so they only cost time (a share of a status poll).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    install_error_handlers(app)
    install_metrics(app, settings)
    app.add_middleware(SecurityHeaders, settings=settings)  # outermost: on every response, errors included
    app.include_router(api_router)
    app.include_router(web_router)  # the web page at /app/ (not in the OpenAPI schema)
    publish_job_spec(app)
    return app
