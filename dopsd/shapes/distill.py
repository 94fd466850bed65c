"""Step-distils the `shapes` base model into a 4-step student (issue 16: "the few-step model users tune").

Trajectory-segment distillation on the student's schedule `sigma_schedule(4)` = 1, .75, .5, .25, 0. The frozen base
is the teacher. Each step draws a batch from the pretraining data (half text-only captions, half in-context samples
whose references go to BOTH teacher and student through klein's edit branch, so the distilled model keeps the
in-context path D-OPSD later uses as its teacher) and fresh noise. From each segment's start state x at sigma s the
teacher runs its Euler ODE with `--teacher-substeps` substeps to the segment's end s'; the student is trained so that
ONE Euler step x + (s' - s) v lands there. The loss is in velocity units (the endpoint error divided by the segment
length): mean((v - (x_T' - x) / (s' - s))^2), averaged over the four segments and the two halves.

All four segments are trained every step, on every sample: the teacher's roll-out from noise is the dominant cost
(4 x substeps forwards without gradient against 4 student forwards with one), and one roll-out yields all four
segments' targets, whereas a random segment per sample would still pay for the roll-out up to that segment and train
one student step out of it.

The next segment starts from the teacher's end state (the teacher's trajectory) or, for a per-sample fraction
`--p-student-states`, from the student's own end state (detached: no back-propagation through time), since a distilled
model is evaluated on its own roll-outs; the teacher's target is then the teacher's ODE from the student's state.
Both cost the same. The default is 0 (the teacher's states); see docs/replication.md for what was measured.

The student starts as the base; its EMA (`--ema`, 0 turns it off) is what is saved, every `--save-every` steps, to
`--out/distilled.safetensors` (header: step, seed, the base's sha256, the student's sigmas) with a `.sha256` beside
it; the full state goes to `--state`, from which `--resume` continues bit for bit (the data of step k depends only on
(seed, k)). `--init W --start-step K` continues a run whose state is gone from its saved (EMA) weights, with a fresh
optimiser and new settings; the teacher stays `--base`. AdamW, lr 1e-4 (constant, or decaying linearly over the run's
last `--decay-steps` steps), grad clip 1.

    nice -n 10 python -m dopsd.shapes.distill --base dopsd/shapes/weights/base.safetensors --steps 2000
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dopsd.shapes.model import ShapesModel, load_model, save_model, sigma_schedule, to_pixels
from dopsd.shapes.train_base import decay_factor, in_context_batch, sha256, text_only_batch, update_ema


DEFAULT_OUT = Path(__file__).parent / "weights"
DEFAULT_STATE = Path("/tmp/dopsd-shapes-distill/state.pt")


@torch.no_grad()
def teacher_segment(
    teacher: ShapesModel,
    x: torch.Tensor,
    s: float,
    s_next: float,
    text: torch.Tensor,
    reference: torch.Tensor | None,
    substeps: int,
) -> torch.Tensor:
    """The teacher's Euler ODE from `x` at sigma `s` to `s_next` in `substeps` equal steps: the segment's end state."""
    return teacher.euler(x, np.linspace(s, s_next, substeps + 1).tolist(), text, reference)


def segment_losses(
    student: ShapesModel,
    teacher: ShapesModel,
    captions: Sequence[str],
    noise: torch.Tensor,
    on_policy: torch.Tensor,
    *,
    sigmas: Sequence[float],
    substeps: int,
    reference: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per-segment velocity-unit losses of one roll-out from `noise`; samples where the bool `on_policy` [B] is set
    start each next segment from the student's (detached) end state instead of the teacher's."""
    student_text, teacher_text = student.text.encode(captions), teacher.text.encode(captions)
    x, losses, keep = noise, [], on_policy.view(-1, 1, 1, 1)
    for s, s_next in itertools.pairwise(sigmas):
        target = teacher_segment(teacher, x, s, s_next, teacher_text, reference, substeps)
        v = student.velocity(x, torch.full((x.shape[0],), s, device=x.device), student_text, reference)
        losses.append(torch.mean((v - (target - x) / (s_next - s)) ** 2))
        x = torch.where(keep, (x + (s_next - s) * v).detach(), target)
    return losses


def step_batch(seed: int, step: int, batch: int) -> tuple[list[str], list[str], torch.Tensor]:
    """Step `step`'s captions: `batch // 2` text-only, the rest in-context, with the in-context references."""
    rng = np.random.default_rng([seed, 16, step])
    text_captions, _ = text_only_batch(rng, batch // 2)
    ctx_captions, _, refs = in_context_batch(rng, batch - batch // 2)
    return text_captions, ctx_captions, to_pixels(refs)


def distill_loss(
    student: ShapesModel, teacher: ShapesModel, args: argparse.Namespace, step: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Step `step`'s loss (mean of the text-only and in-context halves) and its parts for the log."""
    device = next(student.parameters()).device
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    text_captions, ctx_captions, refs = step_batch(args.seed, step, args.batch)
    sigmas = sigma_schedule(args.student_steps)
    parts = []
    for captions, reference in ((text_captions, None), (ctx_captions, refs.to(device))):
        noise = torch.randn(len(captions), *refs.shape[1:], generator=gen).to(device)
        on_policy = (torch.rand(len(captions), generator=gen) < args.p_student_states).to(device)
        losses = segment_losses(
            student,
            teacher,
            captions,
            noise,
            on_policy,
            sigmas=sigmas,
            substeps=args.teacher_substeps,
            reference=reference,
        )
        parts.append(losses)
    text_loss, ctx_loss = (torch.stack(p).mean() for p in parts)
    segments = [float((a + b).item()) / 2 for a, b in zip(*parts, strict=True)]
    return 0.5 * (text_loss + ctx_loss), {
        "loss_text": text_loss.item(),
        "loss_ref": ctx_loss.item(),
        "segments": segments,
    }


def train(args: argparse.Namespace) -> None:
    """The distillation loop (see the module docstring)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base_path = Path(args.base)
    base_sha = sha256(base_path)
    teacher = load_model(base_path).to(device).requires_grad_(False)
    student, ema = load_model(base_path).to(device).train(), load_model(base_path).to(device).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    step, state_path = 0, Path(args.state)
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=device)
        if state["base_sha256"] != base_sha:
            raise SystemExit(f"--state was distilled from base {state['base_sha256']}, not {base_sha}")
        student.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    elif args.init:
        init = load_model(Path(args.init))
        if init.config != student.config:
            raise SystemExit(f"--init weights have config {init.config}, not {student.config}")
        student.load_state_dict(init.state_dict())
        ema.load_state_dict(init.state_dict())
        step = args.start_step
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "distill-train.jsonl").open("a") as log:
        log.write(json.dumps({"event": "start", "step": step, "base_sha256": base_sha, **vars(args)}) + "\n")
        window: list[dict[str, Any]] = []
        while step < args.steps:
            t0 = time.perf_counter()
            loss, parts = distill_loss(student, teacher, args, step)
            lr = args.lr * decay_factor(step, args.steps, args.decay_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            update_ema(ema, student, step, args.ema)
            step += 1
            window.append({**parts, "s_per_step": time.perf_counter() - t0, "lr": lr})
            if step % args.log_every == 0 or step == args.steps:
                record: dict[str, object] = {"step": step}
                for key in ("loss_text", "loss_ref", "segments", "s_per_step", "lr"):
                    record[key] = np.mean([w[key] for w in window], axis=0).tolist()
                log.write(json.dumps(record) + "\n")
                log.flush()
                sys.stdout.write(json.dumps(record) + "\n")
                sys.stdout.flush()
                window = []
            if step % args.save_every == 0 or step == args.steps:
                save_checkpoint(student, ema, opt, step, base_sha, args, out, state_path)
                log.write(
                    json.dumps({"event": "checkpoint", "step": step, "sha256": sha256(out / "distilled.safetensors")})
                )
                log.write("\n")
                log.flush()


def save_checkpoint(
    student: ShapesModel,
    ema: ShapesModel,
    opt: torch.optim.Optimizer,
    step: int,
    base_sha: str,
    args: argparse.Namespace,
    out: Path,
    state_path: Path,
) -> None:
    """The EMA student (+ .sha256) to `out`, the full state to `state_path`, each written atomically."""
    weights = out / "distilled.safetensors"
    meta = {
        "step": step, "seed": args.seed, "base_sha256": base_sha, "sigmas": json.dumps(sigma_schedule(args.student_steps)),
        "teacher_substeps": args.teacher_substeps, "p_student_states": args.p_student_states, "ema": args.ema,
    }  # fmt: skip
    save_model(ema, weights, meta)
    tmp_hash = out / "distilled.safetensors.sha256.tmp"
    tmp_hash.write_text(f"{sha256(weights)}  distilled.safetensors\n")
    tmp_hash.replace(out / "distilled.safetensors.sha256")
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    state = {"student": student.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step}
    torch.save({**state, "base_sha256": base_sha}, tmp)
    tmp.replace(state_path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(DEFAULT_OUT / "base.safetensors"), help="the teacher and the student's init")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16, help="half text-only, half in-context")
    p.add_argument("--student-steps", type=int, default=4)
    p.add_argument("--teacher-substeps", type=int, default=8, help="teacher Euler steps per student segment")
    p.add_argument("--p-student-states", type=float, default=0.0, help="fraction of roll-outs on the student's states")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--decay-steps", type=int, default=0, help="decay the lr linearly over the last N steps (0: constant)"
    )
    p.add_argument("--ema", type=float, default=0.999, help="0 saves the raw student")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--state", default=str(DEFAULT_STATE))
    p.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    p.add_argument("--init", default=None, help="start the student and its EMA from these weights (when not resuming)")
    p.add_argument("--start-step", type=int, default=0, help="the step number a run from --init starts at")
    args = p.parse_args(argv)
    if (
        args.batch < 2
        or args.student_steps < 1
        or args.teacher_substeps < 1
        or not 0 <= args.p_student_states <= 1
        or args.decay_steps < 0
    ):
        p.error(
            "need --batch >= 2, --student-steps >= 1, --teacher-substeps >= 1, 0 <= --p-student-states <= 1, "
            "--decay-steps >= 0"
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: `python -m dopsd.shapes.distill [options]`."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
