"""Data-parallel D-OPSD on 2 CPU processes (gloo), launched as a user launches it: `dopsd train --num-processes 2`.

One 2-process run with a per-rank batch of 1 and one in-process run with a batch of 2 over the same samples and
steps: the same adapter within `ATOL` (measured, see its comment), identical replicas on both ranks, one set of
outputs. Then a run whose launcher is killed, resumed on 2 processes whose rank 1 is killed twice (torchrun restarts
the group once, then ends it), resumed once more on one process: no orphan process at any point, and the run ends
once, with the adapter of the uninterrupted run. About a minute of CPU in all (2 cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dopsd import DOPSDConfig, StepState, TrainerCallback, TrainerControl, train
from dopsd.checkpoint import FINGERPRINT_FILE, TrainerState, list_checkpoints, load_checkpoint, save_checkpoint
from dopsd.distributed import Group, join_group, state_digest
from dopsd.errors import CheckpointError
from dopsd.lora import LORA_WEIGHT_NAME
from tests.pace import PACE


STEPS = 16
LEARNING_RATE = 2e-3  # the tiny preset's
# Largest difference of any adapter weight between the 2-process run and the 1-process run after STEPS steps, as a
# fraction of the learning rate (AdamW moves a weight by about the learning rate per step, so this is a share of one
# step). Measured (fp32, one thread per process): 6.8e-6 = 0.0034 lr, for the 2-process run and for the run killed
# and resumed on one process alike, so ATOL leaves a margin of 15x; the losses agree to 1.0e-6 relative. The sums
# differ only in their order (a per-rank mean, then the mean of the ranks), amplified where AdamW divides a
# near-zero gradient by its own small moment.
ATOL = 0.05 * LEARNING_RATE


def run_settings(out: Path, example_dir: Path, **given: Any) -> dict[str, Any]:
    """The run both sides train: the example concept, STEPS steps, checkpoints every 2, one sample, no report."""
    return {
        "preset": "tiny-z-image",
        "instance_data_dir": str(example_dir),
        "captions": json.loads((example_dir / "captions.json").read_text()),
        "trigger": "sks",
        "output_dir": str(out),
        "max_train_steps": STEPS,
        "checkpointing_steps": 2,
        "validation_prompts": ["a photo of [V]"],
        "sample_seeds": [0],
        "gap_eval_seeds": 1,
        "eval_seeds": 0,
        **given,
    }


def cli_args(settings: dict[str, Any]) -> list[str]:
    """`dopsd train` flags for `run_settings`."""
    args = ["train", "--quiet"]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if name == "captions":
            continue
        args += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return [*args, "--captions", str(Path(settings["instance_data_dir"]) / "captions.json")]


def cli_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The in-process runs take one thread, as each rank does (torchrun's OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_adapter(a_path: Path, b_path: Path) -> float:
    """The two adapter files hold the same tensors within ATOL; returns the largest difference."""
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= ATOL, f"adapters differ by {worst:.3g} (> {ATOL:.3g})"
    assert any(float(v.abs().max()) > 100 * ATOL for k, v in a.items() if "lora_B" in k)  # it did learn
    return worst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> Path:
    """The reference: one process, batch 2, in this process."""
    out = tmp_path_factory.mktemp("one-process")
    with one_thread():
        train(DOPSDConfig.for_preset(**run_settings(out, example_dir, train_batch_size=2)))
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> subprocess.CompletedProcess[str]:
    """`dopsd train --num-processes 2` with a per-rank batch of 1 (and the report, which rank 0 alone writes)."""
    out = tmp_path_factory.mktemp("two-processes")
    settings = run_settings(out, example_dir, num_processes=2, eval_seeds=1)
    done = subprocess.run(
        [sys.executable, "-m", "dopsd", *cli_args(settings)],
        capture_output=True, text=True, env=cli_env(), timeout=PACE.patience_s * 4,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def output_of(done: subprocess.CompletedProcess[str]) -> Path:
    return Path(done.args[done.args.index("--output-dir") + 1])


def test_two_processes_learn_what_one_process_learns_on_their_global_batch(
    two_processes: subprocess.CompletedProcess[str], one_process: Path
) -> None:
    """Rank r trains items r, r + 2, ... of each step's one seeded order, with each item's own noise, and the ranks
    average their gradients: the adapter, the losses and the gap are a 1-process batch-2 run's."""
    out = output_of(two_processes)
    assert_same_adapter(out / LORA_WEIGHT_NAME, one_process / LORA_WEIGHT_NAME)
    two, one = (json.loads((p / "metrics.json").read_text()) for p in (out, one_process))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["teacher_student_gap"]["before"] == pytest.approx(one["teacher_student_gap"]["before"], rel=1e-6)
    assert two["distributed"]["global_batch_size"] == one["distributed"]["global_batch_size"] == 2
    assert (two["distributed"]["num_processes"], two["distributed"]["backend"]) == (2, "gloo")


def test_the_ema_teacher_and_the_student_are_identical_on_every_rank(
    two_processes: subprocess.CompletedProcess[str],
) -> None:
    """Each rank hashes its own adapters after the last step; rank 0 gathers the digests: bit for bit the same. The
    student's digest is the written adapter's, so the digests are of the weights the run trained."""
    out = output_of(two_processes)
    distributed = json.loads((out / "metrics.json").read_text())["distributed"]
    digests = distributed["replica_sha256"]
    assert set(digests) == {"student", "teacher"}
    assert len(digests["teacher"]) == len(digests["student"]) == 2
    assert len(set(digests["teacher"])) == 1 and len(set(digests["student"])) == 1
    assert distributed["replicas_identical"] is True
    written = {k.removeprefix("transformer."): v for k, v in load_file(out / LORA_WEIGHT_NAME).items()}
    assert state_digest(written) == digests["student"][0]
    assert digests["teacher"][0] != digests["student"][0]  # the EMA lags the student: two different states


def test_dopsd_train_with_two_processes_writes_one_set_of_outputs(
    two_processes: subprocess.CompletedProcess[str],
) -> None:
    """Rank 0 alone writes: one adapter, one report, one metrics.json, one set of samples, one summary printed."""
    out = output_of(two_processes)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "config.json", "metrics.json", LORA_WEIGHT_NAME, "pytorch_lora_weights_comfyui.safetensors",
        "report.json", "samples",
    ]  # fmt: skip
    assert [p.name for p in (out / "samples").iterdir()] == [f"step-{STEPS:08d}"]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000012", "step-00000014"]
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert two_processes.stdout.count("adapter: ") == 1 and two_processes.stdout.count("report: ") == 1
    assert DOPSDConfig.load(out / "config.json").num_processes == 2
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS


def test_a_config_asking_for_more_processes_than_run_it_is_refused(tmp_path: Path) -> None:
    """The library does not launch: a config for 2 processes in one process says how to launch it."""
    config = DOPSDConfig.for_preset("tiny-z-image", output_dir=str(tmp_path), num_processes=2)
    with pytest.raises(ValueError, match=r"num_processes is 2, but this run is one process.*--num-processes 2"):
        train(config)


def test_one_process_is_a_group_of_one() -> None:
    """With one process the group is the plain local step: the share is everything, nothing is reduced."""
    config = DOPSDConfig.for_preset("tiny-z-image")
    with join_group(config, torch.device("cpu")) as group:
        assert (group.rank, group.world_size, group.is_main, group.distributed) == (0, 1, True, False)
        noise = torch.randn(3, 2)
        items, rows = group.share(["a", "b", "c"], noise)
        assert items == ["a", "b", "c"] and torch.equal(rows, noise)
        assert group.on_main(lambda: 7) == 7 and group.average_gradients([], 0.5) == 0.5
    assert Group(rank=1, world_size=2).share([0, 1, 2, 3], torch.arange(4))[0] == [1, 3]


# -- killed processes -------------------------------------------------------------------------------------------------


class Steps(TrainerCallback):
    def __init__(self) -> None:
        self.start_step: int | None = None
        self.steps: list[int] = []

    def on_train_begin(self, total_steps: int, start_step: int) -> None:
        self.start_step = start_step

    def on_step_end(self, state: StepState) -> TrainerControl:
        self.steps.append(state.step)
        return TrainerControl()


def newest_step(out: Path) -> int:
    found = list_checkpoints(out / "checkpoints")
    return int(found[-1].name.removeprefix("step-")) if found else 0


def wait_for(done: Callable[[], bool], what: str, proc: subprocess.Popen[str]) -> None:
    """Waits until `done()` while `proc` runs, for the run's patience."""
    deadline = time.monotonic() + PACE.patience_s * 2
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def ranks_of(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launcher's rank processes by their RANK."""
    ranks = {}
    for child in launcher.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            env = child.environ()
            if "RANK" in env:
                ranks[int(env["RANK"])] = child
    return ranks


def assert_gone(processes: list[psutil.Process], what: str) -> None:
    """Every one of `processes` has ended (none left running, none a zombie), within the run's patience."""
    deadline = time.monotonic() + PACE.patience_s

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(alive(p) for p in processes):
        assert time.monotonic() < deadline, f"{what}: still running: {[p.pid for p in processes if alive(p)]}"
        time.sleep(0.05)


def start_group(settings: dict[str, Any], *extra: str) -> tuple[subprocess.Popen[str], psutil.Process]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dopsd", *cli_args(settings), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    return proc, psutil.Process(proc.pid)


def test_killed_processes_end_the_group_and_the_run_resumes_on_any_number_of_processes(
    tmp_path: Path, example_dir: Path, one_process: Path
) -> None:
    """1. SIGKILL to the launcher: its ranks die with it (PR_SET_PDEATHSIG), none is left.
    2. Resumed on 2 processes with `--max-restarts 1`, SIGKILL to rank 1 after one more checkpoint: torchrun starts
       the group again, which resumes from the newest checkpoint and goes on; SIGKILL to its rank 1 after one more
       checkpoint: no restart is left, so torchrun ends the group (exit 128 + 9, naming the rank and the checkpoint
       to resume); none of the processes is left, and no outputs.
    3. Resumed on ONE process with batch 2 (the same global batch): it starts at the newest checkpoint, runs each
       remaining step once, and ends with the uninterrupted run's adapter."""
    out = tmp_path / "out"
    two = run_settings(out, example_dir, num_processes=2)

    proc, launcher = start_group(two)
    wait_for(lambda: newest_step(out) >= 2 and len(ranks_of(launcher)) == 2, "the first checkpoint", proc)
    ranks = list(ranks_of(launcher).values())
    launcher.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=PACE.patience_s) == -signal.SIGKILL
    assert_gone(ranks, "ranks of a killed launcher")
    proc.communicate()
    first = newest_step(out)
    assert 2 <= first < STEPS and not (out / "metrics.json").exists()

    proc, launcher = start_group({**two, "resume_from": str(out)}, "--max-restarts", "1")
    wait_for(lambda: newest_step(out) > first and len(ranks_of(launcher)) == 2, "a checkpoint after the resume", proc)
    killed, at_kill = ranks_of(launcher), newest_step(out)
    killed[1].send_signal(signal.SIGKILL)

    def restarted() -> bool:
        ranks = ranks_of(launcher)
        return len(ranks) == 2 and not {p.pid for p in ranks.values()} & {p.pid for p in killed.values()}

    wait_for(lambda: restarted() and newest_step(out) > at_kill, "the restarted group's next checkpoint", proc)
    assert_gone(list(killed.values()), "the first group after a rank was killed")
    ranks = ranks_of(launcher)
    ranks[1].send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=PACE.patience_s)
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert f"restart 1 of the group: resuming from the newest checkpoint in {out}" in stderr
    assert "rank 1" in stderr and "killed by SIGKILL" in stderr and f"resume with --resume {out}" in stderr
    assert_gone([launcher, *ranks.values()], "the group after a rank was killed")
    second = newest_step(out)
    assert first < second < STEPS and not (out / "metrics.json").exists()

    steps = Steps()
    with one_thread():
        result = train(
            DOPSDConfig.for_preset(**run_settings(out, example_dir, train_batch_size=2, resume_from=str(out))), [steps]
        )
    assert steps.start_step == second and steps.steps == list(range(second + 1, STEPS + 1))
    assert result.metrics["steps"] == STEPS and len(result.metrics["loss"]) == STEPS
    assert_same_adapter(result.adapter_path, one_process / LORA_WEIGHT_NAME)


# -- the checkpoint's global batch ------------------------------------------------------------------------------------


def checkpoint_of(root: Path, config: DOPSDConfig) -> Path:
    weight = torch.nn.Parameter(torch.zeros(2))
    return save_checkpoint(
        root, state=TrainerState(step=1, data_rng=None), student={"w": weight.detach()}, teacher=None,
        optimizer=torch.optim.AdamW([weight]), noise_rng=torch.Generator().manual_seed(0), config=config, keep=2,
    )  # fmt: skip


def test_a_checkpoint_resumes_on_any_split_of_its_global_batch_and_refuses_another(tmp_path: Path) -> None:
    """The fingerprint holds the global batch, not the per-rank split: 2 x 1 x 2 resumes as 1 x 4 x 1 or 4 x 1 x 1,
    and a run of another global batch is refused naming it."""

    def config(**given: Any) -> DOPSDConfig:
        return DOPSDConfig.for_preset("tiny-z-image", output_dir=str(tmp_path), **given)

    path = checkpoint_of(tmp_path, config(num_processes=2, gradient_accumulation_steps=2))
    assert json.loads((path / FINGERPRINT_FILE).read_text())["global_batch_size"] == 4
    for split in ({"train_batch_size": 4}, {"num_processes": 4}, {"num_processes": 2, "train_batch_size": 2}):
        assert load_checkpoint(path, config(**split)).state.step == 1
    with pytest.raises(CheckpointError, match=r"global_batch_size \(4 in checkpoint, 2 now\)"):
        load_checkpoint(path, config(num_processes=2))


def test_a_fingerprint_from_before_the_global_batch_is_read_as_one_process(tmp_path: Path) -> None:
    """Checkpoints in flight across the upgrade hold `train_batch_size` and `gradient_accumulation_steps` instead:
    their global batch is the product (one process), so they resume, on one process or on several."""
    path = checkpoint_of(tmp_path, DOPSDConfig.for_preset("tiny-z-image", train_batch_size=2))
    old = json.loads((path / FINGERPRINT_FILE).read_text())
    del old["global_batch_size"]
    (path / FINGERPRINT_FILE).write_text(json.dumps({**old, "train_batch_size": 2, "gradient_accumulation_steps": 1}))
    assert load_checkpoint(path, DOPSDConfig.for_preset("tiny-z-image", num_processes=2)).state.step == 1
    with pytest.raises(CheckpointError, match="global_batch_size"):
        load_checkpoint(path, DOPSDConfig.for_preset("tiny-z-image"))
