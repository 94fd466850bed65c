"""`Maintenance`: the reaper, retention and the webhook sender on their clocks, each in a thread of its own, until
stopped. What `dopsd maintain` runs as its own process, and what the API starts inside itself in embedded mode."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.maintenance.reaper import Dispatch, purge_expired, reap_once
from core.maintenance.webhook_sender import PublicData, send_once
from core.storage import ArtifactStore


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaintenanceDeps:
    """Everything the passes use, given by whoever runs them."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    dispatch: Dispatch
    public_data: PublicData


class Maintenance:
    """Runs the passes in background threads: the reaper and retention every `reaper_interval_s`, the webhook
    sender every `webhook_poll_interval_s` (and again at once after a pass that had deliveries due). A failed pass
    is logged and the next one runs on time: no error stops maintenance."""

    def __init__(self, deps: MaintenanceDeps) -> None:
        self.deps = deps
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Starts the threads (once)."""
        if self._threads:
            raise RuntimeError("maintenance is already running")
        for name, loop in (("reaper", self._reaper_loop), ("webhooks", self._webhook_loop)):
            thread = threading.Thread(target=loop, name=f"maintenance-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Asks the threads to stop and waits up to `timeout_s` for the passes in flight to end (a webhook
        attempt in flight ends within `webhook_attempt_timeout_s`; a pass cut short is redone by the next process,
        as after a crash)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                logger.warning("maintenance: %s still busy after %.0f s; leaving it", thread.name, timeout_s)

    def _guarded(self, what: str, run: Callable[[], int]) -> int:
        try:
            return run()
        except Exception:
            logger.exception("%s pass failed", what)
            return 0

    def _reaper_loop(self) -> None:
        d = self.deps
        while not self._stop.wait(d.settings.reaper_interval_s):
            self._guarded("reaper", lambda: reap_once(settings=d.settings, sessions=d.sessions, dispatch=d.dispatch))
            self._guarded(
                "retention",
                lambda: purge_expired(
                    sessions=d.sessions,
                    store=d.store,
                    retention_days=d.settings.retention_days,
                    deletion_grace_s=d.settings.deletion_grace_s,
                ),
            )

    def _webhook_loop(self) -> None:
        d = self.deps
        while not self._stop.is_set():
            sent = self._guarded(
                "webhook", lambda: send_once(settings=d.settings, sessions=d.sessions, public_data=d.public_data)
            )
            if not sent:
                self._stop.wait(d.settings.webhook_poll_interval_s)
