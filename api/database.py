"""The API process's database sessions, every one of which holds a slot: a request's, an event stream's polls, the
readiness probe's, the metrics' and the start-up's. There are exactly as many slots as the engine's pool has
connections (`DOPSD_DATABASE_POOL_SIZE` + `DOPSD_DATABASE_MAX_OVERFLOW`), so no thread ever waits for a connection.

Why: FastAPI runs sync handlers, their sync dependencies and the validation of their responses in one pool of 40
threads. A session keeps its connection until it is closed, across those hops; if a thread could wait for a
connection while the session holding it waited for a thread, enough such threads (a burst of requests, streams'
polls, readiness probes) would stall every request for the pool's 30 s timeout, and then fail them. Slots are taken
in the event loop, holding nothing, before a session exists; so the sessions that exist never outnumber the
connections, and every thread that asks for one gets one at once.

Maintenance that the API runs in embedded mode has an engine (and pool) of its own, as `dopsd maintain` has.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import anyio.from_thread
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core.db import make_sessionmaker


T = TypeVar("T")
_SLOT = "dopsd_database_slot"


class Database:
    """Sessions of one engine, each holding one of `capacity` slots while it exists: `capacity` must be what the
    engine's pool may hold (`core.db.make_engine`'s `pool_size + max_overflow`). Made in the app's lifespan (its
    limiter belongs to the running event loop); `close()` at shutdown."""

    def __init__(self, engine: Engine, capacity: int, *, closer_threads: int = 4) -> None:
        self.engine = engine
        self.sessions = make_sessionmaker(engine)
        self.capacity = capacity
        self.slots = anyio.CapacityLimiter(capacity)
        # A session whose transaction is open is closed (a rollback on the server) in threads of its own, never in
        # the handlers' pool: closing must not wait for a thread while it holds a connection.
        self.closer = ThreadPoolExecutor(max_workers=closer_threads, thread_name_prefix="session-close")

    @property
    def in_use(self) -> int:
        """Slots held now (sessions open, or about to be)."""
        return int(self.slots.borrowed_tokens)

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot now."""
        return int(self.slots.statistics().tasks_waiting)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """A session in a slot (waiting for one in the event loop, holding nothing); closed and its slot given back
        on leaving, even when the caller was cancelled. Making it does no I/O: it connects on first use."""
        holder = object()
        await self.slots.acquire_on_behalf_of(holder)
        session = self.sessions()
        session.info[_SLOT] = (self, holder)
        try:
            yield session
        finally:
            with anyio.CancelScope(shield=True):  # closed also when the client went away
                if session.in_transaction():
                    await asyncio.get_running_loop().run_in_executor(self.closer, session.close)
                else:
                    session.close()  # nothing begun since the last commit: no connection, no I/O
                if session.info.pop(_SLOT, None) is not None:  # not given back early
                    self.slots.release_on_behalf_of(holder)

    async def run(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in the thread pool, with a session of its own in a slot, closed in the same thread (so
        its connection is back in the pool before the slot is)."""

        def call(session: Session) -> T:
            try:
                return work(session)
            finally:
                session.close()

        async with self.session() as session:
            return await run_in_threadpool(call, session)

    def close(self) -> None:
        """Waits for the sessions being closed, then closes the pool's connections."""
        self.closer.shutdown(wait=True)
        self.engine.dispose()


def end_early(session: Session) -> None:
    """Closes a session of `Database.session()` and gives its slot back, from a worker thread of the event loop (a
    handler whose response outlives it: an event stream opens short sessions of its own)."""
    session.close()
    held = session.info.pop(_SLOT, None)
    if held is not None:
        database, holder = held
        anyio.from_thread.run_sync(database.slots.release_on_behalf_of, holder)
