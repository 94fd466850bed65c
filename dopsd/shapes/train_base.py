"""Pretrains the `shapes` base model (rectified flow), seeded, resumable, logging JSON lines.

Each step draws a fresh batch from the world, half text-only and half in-context:
- text-only: a base shape, its caption ("a red circle on a blue background"), no reference;
- in-context: a reference of the same shape at the same place and size in other colours, in klein's edit branch.
  Half of these are random polygons captioned "object"; for the base shapes the shape word is replaced by "object"
  half the time. In both cases only the reference says which shape to draw, so copying it is what is learned.
The new concept and the trigger word never appear. The data of step `k` depends only on (seed, k), so a resumed
run sees exactly the batches an uninterrupted one would.

Checkpoints: the EMA weights (what the gates measure) go to `--out/base.safetensors` with a `.sha256` beside it,
every `--save-every` steps (only the latest is kept); the full training state (weights, EMA, optimiser, step) goes
to `--state`, from which `--resume` continues. `--init` starts a run from saved weights (model and EMA) with a fresh
optimiser: how the committed base continued after the world's references were aligned with their targets, and how
it was annealed at the end (`--decay-steps`: after a constant phase, the lr falls linearly over the run's last N
steps to lr / N at the last one; warmup-stable-decay). `--reference-shift` / `--p-reference-shift` move (a fraction of) the
references off their targets, for a teacher whose drawing depends on the noise (docs/replication.md).

    nice -n 19 python -m dopsd.shapes.train_base --steps 20000 --threads 1 > /tmp/shapes-base.log 2>&1 &
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dopsd.shapes import world
from dopsd.shapes.model import ShapesModel, ShapesModelConfig, load_model, save_model, to_pixels


DEFAULT_OUT = Path(__file__).parent / "weights"
DEFAULT_STATE = Path("/tmp/dopsd-shapes-base/state.pt")


def text_only_batch(rng: np.random.Generator, n: int) -> tuple[list[str], list[np.ndarray]]:
    """`n` base-shape scenes: their captions and renders."""
    scenes = [world.sample_scene(rng) for _ in range(n)]
    return [s.caption() for s in scenes], [world.render(s) for s in scenes]


def in_context_batch(
    rng: np.random.Generator,
    n: int,
    p_object: float = 0.5,
    p_neutral: float = 0.5,
    shift: float = 0.0,
    p_shift: float = 1.0,
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """`n` in-context samples: captions, target renders and reference renders (same shape and place, other
    colours; with `shift` > 0, a fraction `p_shift` of them moved by up to `shift` px, see `world.reference_for`).
    A fraction `p_object` are random polygons; a base shape's word becomes "object" with `p_neutral`."""
    captions, targets, refs = [], [], []
    for _ in range(n):
        shape = world.OBJECT if rng.random() < p_object else None
        scene = world.sample_scene(rng, shape)
        neutral = scene.shape == world.OBJECT or rng.random() < p_neutral
        captions.append(scene.caption(world.OBJECT if neutral else None))
        targets.append(world.render(scene))
        moved = shift > 0 and (p_shift >= 1 or rng.random() < p_shift)
        refs.append(world.render(world.reference_for(rng, scene, shift if moved else 0.0)))
    return captions, targets, refs


def flow_loss(
    model: ShapesModel,
    captions: Sequence[str],
    x0: torch.Tensor,
    generator: torch.Generator,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow loss in klein's convention: x_s = (1 - s) x0 + s noise, target v = noise - x0, logit-normal s.
    Noise comes from the CPU `generator` whatever the device, so a run's draws do not depend on where it runs."""
    device = x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator)).to(device)
    reference = None if reference is None else reference.to(device)
    s = sigma.view(-1, 1, 1, 1)
    xs = (1 - s) * x0 + s * noise
    v = model.velocity(xs, sigma, model.text.encode(captions), reference)
    return torch.mean((v - (noise - x0)) ** 2)


def decay_factor(step: int, steps: int, decay_steps: int) -> float:
    """The lr's multiplier at `step` of a run ending at `steps` (warmup-stable-decay): 1 until the last
    `decay_steps` steps, then linearly down to 1 / `decay_steps` at the last step; always 1 when `decay_steps` is 0."""
    return min(1.0, (steps - step) / decay_steps) if decay_steps else 1.0


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, rate: float) -> None:
    """Moves `ema`'s weights towards `model`'s after step `step`, at `rate` once warmed up (the early steps use a
    smaller rate, (1 + step) / (10 + step), so the average is not dominated by the initial weights)."""
    decay = min(rate, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1 - decay)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(args: argparse.Namespace) -> None:
    """The training loop (see the module docstring)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = ShapesModelConfig(
        heads=args.heads, head_dim=args.head_dim, double_layers=args.double_layers, single_layers=args.single_layers
    )
    device = torch.device(args.device)
    model = ShapesModel(config).to(device)
    ema = ShapesModel(config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    step = 0
    state_path = Path(args.state)
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        args.start_step = int(state.get("start_step", 0))
    elif args.init:
        init = load_model(Path(args.init))
        if init.config != config:
            raise SystemExit(f"--init weights have config {init.config}, not {config}")
        model.load_state_dict(init.state_dict())
        ema.load_state_dict(init.state_dict())
        step = args.start_step
    out = Path(args.out)
    log_path = out / "base-train.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    half = args.batch // 2
    with log_path.open("a") as log:
        log.write(json.dumps({"event": "start", "step": step, "params": n_params, **vars(args)}) + "\n")
        window: list[tuple[float, float, float]] = []
        while step < args.steps:
            t0 = time.perf_counter()
            rng = np.random.default_rng([args.seed, step])
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            captions, images = text_only_batch(rng, half)
            loss_text = flow_loss(model, captions, to_pixels(images).to(device), gen)
            captions, images, refs = in_context_batch(
                rng, args.batch - half, shift=args.reference_shift, p_shift=args.p_reference_shift
            )
            loss_ref = flow_loss(model, captions, to_pixels(images).to(device), gen, to_pixels(refs))
            loss = 0.5 * (loss_text + loss_ref)
            lr = args.lr * min(1.0, (step + 1 - args.start_step) / args.warmup)
            lr *= decay_factor(step, args.steps, args.decay_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            update_ema(ema, model, step, args.ema)
            step += 1
            window.append((loss_text.item(), loss_ref.item(), time.perf_counter() - t0))
            if step % args.log_every == 0 or step == args.steps:
                lt, lr_, dt = (float(np.mean(col)) for col in zip(*window, strict=True))
                record = {"step": step, "loss_text": lt, "loss_ref": lr_, "s_per_step": dt, "lr": lr}
                log.write(json.dumps(record) + "\n")
                log.flush()
                sys.stdout.write(json.dumps(record) + "\n")
                sys.stdout.flush()
                window = []
            if step % args.save_every == 0 or step == args.steps:
                save_checkpoint(model, ema, opt, step, args, out, state_path)
                log.write(
                    json.dumps({"event": "checkpoint", "step": step, "sha256": sha256(out / "base.safetensors")})
                )
                log.write("\n")
                log.flush()


def save_checkpoint(
    model: ShapesModel,
    ema: ShapesModel,
    opt: torch.optim.Optimizer,
    step: int,
    args: argparse.Namespace,
    out: Path,
    state_path: Path,
) -> None:
    """The EMA weights (+ .sha256) to `out`, the full state to `state_path`, each written atomically."""
    weights = out / "base.safetensors"
    save_model(ema, weights, {"step": step, "seed": args.seed, "ema": args.ema})
    (out / "base.safetensors.sha256").write_text(f"{sha256(weights)}  base.safetensors\n")
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "start_step": args.start_step,
        },
        tmp,
    )
    tmp.replace(state_path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults are the committed run's)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=32, help="half text-only, half in-context")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--decay-steps", type=int, default=0,
                   help="decay the lr linearly over the run's last N steps (0: constant after warmup)")  # fmt: skip
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--double-layers", type=int, default=2)
    p.add_argument("--single-layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="e.g. cuda on a lent GPU (fp32 either way)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--state", default=str(DEFAULT_STATE))
    p.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    p.add_argument("--init", default=None, help="start from these saved weights (when not resuming)")
    p.add_argument("--start-step", type=int, default=0, help="the step number a run from --init starts at")
    p.add_argument("--reference-shift", type=float, default=0.0,
                   help="move in-context references by up to this many px from their targets (0: aligned)")  # fmt: skip
    p.add_argument("--p-reference-shift", type=float, default=1.0,
                   help="the fraction of in-context references --reference-shift moves (the rest stay aligned)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: `python -m dopsd.shapes.train_base [options]`."""
    args = parse_args(argv)
    if not math.isfinite(args.lr) or args.batch < 2 or args.decay_steps < 0 or not 0 <= args.p_reference_shift <= 1:
        raise SystemExit("--lr must be finite, --batch >= 2, --decay-steps >= 0 and 0 <= --p-reference-shift <= 1")
    train(args)


if __name__ == "__main__":
    main()
