"""Where uploaded images are checked: a small pool of processes of their own (spawned, at a lower CPU priority), so
decoding never runs in the API process: not in its event loop, not in the thread pool that serves every other
route, and not in its memory. An API process has one pool, made on first use and shared by its apps.

A key runs at most one check at a time (`KeyedSerializer`); the slot is held until the process has finished the
check, even if the client hung up, so a key cannot queue work in the pool by disconnecting.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from api.image_checks import start_validation_process
from core.errors import ServiceUnavailable


T = TypeVar("T")


class ValidationPool:
    """`workers` spawned processes that run the image checks; a broken pool (a process killed) is replaced."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("spawn"),  # never fork a process with threads
                    initializer=start_validation_process,
                )
            return self._executor

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queues `fn(*args)` in a validation process."""
        return self._get().submit(fn, *args)

    def replace(self, broken: ProcessPoolExecutor | None = None) -> None:
        """Drops a broken executor; the next `submit` starts fresh processes."""
        with self._lock:
            if self._executor is not None and (broken is None or self._executor is broken):
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    def shutdown(self) -> None:
        """Stops the processes (after the checks they are running)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None


_POOLS: dict[int, ValidationPool] = {}
_POOLS_LOCK = threading.Lock()


def process_pool(workers: int) -> ValidationPool:
    """This process's pool of `workers` validation processes (one per size, made on first use)."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ValidationPool(workers)
        return _POOLS[workers]


class KeyedSerializer:
    """One check at a time per key: a key's next check waits until its previous one left the pool."""

    def __init__(self) -> None:
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._users: dict[uuid.UUID, int] = {}

    async def run(self, key_id: uuid.UUID, pool: ValidationPool, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` in `pool` once the key's previous check is done; raises `ServiceUnavailable`
        (`validation_unavailable`) if a validation process died (the pool is replaced for the next request)."""
        lock = self._locks.setdefault(key_id, asyncio.Lock())
        self._users[key_id] = self._users.get(key_id, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._forget(key_id)
            raise
        loop = asyncio.get_running_loop()
        try:
            future = pool.submit(fn, *args)
        except BaseException:
            self._release(key_id, lock)
            raise
        # Released when the process is done with it, not when this coroutine is: a client that hangs up does not
        # free its key's slot while its check still occupies a process.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, key_id, lock))
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            pool.replace()
            raise ServiceUnavailable(
                "image validation was interrupted; retry the request", code="validation_unavailable"
            ) from exc

    def _release(self, key_id: uuid.UUID, lock: asyncio.Lock) -> None:
        lock.release()
        self._forget(key_id)

    def _forget(self, key_id: uuid.UUID) -> None:
        self._users[key_id] -= 1
        if self._users[key_id] == 0:
            del self._users[key_id]
            del self._locks[key_id]
