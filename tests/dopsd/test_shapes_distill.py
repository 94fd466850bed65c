"""Step distillation of the `shapes` base (dopsd/shapes/distill.py), on tiny models: the CLI's outputs, exact
resumption, a loss that falls, a frozen teacher, and references reaching both teacher and student."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from dopsd.shapes import distill
from dopsd.shapes.model import ShapesModel, ShapesModelConfig, load_model, save_model, sigma_schedule


TINY = ShapesModelConfig(heads=1, head_dim=32, double_layers=1, single_layers=1, text_dim=16)


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only contends on a loaded machine
    yield
    torch.set_num_threads(threads)  # distill.train sets its own thread count


@pytest.fixture
def base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "base.safetensors"
    save_model(ShapesModel(TINY).eval(), path, {"step": 7})
    return path


def _cli(base: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--base", str(base), "--steps", str(steps), "--batch", "4", "--teacher-substeps", "2", "--log-every", "1",
        "--save-every", "1", "--out", str(run / "out"), "--state", str(run / "state.pt"), "--resume", *extra,
    ]  # fmt: skip


def test_cli_writes_weights_hash_and_log(base: Path, tmp_path: Path) -> None:
    base_hash = hashlib.sha256(base.read_bytes()).hexdigest()
    distill.main(_cli(base, tmp_path, 2))
    out = tmp_path / "out"
    weights = out / "distilled.safetensors"
    assert (out / "distilled.safetensors.sha256").read_text().split() == [
        hashlib.sha256(weights.read_bytes()).hexdigest(),
        "distilled.safetensors",
    ]
    with safe_open(str(weights), framework="pt") as f:
        header = f.metadata()
    assert header["step"] == "2" and header["seed"] == "0" and header["base_sha256"] == base_hash
    assert json.loads(header["sigmas"]) == sigma_schedule(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert load_model(weights).config == TINY
    log = [json.loads(line) for line in (out / "distill-train.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["base_sha256"] == base_hash
    records = [r for r in log if "loss_text" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["loss_text"] > 0 and r["loss_ref"] > 0 and r["s_per_step"] > 0 and len(r["segments"]) == 4
    assert [r["step"] for r in log if r.get("event") == "checkpoint"] == [1, 2]
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_hash  # the teacher's file is left alone


def test_resume_equals_an_uninterrupted_run(base: Path, tmp_path: Path) -> None:
    extra = ("--p-student-states", "0.5", "--ema", "0.9")  # both segment-start paths and the EMA are resumed
    distill.main(_cli(base, tmp_path / "a", 3, *extra))
    distill.main(_cli(base, tmp_path / "b", 1, *extra))
    distill.main(_cli(base, tmp_path / "b", 3, *extra))
    a, b = (torch.load(tmp_path / r / "state.pt", weights_only=True) for r in ("a", "b"))
    for key in ("student", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    wa, wb = (load_model(tmp_path / r / "out" / "distilled.safetensors").state_dict() for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], load_model(base).state_dict()[k]) for k in wa)


def test_resume_refuses_another_base(base: Path, tmp_path: Path) -> None:
    distill.main(_cli(base, tmp_path, 1))
    other = tmp_path / "other.safetensors"
    save_model(ShapesModel(TINY).eval(), other)
    with pytest.raises(SystemExit, match="distilled from base"):
        distill.main(_cli(other, tmp_path, 2))


def test_distillation_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(3)
    teacher = ShapesModel(TINY).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    captions, *_ = distill.step_batch(0, 0, 4)
    noise = torch.randn(len(captions), 3, 16, 16)
    on_policy = torch.zeros(len(captions), dtype=torch.bool)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        loss = torch.stack(
            distill.segment_losses(student, teacher, captions, noise, on_policy, sigmas=sigma_schedule(4), substeps=4)
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-4  # one Euler step of the base is not its 4-substep ODE: there is a gap to close
    assert losses[-1] < 0.5 * losses[0], losses


def test_student_learns_and_teacher_stays_frozen(base: Path) -> None:
    args = distill.parse_args(["--base", str(base), "--batch", "4", "--teacher-substeps", "2"])
    teacher = load_model(base).requires_grad_(False)
    student = load_model(base).train()
    before_teacher, before_student = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss, _ = distill.distill_loss(student, teacher, args, 0)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())
    changed = [k for k, v in before_student.items() if not torch.equal(v, student.state_dict()[k])]
    assert any(k.startswith("transformer.") for k in changed) and any(k.startswith("text.") for k in changed)


def test_in_context_half_gives_its_references_to_teacher_and_student(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = distill.parse_args(["--base", str(base), "--batch", "4", "--teacher-substeps", "2"])
    teacher, student = load_model(base).requires_grad_(False), load_model(base)
    calls: dict[str, list[torch.Tensor | None]] = {"teacher": [], "student": []}
    for name, model in (("teacher", teacher), ("student", student)):
        original = model.velocity

        def spy(*a: Any, _name: str = name, _orig: Any = original, **kw: Any) -> torch.Tensor:
            calls[_name].append(a[3] if len(a) > 3 else kw.get("reference"))
            return _orig(*a, **kw)

        monkeypatch.setattr(model, "velocity", spy)
    distill.distill_loss(student, teacher, args, 0)
    _, _, refs = distill.step_batch(args.seed, 0, args.batch)
    assert len(calls["teacher"]) == 2 * 4 * 2 and len(calls["student"]) == 2 * 4  # halves x segments (x substeps)
    for name, per_half in (("teacher", 4 * 2), ("student", 4)):
        text_half, ctx_half = calls[name][:per_half], calls[name][per_half:]
        assert all(r is None for r in text_half)
        assert all(r is not None and torch.equal(r, refs) for r in ctx_half)


def test_init_continues_from_saved_weights_at_the_given_step(base: Path, tmp_path: Path) -> None:
    distill.main(_cli(base, tmp_path / "a", 1, "--ema", "0"))  # raw student after one step
    saved = tmp_path / "a" / "out" / "distilled.safetensors"
    run = tmp_path / "b"
    distill.main(_cli(base, run, 3, "--init", str(saved), "--start-step", "1"))
    log = [json.loads(line) for line in (run / "out" / "distill-train.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["step"] == 1
    records = [r for r in log if "loss_text" in r]
    assert [r["step"] for r in records] == [2, 3]
    args = distill.parse_args(["--base", str(base), "--batch", "4", "--teacher-substeps", "2"])
    torch.set_num_threads(1)
    _, parts = distill.distill_loss(load_model(saved), load_model(base), args, 1)
    assert records[0]["loss_text"] == pytest.approx(parts["loss_text"], rel=1e-5)  # the student began as `saved`
    assert records[0]["loss_ref"] == pytest.approx(parts["loss_ref"], rel=1e-5)


def test_init_refuses_weights_of_another_shape(base: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_model(
        ShapesModel(ShapesModelConfig(heads=1, head_dim=32, double_layers=1, single_layers=1, text_dim=8)), other
    )
    with pytest.raises(SystemExit, match="--init weights have config"):
        distill.main(_cli(base, tmp_path, 1, "--init", str(other)))


def test_a_decaying_run_logs_its_falling_learning_rate(base: Path, tmp_path: Path) -> None:
    distill.main(_cli(base, tmp_path, 3, "--lr", "3e-4", "--decay-steps", "3"))
    log = [json.loads(line) for line in (tmp_path / "out" / "distill-train.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if "loss_text" in r] == pytest.approx([3e-4, 2e-4, 1e-4])
