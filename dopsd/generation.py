"""Text-to-image generation with trained adapters on a cached base model (issue 14, the engine under the service).

The base pipeline is the `ModelFamily` a worker already holds (training jobs use the same object). For each
`generate` call the adapters it names are loaded into the family's transformer with diffusers' own adapter API
(the pipeline's `lora_state_dict` conversion, `load_lora_into_transformer`, then `set_adapters(names,
adapter_weights=scales)` to combine them, `delete_adapters` to drop them), and the images come from the family's own
pipeline called with prompt strings (`ModelFamily.text_to_image`), so they are what a diffusers user gets from
`pipe.load_lora_weights(file)` and `pipe(prompt, generator=...)`. When the call returns (or raises) the transformer
is as it was: no adapter in `peft_config`, no hook, the same modules and parameters.

Seeds and generators: image (prompt, seed) starts from the noise of `torch.Generator("cpu").manual_seed(seed)`,
one generator per image, as a user of diffusers seeds a call (a CPU generator on every device, so a seed means
the same noise on CPU and GPU; diffusers draws it on the CPU and moves it). Images are prompt-major: for each
prompt, one image per seed. Batching changes nothing but floating-point rounding: an image is the same whether it
was rendered alone or in a batch, within 1 unit of 0-255 per pixel and channel (measured in fp32 on CPU at 64 px,
batches of 4 against single calls, `bench/generation.py`, docs/performance.md: at most 1 unit on tiny-z-image and
on tiny-flux2-klein; in bf16 on a GPU batched kernels may round differently, not measured). The same request twice
gives identical images. Against a fresh diffusers pipeline with `load_lora_weights(file)` (and `set_adapters` for
scales and pairs) the images agree within 1 unit on both tiny presets (`tests/dopsd/test_generation.py`).

Adapter files are read once: a bounded in-memory LRU keeps the converted state dicts (and their LoRA metadata,
which carries `lora_alpha`) of the most recently used adapters on the CPU, keyed by `AdapterSpec.name`.

Why not `pipe.load_lora_weights(state_dict)`: given a dict instead of a file, diffusers has no header to read the
adapter's metadata from, so `lora_alpha` falls back to the rank (quirk 5 in the library notes: max |delta| 0.71 on
the tiny model). `load_lora_weights(file)` is exactly `lora_state_dict(file)` followed by
`load_lora_into_transformer(state_dict, metadata=...)`; the cache keeps the first half's result and runs the second.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError

from dopsd.errors import GenerationCancelled, ModelLoadError
from dopsd.models.base import ModelFamily


_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a request: `name` is its stable identity (the service passes the training job's id) and the
    cache key, so `path` is read only when `name` is not cached; `path` is a diffusers-format
    `pytorch_lora_weights.safetensors` as the trainer writes it; `scale` its weight in `set_adapters`."""

    name: str
    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an adapter needs a name")
        if not math.isfinite(self.scale):
            raise ValueError(f"adapter {self.name!r}: scale must be a finite number, got {self.scale}")


@dataclass(frozen=True)
class GenerationSettings:
    """How images are rendered; requests with equal settings and adapters may share one batched pipeline call."""

    width: int
    height: int
    num_steps: int
    guidance_scale: float

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive, got {self.width}x{self.height}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {self.num_steps}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")


@dataclass(frozen=True)
class GenerationRequest:
    """Images for every (prompt, seed) pair, prompt-major, with `adapters` combined at their scales."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    adapters: tuple[AdapterSpec, ...]
    settings: GenerationSettings

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a generation needs at least one prompt")
        if not self.seeds:
            raise ValueError("a generation needs at least one seed")
        bad = [s for s in self.seeds if not isinstance(s, int) or not 0 <= s <= _MAX_SEED]
        if bad:
            raise ValueError(f"seeds must be integers from 0 to 2**64 - 1, got {bad[0]!r}")
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"an adapter is named twice in one request: {names}")

    @property
    def num_images(self) -> int:
        """How many images the request makes."""
        return len(self.prompts) * len(self.seeds)


@dataclass(frozen=True)
class GeneratedImage:
    """One rendered image and what made it."""

    image: Image.Image
    prompt: str
    seed: int
    width: int
    height: int


@dataclass(frozen=True)
class _Adapter:
    """A cached adapter: the pipeline's converted state dict (CPU tensors) and its LoRA metadata."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None
    nbytes: int


class AdapterCache:
    """An LRU of adapter state dicts by name: at most `capacity` of them (0: nothing kept, every use reads) and, with
    `max_bytes`, at most that many bytes of tensors (the newest entry always stays: it is in use). A rank-64
    Z-Image-Turbo adapter as the trainer writes it (fp32) is about 0.64 GB, so a worker sets one or both bounds."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"the adapter cache size must be >= 0, got {capacity}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"the adapter cache's byte bound must be >= 0, got {max_bytes}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Adapter] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, spec: AdapterSpec, read: Callable[[Path], _Adapter]) -> _Adapter:
        """The adapter of `spec.name`, from memory (a hit) or read from `spec.path` with `read` (a miss)."""
        entry = self._entries.get(spec.name)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(spec.name)
            return entry
        self.misses += 1
        entry = read(spec.path)
        if self.capacity > 0:
            self._entries[spec.name] = entry
            while len(self._entries) > self.capacity or (len(self._entries) > 1 and self._over_bytes()):
                self._entries.popitem(last=False)
                self.evictions += 1
        return entry

    def _over_bytes(self) -> bool:
        return self.max_bytes is not None and self.nbytes > self.max_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held."""
        return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> dict[str, int]:
        """hits, misses, size (adapters held), evictions, bytes (their tensors), capacity."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self._entries),
            "evictions": self.evictions,
            "bytes": self.nbytes,
            "capacity": self.capacity,
        }


def _group_key(request: GenerationRequest) -> tuple[Any, ...]:
    """Requests with equal keys render with the same transformer state and pipeline settings."""
    return (request.settings, tuple((a.name, a.scale) for a in request.adapters))


class Generator:
    """Renders `GenerationRequest`s on one loaded `ModelFamily`, adapters loaded per call and cached by name.

    Args:
        family: the base pipeline (a worker's cached family; training may use it between calls, never during one).
        adapter_cache_size: how many adapters' state dicts stay in memory (LRU by name; 0 reads every use).
        adapter_cache_bytes: and at most this many bytes of them (`None`: bounded by the count only).
        max_batch: the most images in one pipeline call. Compatible requests (same settings, same adapters at the
            same scales) share calls. One call of 4 images was 1.5x to 2.6x faster than 4 calls of one on the tiny
            models on CPU (`bench/generation.py`, docs/performance.md); on a GPU at 1024^2 a batch costs memory in
            proportion and the gain there is unmeasured.
        max_sequence_length: what prompts are padded or truncated to (`None`: the pipeline's default, 512). Pass
            the preset's `student_max_sequence_length` to render as training sampled (tiny-flux2-klein uses 64).

    Calls are serialised by a lock: one pipeline, one call at a time.
    """

    def __init__(
        self,
        family: ModelFamily,
        *,
        adapter_cache_size: int = 8,
        max_batch: int = 4,
        max_sequence_length: int | None = None,
        adapter_cache_bytes: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.family = family
        self.max_batch = max_batch
        self.max_sequence_length = max_sequence_length
        self.cache = AdapterCache(adapter_cache_size, adapter_cache_bytes)
        self._lock = threading.Lock()

    def cache_stats(self) -> dict[str, int]:
        """The adapter cache's counters: hits, misses, size (adapter state dicts in memory), evictions, bytes."""
        return self.cache.stats()

    def is_cached(self, name: str) -> bool:
        """Whether adapter `name` is in memory (a caller may skip fetching its file: the path is not read)."""
        return name in self.cache

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[list[GeneratedImage]]:
        """The images of each request, in order (each prompt-major); compatible requests (same adapters with the
        same scales, same settings) share pipeline calls of up to `max_batch` images.

        `should_stop` is asked before every pipeline call; when it answers true, `GenerationCancelled` is raised
        (no images returned). `progress(done, total)` is called after every pipeline call. An adapter that cannot
        be read or does not fit the model raises `ModelLoadError` naming it. Whatever happens, the transformer
        leaves the call as it entered it.
        """
        for request in requests:
            self._check_size(request.settings)
        with self._lock:
            return self._generate(list(requests), should_stop, progress)

    def _check_size(self, settings: GenerationSettings) -> None:
        multiple = self.family.pipeline.vae_scale_factor * 2
        if settings.width % multiple or settings.height % multiple:
            raise ValueError(
                f"width and height must be multiples of {multiple} for {self.family.name}, "
                f"got {settings.width}x{settings.height}"
            )

    def _generate(
        self,
        requests: list[GenerationRequest],
        should_stop: Callable[[], bool] | None,
        progress: Callable[[int, int], None] | None,
    ) -> list[list[GeneratedImage]]:
        transformer = self.family.transformer
        if getattr(transformer, "peft_config", None):
            raise RuntimeError(
                f"the {self.family.name} transformer carries adapters {sorted(transformer.peft_config)} "
                "(a training run in progress on the same model?); generation needs the bare base model"
            )
        groups: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()
        for i, request in enumerate(requests):
            groups.setdefault(_group_key(request), []).append(i)
        # Adapter-free groups first, before anything is loaded: they run on the untouched base model.
        order = sorted(groups.values(), key=lambda members: bool(requests[members[0]].adapters))
        results: list[list[GeneratedImage]] = [[] for _ in requests]
        total, done = sum(r.num_images for r in requests), 0
        wrapped_before = _tuner_layer_names(transformer)
        loaded: dict[str, str] = {}  # adapter name -> its peft adapter name for this call
        try:
            for members in order:
                first = requests[members[0]]
                self._activate(first.adapters, loaded)
                work = [(i, p, s) for i in members for p in requests[i].prompts for s in requests[i].seeds]
                for start in range(0, len(work), self.max_batch):
                    if should_stop is not None and should_stop():
                        raise GenerationCancelled(done)
                    chunk = work[start : start + self.max_batch]
                    images = self._render(first.settings, [p for _, p, _ in chunk], [s for _, _, s in chunk])
                    for (i, prompt, seed), image in zip(chunk, images, strict=True):
                        results[i].append(GeneratedImage(image, prompt, seed, image.width, image.height))
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        finally:
            self._unload(list(loaded.values()), wrapped_before)
        return results

    def _render(self, settings: GenerationSettings, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        return self.family.text_to_image(
            prompts,
            generators,
            width=settings.width,
            height=settings.height,
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance_scale,
            max_sequence_length=self.max_sequence_length,
        )

    def _read(self, spec: AdapterSpec) -> Callable[[Path], _Adapter]:
        pipeline_class = type(self.family.pipeline)

        def read(path: Path) -> _Adapter:
            if not Path(path).is_file():
                raise ModelLoadError(f"adapter {spec.name!r}: no file at {path}")
            try:
                state, metadata = pipeline_class.lora_state_dict(
                    str(path),
                    return_lora_metadata=True,
                    use_safetensors=True,  # never unpickle a file
                )
            except (OSError, ValueError, SafetensorError) as exc:
                raise ModelLoadError(f"adapter {spec.name!r}: cannot read {path}: {exc}") from exc
            state = {k: v.detach().contiguous() for k, v in state.items()}
            return _Adapter(state, metadata, sum(t.numel() * t.element_size() for t in state.values()))

        return read

    def _activate(self, adapters: tuple[AdapterSpec, ...], loaded: dict[str, str]) -> None:
        """Leaves exactly `adapters` loaded and active at their scales (none: the base model, nothing loaded)."""
        wanted = {a.name for a in adapters}
        stale = [name for name in loaded if name not in wanted]
        if stale:
            self._delete([loaded.pop(name) for name in stale])
        pipeline = self.family.pipeline
        for spec in adapters:
            if spec.name in loaded:
                continue
            entry = self.cache.get(spec, self._read(spec))
            peft_name = _free_name(loaded)
            try:
                with warnings.catch_warnings():  # peft warns on any second adapter; several are the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    pipeline.load_lora_into_transformer(
                        dict(entry.state_dict),  # diffusers pops keys from what it is given
                        transformer=pipeline.transformer,
                        adapter_name=peft_name,
                        metadata=entry.metadata,
                        _pipeline=pipeline,
                        # as `load_lora_weights` passes it: LoRA layers made empty and filled from the state dict,
                        # no random init thrown away (on the CPU the layers then share the cached tensors, which
                        # nothing writes to)
                        low_cpu_mem_usage=True,
                    )
            except (ValueError, RuntimeError, KeyError) as exc:
                self._delete([peft_name])  # whatever part of it was injected
                raise ModelLoadError(f"adapter {spec.name!r} does not fit {self.family.name}: {exc}") from exc
            loaded[spec.name] = peft_name
        if adapters:
            pipeline.set_adapters([loaded[a.name] for a in adapters], adapter_weights=[a.scale for a in adapters])

    def _delete(self, peft_names: list[str]) -> None:
        with warnings.catch_warnings():  # peft warns that an active adapter goes away, which is the intent
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            self.family.pipeline.delete_adapters(peft_names)

    def _unload(self, peft_names: list[str], wrapped_before: set[str]) -> None:
        """Deletes this call's adapters and unwraps the layers peft wrapped for them: a transformer that had no peft
        layers gets none back (diffusers' `unload_lora`), one that had them (empty ones, after a training run)
        keeps exactly those."""
        transformer = self.family.transformer
        if peft_names:
            self._delete(peft_names)
        if getattr(transformer, "peft_config", None):
            return  # not ours (refused on entry); never strip another owner's adapters
        added = _tuner_layer_names(transformer) - wrapped_before
        if not added:
            return
        if not wrapped_before:
            transformer.unload_lora()  # diffusers' own: every peft layer back to its base layer, config gone
            return
        for name in sorted(added, key=len, reverse=True):  # peft's own unwrapping, for the layers this call added
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, getattr(parent, child).get_base_layer())


def _free_name(loaded: dict[str, str]) -> str:
    """A peft adapter name unused in this call (peft names are module keys: no dots; never `student`/`teacher`)."""
    used = set(loaded.values())
    return next(f"generation_{i}" for i in range(len(used) + 1) if f"generation_{i}" not in used)


def _tuner_layer_names(module: torch.nn.Module) -> set[str]:
    """The names of the modules peft has wrapped (LoRA layers), with or without adapters in them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
