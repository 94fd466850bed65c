"""The production-shaped stack on this machine, all on loopback: PostgreSQL and Redis (already running here, or
started), a SeaweedFS S3 server, the API (uvicorn), one Celery worker process and `dopsd maintain` (the reaper,
retention and webhook sender, in their own process: the API there runs none of them).

`python scripts/stack.py up|down|env` (what `make stack` / `make stack-down` run). The tests use the same
functions to start the real servers they run against.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "var" / "stack"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Commands from this machine kind's notes, for when the services are down (CI copes with either).
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on `port`."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port(span: int = 0) -> int:
    """A free loopback port (and, with `span`, `port + span` free too: SeaweedFS uses port + 10000 for gRPC)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not span or (port + span < 65535 and not port_open(port + span)):
            return port
    raise RuntimeError("no free port")


def wait_until(check: Any, what: str, timeout_s: float = 60.0) -> None:
    """Polls `check()` until it is true, or fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} did not come up within {timeout_s:.0f} s")


def http_ok(url: str) -> bool:
    """Whether GET `url` answers 200."""
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


def ensure_postgres_and_redis() -> None:
    """Starts PostgreSQL and Redis with the machine's own commands if they are not answering."""
    if not port_open(5432):
        subprocess.run(PG_START, shell=True, check=False)
        wait_until(lambda: port_open(5432), "PostgreSQL")
    if not port_open(6379):
        Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
        Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
        subprocess.run(REDIS_START, shell=True, check=False)
        wait_until(lambda: port_open(6379), "Redis")


def create_database(name: str, *, recreate: bool = False) -> str:
    """Creates database `name` on the local PostgreSQL (trust auth) and returns its SQLAlchemy URL."""
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and recreate:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = None
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    """Drops database `name`, closing its connections."""
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_seaweedfs(
    data_dir: Path, *, access_key: str, secret_key: str, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """A real S3 server (SeaweedFS from PyPI) on loopback with one identity; returns it and its endpoint URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "dopsd",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    ports = {name: free_port(span=10000) for name in ("master", "volume", "filer", "s3")}
    weed = Path(sys.executable).parent / "weed"
    command = [
        str(weed) if weed.exists() else "weed", "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=0",
        # Its Iceberg and Lance listeners default to fixed ports (8181, 9101): off, so several servers can coexist.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        wait_until(lambda: _s3_ready(endpoint, access_key, secret_key), "SeaweedFS S3", timeout_s=90)
    except BaseException:
        stop(process)  # never leave a half-started server holding the ports
        raise
    return process, endpoint


def _s3_ready(endpoint: str, access_key: str, secret_key: str) -> bool:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name="us-east-1",
    )  # fmt: skip
    client.list_buckets()
    bucket = "dopsd-probe"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
    client.delete_object(Bucket=bucket, Key="probe")
    return True


SERVERS = {"auto": ("auto", "auto"), "asyncio": ("asyncio", "h11")}  # uvicorn's --loop and --http


def start_api(
    env: dict[str, str], port: int, log: Path, *, workers: int = 1, server: str = "auto"
) -> subprocess.Popen[bytes]:
    """uvicorn serving `api.main:create_app` on loopback, in `workers` processes (uvicorn's supervisor forks them;
    each has its own database pool and thread pool, and shares the per-key limits through Redis). `server` "auto"
    is uvicorn's default (uvloop and httptools, which the service extra installs); "asyncio" is the pure-Python
    event loop and HTTP parser, the baseline bench/service.py compares them with."""
    loop, http = SERVERS[server]
    command = [
        sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "warning", "--loop", loop, "--http", http,
        *(["--workers", str(workers)] if workers > 1 else []),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), "the API")
    return process


def start_worker(
    env: dict[str, str], log: Path, name: str = "worker", queues: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """One Celery worker process (concurrency 1) consuming `queues` (default: every queue, training and
    generation, of every model family, for jobs of up to the `DOPSD_WORKER_GPUS` of `env` processes)."""
    from api.commands import all_queues, worker_command

    command = worker_command(queues or all_queues(int(env.get("DOPSD_WORKER_GPUS", "1"))))
    command[command.index("-n") + 1] = f"{name}-{os.getpid()}@%h"
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_until(lambda: b" ready." in log.read_bytes(), "the Celery worker", timeout_s=90)
    return process


def start_maintain(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`dopsd maintain`: the reaper, retention and the webhook sender as their own process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dopsd", "maintain"],
        cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    wait_until(lambda: b"maintenance running" in log.read_bytes(), "dopsd maintain", timeout_s=60)
    return process


def stop(process: subprocess.Popen[bytes] | int, timeout_s: float = 20) -> None:
    """SIGTERM to the process group, SIGKILL to what is left of it after `timeout_s`. Waits for the whole group,
    not only its leader: `dopsd serve` leads its worker processes, and a Celery worker whose shutdown hangs would
    otherwise outlive the test that started it (seen: one still waiting on its dead pool child an hour later)."""
    pid = process if isinstance(process, int) else process.pid
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not isinstance(process, int):
            process.poll()  # reaps the leader, whose zombie would keep the group alive
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if not isinstance(process, int):
        process.wait(timeout=10)


def stop_on_sigterm() -> None:
    """Makes SIGTERM unwind like an exception, so that a benchmark stopped from outside (a test's timeout) still
    runs its `finally` blocks and stops the servers it started: they run in sessions of their own, so nothing else
    would, and an orphaned worker goes on taking jobs from the next run's queue."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def stack_env(*, database_url: str, broker_url: str, s3_endpoint: str, access_key: str, secret_key: str,
              public_url: str, bucket: str = "dopsd") -> dict[str, str]:  # fmt: skip
    """The environment of API and worker processes in the production shape (a fresh random signing key)."""
    import secrets

    env = dict(os.environ)
    env.update(
        DOPSD_ENVIRONMENT="production",
        DOPSD_SIGNING_KEY=secrets.token_urlsafe(32),
        DOPSD_DATABASE_URL=database_url,
        DOPSD_BROKER_URL=broker_url,
        DOPSD_STORAGE_BACKEND="s3",
        DOPSD_S3_ENDPOINT_URL=s3_endpoint,
        DOPSD_S3_BUCKET=bucket,
        DOPSD_S3_ACCESS_KEY_ID=access_key,
        DOPSD_S3_SECRET_ACCESS_KEY=secret_key,
        DOPSD_PUBLIC_URL=public_url,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
    )
    return env


def up() -> None:
    """`make stack`: starts SeaweedFS, the API on 127.0.0.1:8000, one worker and maintenance; prints the
    environment."""
    import secrets

    from api.commands import migrate

    STATE.mkdir(parents=True, exist_ok=True)
    if (STATE / "pids.json").exists():
        sys.exit("the stack is already up (make stack-down first)")
    ensure_postgres_and_redis()
    access_key, secret_key = "dopsd", secrets.token_urlsafe(24)
    # Each `up` is a fresh stack: SeaweedFS does not come back reliably on an old data folder here, and the
    # database must not point at objects that are gone, so both start empty.
    shutil.rmtree(STATE / "s3", ignore_errors=True)
    weed, endpoint = start_seaweedfs(STATE / "s3", access_key=access_key, secret_key=secret_key, log=STATE / "s3.log")
    database_url = create_database("dopsd", recreate=True)
    env = stack_env(
        database_url=database_url, broker_url="redis://127.0.0.1:6379/0", s3_endpoint=endpoint,
        access_key=access_key, secret_key=secret_key, public_url="http://127.0.0.1:8000",
    )  # fmt: skip
    env["DOPSD_MAINTENANCE_IN_API"] = "false"  # `dopsd maintain` runs it
    started: dict[str, int] = {"s3": weed.pid}
    try:
        migrate(database_url)
        started["api"] = start_api(env, 8000, STATE / "api.log").pid
        started["worker"] = start_worker(env, STATE / "worker.log").pid
        started["maintain"] = start_maintain(env, STATE / "maintain.log").pid
    except BaseException:
        for pid in started.values():
            stop(pid)
        raise
    (STATE / "pids.json").write_text(json.dumps(started))
    exported = {k: v for k, v in env.items() if k.startswith("DOPSD_")}
    (STATE / "env").write_text("".join(f"export {k}={v}\n" for k, v in exported.items()))
    print("stack up: API http://127.0.0.1:8000 (docs at /docs), worker, maintenance, PostgreSQL db `dopsd`,")
    print(f"Redis db 0, SeaweedFS S3 {endpoint}. Logs in {STATE}. For `dopsd keys create`: source {STATE / 'env'}")


def down() -> None:
    """`make stack-down`: stops what `up` started."""
    pids_file = STATE / "pids.json"
    if not pids_file.exists():
        print("the stack is not up")
        return
    for name, pid in json.loads(pids_file.read_text()).items():
        stop(pid)
        print(f"stopped {name}")
    pids_file.unlink()


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]()
