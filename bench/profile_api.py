"""The API under uvicorn with cProfile in every thread of its process, timed by each thread's own CPU clock: where a
request's CPU goes, across the event loop and the thread pools that run sync handlers and close sessions (a profiler
of one thread, as pyinstrument is, misses the pools).

`python bench/profile_api.py --port N --out PREFIX` serves `api.main:create_app` like `scripts/stack.py`'s API.
SIGUSR1 starts a window (every thread's counts are reset), SIGUSR2 ends it and writes `PREFIX-K.txt` (K counts the
windows from 1): the CPU seconds, and the functions by cumulative and by own CPU time, merged over all threads.
`bench/service.py --profile PREFIX` does this around its polling runs.

Why this profiler: a sampler written in Python can only look at the other threads when it gets the GIL, which is
when they block, so it charges their CPU to their waits. A deterministic profiler sees every call; its timer is
`time.thread_time`, so time blocked on I/O, a lock or the GIL counts nothing. It slows calls down (the API serves
fewer requests while profiled), more so for code of many small Python calls than for C: read its shares, not its
throughput.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/profile_api.py` from anywhere


class _Snapshot:
    """What `pstats.Stats` reads: the stats of a profiler that still runs in its own thread (`create_stats` would
    disable the profiler of the calling thread instead)."""

    def __init__(self, profile: cProfile.Profile) -> None:
        profile.snapshot_stats()
        self.stats = profile.stats

    def create_stats(self) -> None:
        """Nothing to do: the stats were taken."""


class ThreadProfiles:
    """One cProfile per thread (the main thread's and every thread started later), reset and written on signals."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.window = 0
        self.started = time.monotonic()
        self.profiles: dict[str, cProfile.Profile] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        """Profiles this thread and each thread started from now on; windows open and close on SIGUSR1/SIGUSR2."""
        threading.setprofile(self._first_call)
        self._add()
        signal.signal(signal.SIGUSR1, lambda *_: self.reset())
        signal.signal(signal.SIGUSR2, lambda *_: self.write())

    def _add(self) -> None:
        profile = cProfile.Profile(time.thread_time)
        with self._lock:
            self.profiles[f"{threading.current_thread().name} {threading.get_ident()}"] = profile
        profile.enable()  # this thread's profile function from now on

    def _first_call(self, *_: Any) -> None:
        self._add()

    def reset(self) -> None:
        """Starts a window: every thread's counts from zero."""
        with self._lock:
            for profile in self.profiles.values():
                profile.clear()
        self.started = time.monotonic()

    def write(self) -> None:
        """Ends the window: `PREFIX-K.txt` with the CPU per thread kind and the top functions."""
        self.window += 1
        seconds = time.monotonic() - self.started
        with self._lock:
            snapshots = {name: _Snapshot(p) for name, p in self.profiles.items()}
        per_thread: dict[str, float] = {}
        merged: pstats.Stats | None = None
        for name, snapshot in snapshots.items():
            if not snapshot.stats:
                continue
            stats = pstats.Stats(snapshot)  # type: ignore[arg-type]
            kind = name.rsplit(" ", 1)[0].rstrip("0123456789_- ")
            per_thread[kind] = per_thread.get(kind, 0.0) + stats.total_tt  # type: ignore[attr-defined]
            if merged is None:
                merged = stats
            else:
                merged.add(stats)
        total = sum(per_thread.values())
        out = io.StringIO()
        out.write(f"window {self.window}: {seconds:.1f} s, profiled CPU {total:.2f} s\n\nCPU by thread:\n")
        for kind, spent in sorted(per_thread.items(), key=lambda kv: -kv[1]):
            out.write(f"  {100 * spent / max(total, 1e-9):5.1f}%  {spent:7.2f} s  {kind}\n")
        if merged is not None:
            merged.stream = out  # type: ignore[attr-defined]
            out.write("\nby cumulative CPU (cumtime), merged over threads:\n")
            merged.sort_stats("cumulative").print_stats(90)
            out.write("\nby own CPU (tottime):\n")
            merged.sort_stats("tottime").print_stats(50)
        Path(f"{self.prefix}-{self.window}.txt").write_text(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    """Serves the API with every thread profiled."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True, help="path prefix of the reports")
    args = parser.parse_args(argv)
    ThreadProfiles(args.out).install()
    uvicorn.run("api.main:create_app", factory=True, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
