"""Generation latency and throughput through `dopsd.generation.Generator`, side by side in one run on one preset.

Latency of one request of one image (prompt to PIL image); every figure below is timed round by round, interleaved
(a shared machine's drift hits all alike), as medians of wall time and of process CPU time (`cpu_*`):
- `base`: no adapter (the floor);
- `warm`: an adapter already in the generator's LRU (loaded into the transformer from memory, rendered, unloaded);
- `first use`: an adapter the LRU has not seen (a new name each round: its file read and converted, then as warm;
  `read_s` times the read alone, diffusers' `lora_state_dict` of the file);
- `cold worker`: a freshly loaded family (base pipeline + teacher encoder, as the worker's model cache loads it),
  a new `Generator` and the first request with an adapter (`cold_load_s`: the load alone). The process's imports
  are reported apart (`import_s`, a fresh interpreter importing the engine): a worker pays them once at start.
Throughput: one request of `--batch` images (two prompts x batch/2 seeds) with a warm adapter, `max_batch=batch`
(one pipeline call) against `max_batch=1` (batch calls); images/s and the ratio, and the largest pixel difference
between the two renderings in 0-255 units (the batching tolerance `dopsd.generation` states).

Adapter: made on the loaded family with the preset's rank and alpha (a fresh peft LoRA with random B, saved by
the trainer's writer `family.save_lora_weights`); its file is on local disk (a worker fetches it from storage
first; that transfer is not in these figures).

`python bench/generation.py [--preset tiny-z-image] [--repeats 5] [--batch 4] [--threads 1]`; `--quick` for the
test suite; `--gpu` for Z-Image-Turbo at 1024x1024, 8 steps, bf16 on CUDA with real weights from `--base DIR`
(and `--teacher DIR`, the Qwen3-VL the family loads); without CUDA it prints an unmeasured record and exits 0.
Prints a table, then ONE JSON line last.
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/generation.py`
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import gc
import json
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.utils import get_peft_model_state_dict

from bench.common import timed
from dopsd.generation import AdapterSpec, GenerationRequest, GenerationSettings, Generator
from dopsd.lora import make_lora_config
from dopsd.models.base import ModelFamily
from dopsd.models.loading import load_family
from dopsd.presets import Preset, get_preset


PROMPTS = ("a photo of sks dog on a wooden bench in a park", "a watercolor painting of sks dog")


@dataclass(frozen=True)
class Setup:
    """What one run measures on."""

    preset: Preset
    base: str
    teacher: str | None
    device: torch.device
    dtype: torch.dtype
    width: int
    height: int
    steps: int
    guidance: float


def setup_for(args: argparse.Namespace) -> Setup:
    """The preset, weights, device and render settings the arguments ask for."""
    preset = get_preset("z-image-turbo" if args.gpu else args.preset)
    cuda = args.gpu or preset.device == "cuda"
    side = 1024 if args.gpu else int(preset.defaults["resolution"])
    width, height = (int(x) for x in args.size.split("x")) if args.size else (side, side)
    return Setup(
        preset=preset,
        base=args.base or preset.base_model,
        teacher=args.teacher or preset.teacher_encoder,
        device=torch.device("cuda" if cuda else "cpu"),
        dtype=torch.bfloat16 if cuda else torch.float32,
        width=width,
        height=height,
        steps=args.steps or preset.native_sample_steps,
        guidance=preset.native_guidance_scale,
    )


def load(setup: Setup) -> ModelFamily:
    """The family as the worker's model cache loads it (base pipeline and teacher encoder)."""
    preset = setup.preset
    return load_family(
        preset, base=setup.base, teacher=setup.teacher, device=setup.device, dtype=setup.dtype,
        teacher_min_pixels=int(preset.defaults["teacher_min_pixels"]),
        teacher_max_pixels=int(preset.defaults["teacher_max_pixels"]),
        teacher_context=str(preset.defaults["teacher_context"]),
    )  # fmt: skip


def make_adapter(family: ModelFamily, preset: Preset, directory: Path) -> Path:
    """A preset-sized adapter (its rank and alpha, every LoRA target) with random B, written by the trainer's
    writer; the family is left bare."""
    config = make_lora_config(int(preset.defaults["rank"]), float(preset.defaults["lora_alpha"]), 0.0,
                              family.lora_target_modules)  # fmt: skip
    family.transformer.add_adapter(config, adapter_name="bench")
    gen = torch.Generator().manual_seed(0)
    for name, param in family.transformer.named_parameters():
        if "lora_B.bench" in name:
            param.data = (torch.randn(param.shape, generator=gen) * 0.02).to(param.device, param.dtype)
    state = get_peft_model_state_dict(family.transformer, adapter_name="bench")
    family.save_lora_weights(str(directory), {k: v.detach().clone() for k, v in state.items()}, config.to_dict())
    family.transformer.delete_adapters("bench")
    family.transformer.unload_lora()
    return directory / "pytorch_lora_weights.safetensors"


def max_pixel_diff(a: list[Any], b: list[Any]) -> int:
    """The largest difference of two renderings' pixels, in 0-255 units."""
    return max(
        int(np.abs(np.asarray(x.image, dtype=np.int16) - np.asarray(y.image, dtype=np.int16)).max())
        for x, y in zip(a, b, strict=True)
    )


def import_seconds() -> float:
    """Wall seconds a fresh Python process takes to import what a generation worker imports."""
    code = "import dopsd.generation, dopsd.models.loading"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    return time.perf_counter() - start


def measure(step: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `step`; CPU time is steadier on a shared machine."""
    start = time.process_time()
    wall = timed(step, device)
    return wall, time.process_time() - start


def figures(setup: Setup, family: ModelFamily, adapter: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Latency of base / warm / first use / cold worker and batched / unbatched throughput, all interleaved round by
    round (the cold step in the first `cold_repeats` rounds); medians of wall and of process CPU time."""
    length = int(setup.preset.defaults["student_max_sequence_length"])
    settings = GenerationSettings(setup.width, setup.height, setup.steps, setup.guidance)
    generator = Generator(family, adapter_cache_size=8, max_batch=args.batch, max_sequence_length=length)
    warm_spec = AdapterSpec("warm", adapter)
    fresh_names = iter(range(10**6))
    cold_loads: list[float] = []

    def one(*adapters: AdapterSpec) -> list[GenerationRequest]:
        return [GenerationRequest(PROMPTS[:1], (0,), adapters, settings)]

    def cold() -> None:
        """A cold worker: the family loaded as the model cache loads it, a new generator, the first request."""
        start = time.perf_counter()
        cold_family = load(setup)
        cold_loads.append(time.perf_counter() - start)
        Generator(cold_family, max_sequence_length=length).generate(one(AdapterSpec("cold", adapter)))

    batch = [GenerationRequest(PROMPTS, tuple(range(args.batch // 2)), (warm_spec,), settings)]
    one_call = Generator(family, max_batch=args.batch, max_sequence_length=length)
    single_calls = Generator(family, max_batch=1, max_sequence_length=length)
    pipeline_class = type(family.pipeline)
    steps: dict[str, Callable[[], object]] = {
        "base": lambda: generator.generate(one()),
        "warm": lambda: generator.generate(one(warm_spec)),
        "first_use": lambda: generator.generate(one(AdapterSpec(f"new-{next(fresh_names)}", adapter))),
        "read": lambda: pipeline_class.lora_state_dict(str(adapter), return_lora_metadata=True),
        "batched": lambda: one_call.generate(batch),
        "unbatched": lambda: single_calls.generate(batch),
    }
    for step in steps.values():  # library warm-up (kernels, lazy imports), not timed
        step()
    batched_out, single_out = one_call.generate(batch), single_calls.generate(batch)
    wall: dict[str, list[float]] = {name: [] for name in [*steps, "cold"]}
    cpu: dict[str, list[float]] = {name: [] for name in wall}
    for round_ in range(args.repeats):
        todo = [*steps.items(), *([("cold", cold)] if round_ < args.cold_repeats else [])]
        for name, step in todo:
            gc.collect()  # outside the timing: the previous cold family's memory goes before any step
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
            w, c = measure(step, setup.device)
            wall[name].append(w)
            cpu[name].append(c)
    out: dict[str, Any] = {f"{name}_s": statistics.median(times) for name, times in wall.items()}
    out |= {f"cpu_{name}_s": statistics.median(times) for name, times in cpu.items()}
    out["cold_load_s"] = statistics.median(cold_loads[-args.cold_repeats :])
    out["batched_max_pixel_diff"] = max_pixel_diff(batched_out[0], single_out[0])
    out["cache_stats"] = generator.cache_stats()
    return out


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every figure of one run; returns the JSON record."""
    setup = setup_for(args)
    preset = setup.preset
    import_s = import_seconds()
    start = time.perf_counter()
    family = load(setup)
    first_load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as scratch:
        adapter = make_adapter(family, preset, Path(scratch))
        f = figures(setup, family, adapter, args)
    stats, images = f["cache_stats"], args.batch

    def ratio(a: str, b: str, prefix: str = "") -> float:
        return round(f[f"{prefix}{a}_s"] / f[f"{prefix}{b}_s"], 3)

    record: dict[str, Any] = {
        "bench": "generation", "preset": preset.name, "measured": True, "device": setup.device.type,
        "dtype": str(setup.dtype).removeprefix("torch."), "width": setup.width, "height": setup.height,
        "steps": setup.steps, "guidance_scale": setup.guidance, "rank": int(preset.defaults["rank"]),
        "adapter_mb": round(stats["bytes"] / max(stats["size"], 1) / 1e6, 3), "repeats": args.repeats,
        "cold_repeats": args.cold_repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0], "import_s": round(import_s, 3), "first_load_s": round(first_load_s, 3),
    }  # fmt: skip
    for name in ("base", "warm", "first_use", "read", "cold", "cold_load", "batched", "unbatched"):
        record[f"{name}_s"] = round(f[f"{name}_s"], 5)
    record |= {
        "first_use_over_warm": ratio("first_use", "warm"), "cold_over_warm": ratio("cold", "warm"),
        "warm_over_base": ratio("warm", "base"), "cpu_first_use_over_warm": ratio("first_use", "warm", "cpu_"),
        "cpu_cold_over_warm": ratio("cold", "warm", "cpu_"), "cpu_warm_over_base": ratio("warm", "base", "cpu_"),
        "batch": images, "batched_images_per_s": round(images / f["batched_s"], 3),
        "unbatched_images_per_s": round(images / f["unbatched_s"], 3),
        "batched_speedup": ratio("unbatched", "batched"), "cpu_batched_speedup": ratio("unbatched", "batched", "cpu_"),
        "batched_max_pixel_diff": f["batched_max_pixel_diff"], "cache_stats": stats, "command": command,
    }  # fmt: skip
    return record


def table(record: dict[str, Any]) -> str:
    """The figures as a text table."""
    w = record
    rows = [
        ("base model, no adapter", f"{w['base_s']:.4f} s", "1.00x"),
        ("warm: adapter cached", f"{w['warm_s']:.4f} s", f"{w['warm_over_base']:.2f}x base"),
        ("first use: file read + load", f"{w['first_use_s']:.4f} s", f"{w['first_use_over_warm']:.2f}x warm"),
        ("cold worker: family load + first adapter", f"{w['cold_s']:.4f} s", f"{w['cold_over_warm']:.1f}x warm"),
        (f"{w['batch']} images, one call", f"{w['batched_images_per_s']:.2f} img/s", f"{w['batched_speedup']:.2f}x"),
        (f"{w['batch']} images, one call each", f"{w['unbatched_images_per_s']:.2f} img/s", "1.00x"),
    ]
    head = (f"{w['preset']} {w['width']}x{w['height']}, {w['steps']} steps, {w['device']} {w['dtype']}, "
            f"{w['threads']} threads; imports {w['import_s']:.1f} s (paid once per worker process)")  # fmt: skip
    lines = [head, f"{'':44} {'time':>14} {'ratio':>12}"]
    lines += [f"{a:44} {b:>14} {c:>12}" for a, b, c in rows]
    lines.append(f"batched vs unbatched: max pixel difference {w['batched_max_pixel_diff']} (0-255)")
    lines.append(f"family load alone: {w['cold_load_s']:.3f} s; adapter file read alone (lora_state_dict): "
                 f"{w['read_s']:.4f} s; adapter in memory: {w['adapter_mb']:.2f} MB")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, runs, prints the table and the JSON line."""
    parser = argparse.ArgumentParser(description="generation latency (warm / first use / cold) and batching")
    parser.add_argument("--preset", default="tiny-z-image", help="a preset name (tiny presets run on the CPU)")
    parser.add_argument("--gpu", action="store_true", help="Z-Image-Turbo 1024x1024, 8 steps, bf16, CUDA")
    parser.add_argument("--base", default=None, help="base weights (a local diffusers folder; default the preset's)")
    parser.add_argument("--teacher", default=None, help="the teacher VLM folder (default the preset's)")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default the preset's resolution, square)")
    parser.add_argument("--steps", type=int, default=None, help="default the preset's native steps")
    parser.add_argument("--batch", type=int, default=4, help="images of the throughput request (even)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--cold-repeats", type=int, default=None, help="cold loads (default: repeats; --gpu 1)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2), help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 cold load, batch 2 (the test suite)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.cold_repeats, args.batch = 2, 1, 2
    if args.cold_repeats is None:
        args.cold_repeats = 1 if args.gpu else args.repeats
    if args.repeats < 1 or args.cold_repeats < 1 or args.batch < 2 or args.batch % 2:
        parser.error("--repeats and --cold-repeats must be >= 1, --batch even and >= 2")
    torch.set_num_threads(args.threads)
    command = "python bench/generation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.gpu and not torch.cuda.is_available():
        record: dict[str, Any] = {
            "bench": "generation", "preset": "z-image-turbo", "measured": False, "device": "cuda",
            "reason": "no CUDA device on this machine", "width": 1024, "height": 1024, "steps": 8,
            "command": command.strip(),
        }  # fmt: skip
        print("z-image-turbo 1024x1024, 8 steps: unmeasured (no CUDA device on this machine)")
    else:
        record = run(args, command.strip())
        print(table(record))
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
