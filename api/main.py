"""`create_app()`: the FastAPI application. Engines and clients are made in the lifespan, never at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
import redis
from fastapi import FastAPI

from api.errors import install_error_handlers
from api.maintenance import service_maintenance
from api.metrics import install_metrics
from api.ratelimit import make_rate_limiter
from api.routes import api_router
from api.routes.shared import publish_job_spec
from api.routes.web import router as web_router
from api.security_headers import SecurityHeaders
from api.stream_slots import make_stream_slots
from core import api_keys
from core.config import Settings, get_settings
from core.db import make_engine, make_sessionmaker, session_scope
from core.storage import S3Store, make_store


logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(
            settings.database_url, pool_size=settings.database_pool_size, max_overflow=settings.database_max_overflow
        )
        # Sessions are closed here, not in the thread pool that runs handlers: a session that holds a connection
        # must never wait for a thread that itself waits for a connection (a deadlock under load).
        app.state.session_closer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="session-close")
        pooled = 15 if settings.is_sqlite else settings.database_pool_size + settings.database_max_overflow
        app.state.session_slots = anyio.CapacityLimiter(pooled)  # SQLite: SQLAlchemy's default pool, 5 + 10
        app.state.settings = settings
        app.state.sessionmaker = make_sessionmaker(engine)
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
        app.state.stream_slots = make_stream_slots(settings.max_streams_per_key, app.state.redis)
        if settings.dev_api_key is not None:
            with session_scope(app.state.sessionmaker) as session:
                api_keys.ensure_api_key(session=session, name="dev", key=settings.dev_api_key.get_secret_value())
        # Embedded mode runs maintenance here; the production shape runs it as `dopsd maintain`.
        maintenance = (
            service_maintenance(settings, app.state.sessionmaker, app.state.store)
            if settings.api_runs_maintenance
            else None
        )
        if maintenance is not None:
            maintenance.start()
        yield
        if maintenance is not None:
            maintenance.stop()
        if app.state.redis is not None:
            app.state.redis.close()
        app.state.session_closer.shutdown(wait=True)
        engine.dispose()

    app = FastAPI(
        title="D-OPSD fine-tuning service",
        description="LoRA fine-tuning of step-distilled image models with on-policy self-distillation.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_metrics(app, settings)
    app.add_middleware(SecurityHeaders, settings=settings)  # outermost: on every response, errors included
    app.include_router(api_router)
    app.include_router(web_router)  # the web page at /app/ (not in the OpenAPI schema)
    publish_job_spec(app)
    return app
