"""Service commands added to the `dopsd` CLI: `keys create|revoke|list`, `migrate`, `maintain` (the reaper,
retention and webhook sender as their own process, the production shape) and `serve` (embedded mode: API + one
real Celery worker process, on SQLite, the filesystem broker and a local artifact folder)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select


MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"


def migrate(database_url: str | None = None) -> None:
    """Applies every Alembic migration (`alembic upgrade head`) to the configured database."""
    from alembic import command
    from alembic.config import Config

    from core.config import get_settings

    url = database_url or get_settings().database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")


def _sessions() -> Any:
    from core.config import get_settings
    from core.db import make_engine, make_sessionmaker

    settings = get_settings()
    if settings.is_sqlite:
        migrate()
    return make_sessionmaker(make_engine(settings.database_url))


def _keys(ns: argparse.Namespace) -> int:
    from core import api_keys
    from core.config import get_settings
    from core.db import session_scope
    from core.errors import DomainError
    from core.jobs.models import ApiKey

    with session_scope(_sessions()) as session:
        if ns.keys_command == "create":
            record, key = api_keys.create_api_key(session=session, name=ns.name)
            print(key)
            print(record.webhook_secret)
            print(
                f"created key {record.prefix}... named {ns.name!r}: the first line is the API key, the second the "
                "secret that signs its webhooks (Standard Webhooks); both are shown only this once",
                file=sys.stderr,
            )
        elif ns.keys_command == "revoke":
            try:
                record = api_keys.revoke_api_key(session=session, selector=ns.key)
            except DomainError as exc:
                print(f"error: {exc.message}", file=sys.stderr)
                return 1
            session.commit()  # before the API replicas are told: they read the key again, and find it revoked
            api_keys.announce_revocation(get_settings().shared_redis_url)
            print(f"revoked key {record.id} ({record.prefix}..., named {record.name!r})")
        else:
            for k in session.scalars(select(ApiKey).order_by(ApiKey.created_at)):
                state = "revoked" if k.revoked_at else "active"
                print(f"{k.id}  {k.prefix}...  {k.name:20} {state:8} {k.created_at:%Y-%m-%d %H:%M}")
    return 0


def _migrate(_: argparse.Namespace) -> int:
    migrate()
    print("database at head")
    return 0


def _maintain(_: argparse.Namespace) -> int:
    """Runs maintenance until SIGTERM or SIGINT, then lets the passes in flight end and exits 0."""
    import threading

    from api.maintenance import service_maintenance
    from core.config import get_settings
    from core.db import make_engine, make_sessionmaker
    from core.logs import configure_logging
    from core.storage import make_store

    settings = get_settings()
    configure_logging(settings.log_format)
    engine = make_engine(settings.database_url)
    maintenance = service_maintenance(settings, make_sessionmaker(engine), make_store(settings))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    maintenance.start()
    every = f"reaper every {settings.reaper_interval_s:g} s, webhooks every {settings.webhook_poll_interval_s:g} s"
    print(f"maintenance running ({every}); stop with SIGTERM", flush=True)
    stop.wait()
    maintenance.stop()
    engine.dispose()
    print("maintenance stopped", flush=True)
    return 0


def worker_command(queues: list[str], *, pool: str = "prefork", name: str = "dopsd") -> list[str]:
    """The command line of one worker process (concurrency 1: one job per GPU)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO",
        f"--pool={pool}", "--concurrency=1", "-Q", ",".join(queues), "-n", f"{name}-{os.getpid()}@%h",
    ]  # fmt: skip


def training_queues(gpus: int = 1) -> list[str]:
    """Every model family's training queues of jobs that a worker owning `gpus` GPUs can run (1 to `gpus`
    processes)."""
    from core.queue import queue_for_family
    from dopsd.presets import PRESETS

    return sorted({queue_for_family(p.family, n) for p in PRESETS.values() for n in range(1, gpus + 1)})


def generation_queues() -> list[str]:
    """Every model family's generation queue."""
    from core.queue import generation_queue_for_family
    from dopsd.presets import PRESETS

    return sorted({generation_queue_for_family(p.family) for p in PRESETS.values()})


def all_queues(gpus: int = 1) -> list[str]:
    """Every queue, training (of jobs up to `gpus` processes) and generation (one worker that takes everything, as
    the test stack runs)."""
    return training_queues(gpus) + generation_queues()


def _serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app
    from core.config import get_settings

    settings = get_settings()
    if "DOPSD_PUBLIC_URL" not in os.environ:
        settings = settings.model_copy(update={"public_url": f"http://{ns.host}:{ns.port}"})
    migrate()
    # Two worker processes, so a generation never waits behind a training job: one per pool, as a deployment runs.
    workers = (
        []
        if ns.no_worker
        else [
            subprocess.Popen(worker_command(training_queues(settings.worker_gpus), name="dopsd-train")),
            subprocess.Popen(worker_command(generation_queues(), name="dopsd-generate")),
        ]
    )
    key = (
        settings.dev_api_key.get_secret_value() if settings.dev_api_key else "<your key: dopsd keys create --name me>"
    )
    base = f"http://{ns.host}:{ns.port}"
    print(
        f"\nD-OPSD service on {base} (docs: {base}/docs); workers: {'off' if not workers else 'training + generation'}\n"
        "Teach the bundled `shapes` model a concept it has never seen (a cross; under a minute on a quiet 2-core CPU):\n"
        f"  curl -s -H 'Authorization: Bearer {key}' \\\n"
        "    -F images=@examples/shapes/cross-1.png -F images=@examples/shapes/cross-2.png \\\n"
        "    -F images=@examples/shapes/cross-3.png -F images=@examples/shapes/cross-4.png \\\n"
        '    -F \'spec={"preset": "shapes"}\' '
        f"{base}/v1/jobs\n"
        f"Then: curl -s -H 'Authorization: Bearer {key}' {base}/v1/jobs/<id>\n"
        "Once it succeeded, make images with its adapter:\n"
        f"  curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        '    -d \'{"preset": "shapes", "prompt": "a red [V] on a blue background", "seeds": [0, 1, 2, 3], '
        '"adapters": [{"job_id": "<id>"}]}\' '
        f"{base}/v1/generations\n"
        f"Or open {base}/app/ (the web page) with the key above.\n",
        flush=True,
    )
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; with the default handler that kills this
    # process before `finally` stops the workers (orphaned workers after `docker stop`, systemd or `kill`). A handler
    # that exits instead lets the workers go with the service.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=ns.host, port=ns.port, log_level="info")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a worker whose shutdown hangs must not outlive the service
                worker.kill()
                worker.wait(timeout=10)
    return 0


def register(sub: Any) -> None:
    """Adds the service commands to the `dopsd` parser (entry point `dopsd.commands`)."""
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it and its webhook secret once")
    create.add_argument("--name", required=True)
    revoke = keys_sub.add_parser(
        "revoke", help="revoke one key (its queued and running jobs are canceled, its pending webhooks dropped)"
    )
    revoke.add_argument("key", help="the key itself, its id (see `keys list`) or its exact name; never a prefix")
    keys_sub.add_parser("list", help="list keys: id, prefix, name, state")
    keys.set_defaults(func=_keys)

    mig = sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    mig.set_defaults(func=_migrate)

    maintain = sub.add_parser(
        "maintain", help="run the reaper, retention and the webhook sender until SIGTERM (production shape)"
    )
    maintain.set_defaults(func=_maintain)

    serve = sub.add_parser(
        "serve", help="run the API and its worker processes, training and generation (embedded mode by default)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="run the API only")
    serve.set_defaults(func=_serve)
