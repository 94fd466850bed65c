"""One D-OPSD run on many processes: data-parallel over the student LoRA, launched by torch's elastic launcher.

Each rank holds the whole model with both adapters and trains on its share of every step: the step's samples come
from one seeded order that every rank draws alike (`_Batches` in the trainer, with the noise of every sample), and
rank r takes items r, r + W, ... of it (`Group.share`). After the backward passes the ranks average the student's
gradients with one all-reduce (`Group.average_gradients`), so every rank clips, steps AdamW and moves the EMA
teacher on identical numbers and the replicas stay identical without ever being copied (checked at the end of a run:
`Group.replica_digests`). A 2-process run with a per-rank batch of 1 therefore computes what a 1-process run with a
batch of 2 computes, up to the order of floating-point sums.

Rank 0 alone does the work that is done once (the teacher gate, the gap, samples, checkpoints, the report, the
outputs) and talks to the callbacks; the other ranks wait for it in `Group.on_main`, which hands them its result or
raises its error on every rank, so all ranks leave a run the same way (one exit code for the group). Control
messages go over a gloo group with a long timeout (`CONTROL_TIMEOUT`), so waiting for rank 0's report never trips
NCCL's watchdog.

The launcher is `torch.distributed.run` (torchrun) through its Python API (`launch`): no new dependency, a standalone
rendezvous on one machine, torchrun's own multi-node rendezvous across machines, and elastic restarts (a restarted
group resumes from the newest checkpoint: `resume_after_restart`). A rank knows it is one from RANK, WORLD_SIZE and
LOCAL_RANK; each rank dies with its launcher (`die_with_parent`), so a killed launcher leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import logging
import os
import pickle
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dopsd.callbacks import TrainerControl
from dopsd.config import DOPSDConfig


logger = logging.getLogger(__name__)
T = TypeVar("T")
P = TypeVar("P")

CONTROL_TIMEOUT = datetime.timedelta(hours=1)  # rank 0's report or samples may keep the others waiting this long
GRADIENT_BUCKET = 32 * 1024 * 1024  # elements per all-reduce: 128 MiB of fp32, not one copy of every gradient
EXIT_CODES = (0, 2, 3, 130)  # the codes `dopsd train` ends with itself (done, bad input, teacher blind, stopped)


def world_size_from_env() -> int:
    """WORLD_SIZE as the launcher set it (1 outside a launched group)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """RANK as the launcher set it (0 outside a launched group)."""
    return int(os.environ.get("RANK", "0"))


def local_rank_from_env() -> int:
    """LOCAL_RANK as the launcher set it: this rank's place on its machine, and so its GPU (0 outside a group)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def in_launched_group() -> bool:
    """Whether this process is one rank of a launched group of more than one process."""
    return world_size_from_env() > 1


def global_batch_size(num_processes: int, train_batch_size: int, gradient_accumulation_steps: int) -> int:
    """Samples per optimizer step: every rank's micro-batches over every accumulation step."""
    return num_processes * train_batch_size * gradient_accumulation_steps


def resume_after_restart(config: DOPSDConfig) -> DOPSDConfig:
    """The config of a group that torchrun restarted after a failure (TORCHELASTIC_RESTART_COUNT > 0): it resumes
    from the newest checkpoint in `output_dir` when one is there, instead of starting the run over."""
    from dopsd.checkpoint import list_checkpoints

    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and list_checkpoints(Path(config.output_dir) / "checkpoints"):
        logger.warning(
            "restart %d of the group: resuming from the newest checkpoint in %s", restarts, config.output_dir
        )
        return config.with_changes(resume_from=config.output_dir)
    return config


@dataclass
class Group:
    """The ranks of one run as this process sees them; with one process every method is the plain local step.

    `rank` / `world_size` / `local_rank` come from the launcher's environment; `interrupted` is set by a first
    SIGINT on a rank other than 0 (rank 0's callbacks decide for it), and stops the run at the next step on every
    rank, with a checkpoint, as a stop asked by a callback does.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    control_group: Any = None  # the gloo group of control messages (None: the default group is gloo already)
    interrupted: bool = False
    _others_wait: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the rank that reports, writes and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains this run."""
        return self.world_size > 1

    def device_for(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (LOCAL_RANK) where the run uses CUDA."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    # -- the data: one order, a share per rank ------------------------------------------------------------------

    def share(self, items: Sequence[T], noise: torch.Tensor) -> tuple[list[T], torch.Tensor]:
        """This rank's share of a micro-step drawn for all ranks: items r, r + W, ... and their noise rows, so a
        sample's noise depends on its place in the global order, never on the rank that trains it."""
        if len(items) % self.world_size or noise.shape[0] != len(items):
            raise ValueError(f"{len(items)} samples do not split over {self.world_size} ranks")
        return list(items[self.rank :: self.world_size]), noise[self.rank :: self.world_size]

    # -- rank 0's work, and what the others learn of it --------------------------------------------------------

    def on_main(self, work: Callable[[], T]) -> T:
        """`work()` on rank 0, its result on every rank; an error it raises is raised on every rank."""
        if not self.distributed:
            return work()
        message: list[Any] = [None]
        if self.is_main:
            try:
                message[0] = ("ok", work())
            except BaseException as exc:
                self._broadcast([("error", _portable(exc))])
                raise
        self._broadcast(message)
        return _unwrap(message[0])

    def control(self, answer: Callable[[], TrainerControl]) -> TrainerControl:
        """Rank 0's callbacks' answer after a step (`answer()`, run there alone), with a stop where any rank was
        interrupted: every rank takes the same decision."""
        control = self.on_main(answer)
        if self.distributed:
            flags: list[Any] = [None] * self.world_size
            dist.all_gather_object(flags, self.interrupted, group=self.control_group)
            control = TrainerControl(should_stop=control.should_stop or any(flags), should_save=control.should_save)
        return control

    def main_only(self) -> bool:
        """From here on rank 0 works alone (the outputs) and the others wait for its result: True on rank 0."""
        if self.is_main and self.distributed:
            self._others_wait = True
        return self.is_main

    def main_result(self) -> Any:
        """On a rank other than 0: rank 0's result after `main_only` (or its error, raised here)."""
        message: list[Any] = [None]
        self._broadcast(message)
        return _unwrap(message[0])

    def share_outcome(self, work: Callable[[], T]) -> T:
        """Runs `work` (the whole run); on rank 0, once the others wait (`main_only`), hands them its result or
        its error."""
        try:
            result = work()
        except BaseException as exc:
            if self._others_wait:
                self._others_wait = False
                self._broadcast([("error", _portable(exc))])
            raise
        if self._others_wait:
            self._others_wait = False
            self._broadcast([("ok", result)])
        return result

    def _broadcast(self, message: list[Any]) -> None:
        dist.broadcast_object_list(message, src=0, group=self.control_group)

    # -- the tensors -------------------------------------------------------------------------------------------

    def average_gradients(self, params: Sequence[torch.nn.Parameter], loss: float) -> float:
        """Replaces every parameter's gradient by the mean over the ranks (in place, before clipping) and returns
        the mean of the ranks' losses. A parameter without a gradient on some rank counts as zero there; one
        without a gradient on every rank keeps none (AdamW then skips it, as a single process would)."""
        if not self.distributed or not params:
            return loss
        device = params[0].device
        flags = torch.tensor([float(p.grad is not None) for p in params] + [loss], dtype=torch.float64, device=device)
        dist.all_reduce(flags)
        for p, has in zip(params, flags[:-1].tolist(), strict=True):
            if has and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(part.view_as(g))
        return float(flags[-1]) / self.world_size

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (a step's loss, where the gradients were averaged elsewhere)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, group=self.control_group)
        return float(total) / self.world_size

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Copies rank 0's values of `params` to every rank (the adapters at the start, so all ranks begin alike
        whatever each one's random init did)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for bucket in _buckets([p.data for p in params]):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.broadcast(flat, src=0)
                for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
                    t.copy_(part.view_as(t))

    def replica_digests(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, list[str]] | None:
        """SHA-256 of each named state (`student`, `teacher`; an empty one is left out) on every rank, gathered on
        rank 0 (`None` elsewhere, and with one process): equal digests prove the replicas identical, bit for bit."""
        if not self.distributed:
            return None
        mine = {name: state_digest(tensors) for name, tensors in states.items() if tensors}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.control_group)
        if not self.is_main:
            return None
        return {name: [g[name] for g in gathered] for name in mine}

    def summary(self, digests: dict[str, list[str]] | None, *, batch: int) -> dict[str, Any]:
        """What `metrics.json` says of the run's processes: their number, backend, the global batch, and each
        adapter's digest on every rank with whether they agree."""
        identical = None if digests is None else all(len(set(v)) == 1 for v in digests.values())
        return {
            "num_processes": self.world_size,
            "backend": self.backend,
            "global_batch_size": batch,
            "replica_sha256": digests,
            "replicas_identical": identical,
        }


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """`tensors` in consecutive groups of at most `GRADIENT_BUCKET` elements (a larger tensor alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > GRADIENT_BUCKET:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_RELAYED = "_dopsd_relayed_from_rank_0"


def relayed_from_main(exc: BaseException) -> bool:
    """Whether `exc` is rank 0's error raised again on this rank (`Group.on_main`, `share_outcome`): rank 0 has
    it too and decides what becomes of the run, so this rank need not report it. Any other error on a rank other
    than 0 is its own, and only it knows of it."""
    return bool(getattr(exc, _RELAYED, False))


def _rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    setattr(exc, _RELAYED, True)
    return exc


def _portable(exc: BaseException) -> tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]:
    """An exception as (type, args, attributes): rebuilt on the other ranks without calling its `__init__` (ours
    take other arguments than they pass on), so they raise the same type and exit with the same code."""
    parts = (type(exc), exc.args, dict(vars(exc)))
    try:
        pickle.loads(pickle.dumps(parts))
    except Exception:
        return (RuntimeError, (f"{type(exc).__name__} on rank 0: {exc}",), {})
    return parts


def _unwrap(message: Any) -> Any:
    kind, value = message
    if kind == "error":
        raise _rebuild_exception(*value)
    return value


# -- joining the group ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def join_group(config: DOPSDConfig, device: torch.device) -> Iterator[Group]:
    """The group this process trains `config` in. Outside a launched group that is this process alone, and a
    config asking for more processes is refused (`ValueError`: `dopsd train` launches them; a library caller uses
    torchrun). Inside one (WORLD_SIZE > 1) its size must be the config's `num_processes`; the process group is
    initialised here (nccl on CUDA, gloo on the CPU) unless the caller did, and destroyed on the way out if so."""
    world = world_size_from_env()
    if world != config.num_processes:
        where = f"a launched group of {world} processes" if world > 1 else "one process"
        raise ValueError(
            f"num_processes is {config.num_processes}, but this run is {where}: launch it with "
            f"`dopsd train --num-processes {config.num_processes}` or torchrun --nproc-per-node "
            f"{config.num_processes} (docs/distributed.md)"
        )
    if world == 1:
        yield Group()
        return
    rank, local_rank = rank_from_env(), local_rank_from_env()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if cuda else "gloo"
        timeout = None if cuda else CONTROL_TIMEOUT
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if cuda else None)
    backend = str(dist.get_backend())
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if backend != "gloo" else None
    die_with_parent()
    group = Group(rank=rank, world_size=world, local_rank=local_rank, backend=backend, control_group=control)
    restore = _stop_on_interrupt(group)
    try:
        yield group
    finally:
        restore()
        if created:
            dist.destroy_process_group()


def die_with_parent() -> None:
    """Asks Linux to kill this rank when its launcher dies (PR_SET_PDEATHSIG): a launcher killed with SIGKILL has
    no chance to stop its ranks, and they would otherwise train on as orphans."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _stop_on_interrupt(group: Group) -> Callable[[], None]:
    """On a rank other than 0, a first SIGINT (torchrun passes a Ctrl-C on to every rank) asks for a stop at the
    next step, which every rank then takes together; a second one interrupts at once. Rank 0's own callbacks
    decide for it (the CLI's does the same). Returns the function that puts the previous handler back."""
    if group.is_main or threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return lambda: None

    def interrupt(*_: object) -> None:
        if group.interrupted:
            raise KeyboardInterrupt
        group.interrupted = True

    signal.signal(signal.SIGINT, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGINT, previous)

    return restore


# -- the launcher -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupOutcome:
    """How a launched group ended: its exit code (0, or the failing rank's code; 128 + N for a rank killed by
    signal N, as a shell says it) and, on a failure, a line that says which rank failed and how."""

    exit_code: int
    message: str | None = None


def torchrun_command(num_processes: int, module: str, args: Sequence[str], *, max_restarts: int = 0) -> list[str]:
    """The torchrun command line that runs `python -m <module> <args>` as `num_processes` ranks of one group on
    this machine (a standalone rendezvous on a free port), for a supervisor that starts the launcher as a process
    of its own (the service's worker). Run it with `launcher_env()` added to the environment."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
        f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "-m", module, *args,
    ]  # fmt: skip


def launcher_env(*, max_restarts: int) -> dict[str, str]:
    """What the launcher's environment needs for this trainer's groups: one OpenMP thread per rank unless set, and
    with restarts a fresh rendezvous store per restart (a restarted group must not reuse the launcher's store: its
    keys outlive the group, and a new rank may read the old one's address and fail to connect; pytorch/pytorch
    #135712, #167288)."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if max_restarts:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def launch(num_processes: int, argv: Sequence[str], *, max_restarts: int = 0) -> GroupOutcome:
    """Runs `python -m dopsd <argv>` as `num_processes` ranks of one group on this machine through torch's elastic
    launcher (torchrun's standalone rendezvous) and waits for the group. A rank that fails ends the group (the
    others get SIGTERM, then SIGKILL after torchrun's shutdown timeout); with `max_restarts`, torchrun starts the
    group again that many times, and a restarted group resumes from its newest checkpoint."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.update(launcher_env(max_restarts=max_restarts))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", "dopsd", *argv)
    except ChildFailedError as exc:
        return _failed(exc.failures)
    except SignalException as exc:  # this launcher was told to stop: torchrun has passed the signal on to the ranks
        return GroupOutcome(128 + int(exc.sigval), f"the launcher got {signal.Signals(exc.sigval).name}")
    return GroupOutcome(0)


def _failed(failures: Mapping[int, Any]) -> GroupOutcome:
    """The group's exit code from its failed ranks, by the likeliest cause: a rank killed by a signal other than
    the SIGTERM torchrun stops the others with (SIGKILL: the OOM killer or a user; SIGSEGV), then rank 0's code (all
    ranks leave a run alike, so it speaks for them; a crash there), then the lowest rank's."""

    def cause(rank: int) -> tuple[int, int]:
        code = int(failures[rank].exitcode)
        if code < 0:
            return (0 if code != -signal.SIGTERM else 3, rank)
        return (1 if rank == 0 else 2, rank)

    rank = min(failures, key=cause)
    failure = failures[rank]
    code = int(failure.exitcode)
    if code < 0:
        name = signal.Signals(-code).name
        return GroupOutcome(128 - code, f"rank {rank} (pid {failure.pid}) was killed by {name}; the group stopped")
    return GroupOutcome(code, f"rank {rank} (pid {failure.pid}) exited with code {code}; the group stopped")
