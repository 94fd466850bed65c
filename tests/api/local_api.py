"""The app of the in-process tier (see tests/api/conftest.py): its settings, clients per key, the operator's key
commands run in this process, and listings of what it stored and sent."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest
from fastapi.testclient import TestClient

from core.config import Settings, get_settings
from dopsd.cli import main as dopsd_main


class KeyedClient(TestClient):
    """A client of the tier's already started app, authenticated with one key. It sends its requests through
    the event loop the app's lifespan runs in (one loop, as under uvicorn), and entering it does not run the
    lifespan again, so `with local_api.client(key) as c:` reads like the real-stack tests."""

    def __init__(self, started: TestClient, headers: dict[str, str]) -> None:
        super().__init__(started.app, base_url=str(started.base_url), headers=headers)
        self.portal = started.portal

    def __enter__(self) -> KeyedClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        self.close()


@dataclass
class LocalApi:
    """The app under test, where its SQLite file, broker folder and artifact folder are, and how to make keys."""

    settings: Settings
    started: TestClient  # the client that runs the app's lifespan

    def client(self, key: str | None) -> KeyedClient:
        """A client authenticated with `key` (no header when None)."""
        return KeyedClient(self.started, {"Authorization": f"Bearer {key}"} if key else {})

    def command(self, *args: str, expect: int = 0) -> str:
        """Runs `dopsd ARGS` in this process against the tier's database, as an operator would; returns stdout
        and stderr, after checking the exit code is `expect`."""
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DOPSD_DATABASE_URL", self.settings.database_url)
            env.setenv("DOPSD_ENVIRONMENT", "development")
            get_settings.cache_clear()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    code = dopsd_main(list(args))
            finally:
                get_settings.cache_clear()
        assert code == expect, f"dopsd {' '.join(args)} exited with {code}: {out.getvalue()}"
        return out.getvalue()

    def create_key(self, name: str) -> str:
        """`dopsd keys create --name NAME`; returns the printed key."""
        return self.command("keys", "create", "--name", name).splitlines()[0]

    def key_ids(self) -> dict[str, str]:
        """`dopsd keys list`: each listed key's id by its prefix."""
        rows = [line.split() for line in self.command("keys", "list").splitlines() if line.strip()]
        return {row[1].removesuffix("..."): row[0] for row in rows}

    def revoke_key(self, key: str) -> None:
        """`dopsd keys revoke KEY`."""
        self.command("keys", "revoke", key)

    def stored(self) -> list[str]:
        """Every file in the local artifact store, hidden ones included, as paths relative to its folder."""
        root = self.settings.storage_dir
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def messages(self) -> list[str]:
        """Every file in the filesystem broker's folder: the messages sent to workers (none is consumed here)."""
        root = self.settings.broker_dir
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def tier_settings(home: Path, broker_dir: Path) -> Settings:
    """Embedded-mode settings under `home`, with the same limits as the real-stack tests' services (2 MiB per
    file, 6 queued jobs per key, 1000 requests a minute); `DOPSD_*` variables of the environment are ignored."""
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("DOPSD_")]:
            env.delenv(name)
        return Settings(
            environment="development",
            database_url=f"sqlite:///{home / 'dopsd.db'}",
            broker_url="filesystem://",
            broker_dir=broker_dir,
            storage_backend="local",
            storage_dir=home / "artifacts",
            public_url="http://testserver",
            max_file_bytes=2 * 1024 * 1024,
            max_queued_per_key=6,
            rate_limit_per_minute=1000,
        )
