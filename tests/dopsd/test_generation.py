"""The generation engine (`dopsd.generation`) on both tiny presets, fp32 on CPU.

Fidelity: an image with one adapter (at scale 1 and 0.5) or two combined equals what a FRESH diffusers pipeline
(`from_pretrained` of the exported tiny model, `load_lora_weights(file)`, `set_adapters`) renders on the same seed
and settings, within 1 unit of 0-255 (the tolerance the trainer's own sample test uses: the exported pipeline
itself differs from the in-code build by up to 1 unit). No leak: the transformer leaves every call with the same
modules, parameters, peft state and hooks, and D-OPSD steps after generations are bit-identical to the same steps
on a fresh model. Batching: batched images equal unbatched ones within 1 unit, prompt-major.

Adapters: two made by giving a fresh peft LoRA (rank 4, alpha 8, so the file's `lora_alpha` metadata matters)
non-zero B and saving it with `family.save_lora_weights` (the trainer's writer), and one trained by three D-OPSD
steps through the trainer's own roll-out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, ZImagePipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image

from dopsd.cli import main as cli_main
from dopsd.data import buckets_for_resolution
from dopsd.errors import GenerationCancelled, ModelLoadError
from dopsd.generation import (
    AdapterSpec,
    GeneratedImage,
    GenerationRequest,
    GenerationSettings,
    Generator,
)
from dopsd.lora import (
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    adapter_state,
    add_adapters,
    ema_update,
    make_lora_config,
    remove_adapters,
    student_parameters,
    teacher_parameters,
)
from dopsd.models.base import ModelFamily
from dopsd.models.loading import load_family
from dopsd.presets import PRESETS, get_preset
from dopsd.rollout import distillation_rollout


PRESET_NAMES = ("tiny-z-image", "tiny-flux2-klein")
TOLERANCE = 1  # 0-255 units, max over pixels and channels
PROMPTS = ("a photo of sks", "sks on a beach at sunset, seen from above")
SEEDS = (7,)  # the fidelity tests: both prompts (of different lengths) in one batched call


def tiny_family(preset_name: str) -> ModelFamily:
    """A freshly built tiny family (the same weights every time: they depend on the tiny seed only)."""
    preset = get_preset(preset_name)
    return load_family(
        preset, base=preset.base_model, teacher=preset.teacher_encoder, device=torch.device("cpu"),
        dtype=torch.float32, teacher_min_pixels=32 * 32, teacher_max_pixels=64 * 64,
        teacher_context="edit" if preset.family == "flux2_klein" else "vlm",
    )  # fmt: skip


def settings(preset_name: str, width: int = 64, height: int = 64) -> GenerationSettings:
    preset = get_preset(preset_name)
    return GenerationSettings(width, height, preset.native_sample_steps, preset.native_guidance_scale)


def max_length(preset_name: str) -> int:
    return int(get_preset(preset_name).defaults["student_max_sequence_length"])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module", params=PRESET_NAMES)
def preset_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def family(preset_name: str) -> ModelFamily:
    return tiny_family(preset_name)


@pytest.fixture(scope="module")
def generator(family: ModelFamily, preset_name: str) -> Generator:
    return Generator(family, adapter_cache_size=8, max_batch=4, max_sequence_length=max_length(preset_name))


def make_adapter(maker: ModelFamily, seed: int, directory: Path) -> Path:
    """A real adapter file: a fresh peft LoRA on the family's targets, B drawn from `seed`, saved by the trainer's
    writer with its LoRA metadata (alpha 8 at rank 4: loading it as alpha = rank would halve it)."""
    config = make_lora_config(4, 8.0, 0.0, maker.lora_target_modules)
    maker.transformer.add_adapter(config, adapter_name="maker")
    gen = torch.Generator().manual_seed(seed)
    for name, param in maker.transformer.named_parameters():
        if "lora_B.maker" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3
    state = {
        k: v.detach().clone() for k, v in get_peft_model_state_dict(maker.transformer, adapter_name="maker").items()
    }
    directory.mkdir(parents=True, exist_ok=True)
    maker.save_lora_weights(str(directory), state, config.to_dict())
    maker.transformer.delete_adapters("maker")
    return directory / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two adapters (a, b) per tiny preset."""
    root = tmp_path_factory.mktemp("adapters")
    files = {}
    for name in PRESET_NAMES:
        maker = tiny_family(name)
        files[name] = (make_adapter(maker, 1, root / name / "a"), make_adapter(maker, 2, root / name / "b"))
    return files


@pytest.fixture(scope="module")
def adapters(preset_name: str, adapter_files: dict[str, tuple[Path, Path]]) -> tuple[Path, Path]:
    return adapter_files[preset_name]


@pytest.fixture(scope="module")
def fresh_pipeline(preset_name: str, tmp_path_factory: pytest.TempPathFactory) -> DiffusionPipeline:
    """The tiny model exported with `dopsd models export` and loaded by diffusers' `from_pretrained`, as a user of
    the downloaded adapter does."""
    exported = tmp_path_factory.mktemp(f"export-{preset_name}")
    assert cli_main(["models", "export", preset_name, str(exported)]) == 0
    pipeline_class = Flux2KleinPipeline if get_preset(preset_name).family == "flux2_klein" else ZImagePipeline
    pipe = pipeline_class.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe: DiffusionPipeline, preset_name: str, loras: list[tuple[Path, float]]) -> list[Image.Image]:
    """What the fresh pipeline renders for PROMPTS x SEEDS, one call per image, with `loras` loaded from their files
    and combined by `set_adapters` (unloaded again afterwards)."""
    preset = get_preset(preset_name)
    extra: dict[str, Any] = (
        {"text_encoder_out_layers": preset.text_encoder_layers} if preset.text_encoder_layers else {}
    )
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora{i}")
    if loras:
        pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=[s for _, s in loras])
    try:
        return [
            pipe(
                prompt=prompt, height=64, width=64, num_inference_steps=preset.native_sample_steps,
                guidance_scale=preset.native_guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                max_sequence_length=max_length(preset_name), **extra,
            ).images[0]
            for prompt in PROMPTS
            for seed in SEEDS
        ]  # fmt: skip
    finally:
        if loras:
            pipe.unload_lora_weights()


def request(
    preset_name: str, *adapters: AdapterSpec, prompts: tuple[str, ...] = PROMPTS[:1], seeds: tuple[int, ...] = (0,)
) -> GenerationRequest:
    return GenerationRequest(prompts, seeds, tuple(adapters), settings(preset_name))


def images_of(results: list[list[GeneratedImage]]) -> list[Image.Image]:
    (only,) = results
    return [g.image for g in only]


def model_state(transformer: torch.nn.Module) -> dict[str, Any]:
    """Everything a leak would change: module tree, parameters and buffers (bit for bit), peft config, hooks."""
    return {
        "modules": [(n, type(m).__name__) for n, m in transformer.named_modules()],
        "tensors": {k: v.detach().clone() for k, v in transformer.state_dict().items()},
        "peft_config": dict(getattr(transformer, "peft_config", None) or {}),
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in transformer.named_modules()
        ],
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modules"] == before["modules"]
    assert after["peft_config"] == before["peft_config"] == {}
    assert after["hooks"] == before["hooks"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())


# Fidelity


@pytest.mark.parametrize("case", ["one", "half", "two"])
def test_adapters_match_a_fresh_diffusers_pipeline(
    case: str, preset_name: str, generator: Generator, adapters: tuple[Path, Path], fresh_pipeline: DiffusionPipeline
) -> None:
    """One adapter at scale 1 (`load_lora_weights(file)`), at 0.5 (`set_adapters(..., adapter_weights=0.5)`), and
    two combined (`set_adapters([a, b], [0.7, 0.4])`), against diffusers on the same seeds and settings."""
    a, b = adapters
    loras = {"one": [(a, 1.0)], "half": [(a, 0.5)], "two": [(a, 0.7), (b, 0.4)]}[case]
    specs = [AdapterSpec(f"{preset_name}-{path.parent.name}", path, scale) for path, scale in loras]
    ours = images_of(generator.generate([request(preset_name, *specs, prompts=PROMPTS, seeds=SEEDS)]))
    theirs = diffusers_images(fresh_pipeline, preset_name, loras)
    diffs = [max_diff(x, y) for x, y in zip(ours, theirs, strict=True)]
    assert max(diffs) <= TOLERANCE, diffs


def test_base_model_matches_a_fresh_diffusers_pipeline(
    preset_name: str, generator: Generator, fresh_pipeline: DiffusionPipeline
) -> None:
    ours = images_of(generator.generate([request(preset_name, prompts=PROMPTS, seeds=SEEDS)]))
    theirs = diffusers_images(fresh_pipeline, preset_name, [])
    assert max(max_diff(x, y) for x, y in zip(ours, theirs, strict=True)) <= TOLERANCE


def test_an_adapter_changes_the_output(preset_name: str, generator: Generator, adapters: tuple[Path, Path]) -> None:
    base = images_of(generator.generate([request(preset_name, prompts=PROMPTS)]))
    tuned = images_of(
        generator.generate([request(preset_name, AdapterSpec(f"{preset_name}-a", adapters[0]), prompts=PROMPTS)])
    )
    for x, y in zip(base, tuned, strict=True):
        delta = np.abs(pixels(x) - pixels(y))
        assert delta.max() > 40 and delta.mean() > 5, (delta.max(), delta.mean())


# No leak


def test_no_leak_after_generations_with_adapters(
    preset_name: str, family: ModelFamily, generator: Generator, adapters: tuple[Path, Path]
) -> None:
    """The base model's images, a generation with two adapters, then the base again: identical images, and the
    transformer's modules, parameters, peft config and hooks as before."""
    before = model_state(family.transformer)
    base = images_of(generator.generate([request(preset_name, seeds=(0, 1))]))
    a, b = (AdapterSpec(f"{preset_name}-{p.parent.name}", p, s) for p, s in zip(adapters, (0.8, -0.3), strict=True))
    generator.generate([request(preset_name, a, b), request(preset_name, a)])
    assert_same_state(before, model_state(family.transformer))
    again = images_of(generator.generate([request(preset_name, seeds=(0, 1))]))
    assert [max_diff(x, y) for x, y in zip(base, again, strict=True)] == [0] * len(base)


def mini_training(family: ModelFamily, image: Image.Image) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Three D-OPSD steps through the trainer's own parts (features, student + EMA teacher adapters, the roll-out,
    clipping, AdamW, EMA, removal): the losses and the trained student."""
    caption, length = "a photo of sks", 64
    student = family.encode_student([caption], length)
    teacher = [family.encode_teacher(image, caption, text_max_length=length, context_max_length=1024)]
    family.release_encoders()
    torch.manual_seed(0)
    add_adapters(family.transformer, make_lora_config(4, 8.0, 0.0, family.lora_target_modules), with_teacher=True)
    try:
        params, teacher_params = student_parameters(family.transformer), teacher_parameters(family.transformer)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        noise_rng, sigmas, losses = torch.Generator().manual_seed(3), family.native_sigmas(4, 64, 64), []
        for _ in range(3):
            noise = torch.randn((1, *family.latent_shape(64, 64)), generator=noise_rng)
            loss = distillation_rollout(
                family, noise=noise, student_conds=student, teacher_conds=teacher, sigmas=sigmas,
                teacher_adapter=TEACHER_ADAPTER, loss_space="x0", loss_scale=1.0,
            )  # fmt: skip
            losses.append(loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(teacher_params, params, 0.9)
        return losses, adapter_state(family.transformer, STUDENT_ADAPTER)
    finally:
        remove_adapters(family.transformer)


def test_training_after_generations_equals_training_on_a_fresh_model(
    preset_name: str, adapters: tuple[Path, Path], example_dir: Path, tmp_path: Path,
    fresh_pipeline: DiffusionPipeline,
) -> None:  # fmt: skip
    """D-OPSD steps on a family that generated with adapters give the bit-identical losses and student of the same
    steps on a freshly loaded family; generations after the run leave the trainer's (empty) peft layers exactly as
    the run left them; and the trained adapter, written by the trainer's writer, renders as diffusers renders it."""
    image = Image.open(sorted(example_dir.glob("*.png"))[0]).convert("RGB").resize((64, 64))
    used = tiny_family(preset_name)
    engine = Generator(used, max_sequence_length=max_length(preset_name))
    spec = AdapterSpec("a", adapters[0], 0.9)
    engine.generate([request(preset_name, spec), request(preset_name)])
    losses_used, student_used = mini_training(used, image)
    losses_fresh, student_fresh = mini_training(tiny_family(preset_name), image)
    assert losses_used == losses_fresh
    assert student_used.keys() == student_fresh.keys()
    assert all(torch.equal(student_used[k], student_fresh[k]) for k in student_fresh)
    after_training = model_state(used.transformer)
    assert after_training["peft_config"] == {}

    used.save_lora_weights(
        str(tmp_path), student_used, make_lora_config(4, 8.0, 0.0, used.lora_target_modules).to_dict()
    )
    trained = AdapterSpec("trained", tmp_path / "pytorch_lora_weights.safetensors")
    ours = images_of(engine.generate([request(preset_name, trained, AdapterSpec("b", adapters[1], 0.5), seeds=SEEDS)]))
    assert_same_state(after_training, model_state(used.transformer))
    theirs = diffusers_images(fresh_pipeline, preset_name, [(trained.path, 1.0), (adapters[1], 0.5)])[:1]
    assert max_diff(ours[0], theirs[0]) <= TOLERANCE


def test_refuses_a_model_that_carries_adapters(preset_name: str, adapters: tuple[Path, Path]) -> None:
    family = tiny_family(preset_name)
    family.transformer.add_adapter(make_lora_config(4, 8.0, 0.0, family.lora_target_modules), adapter_name="student")
    with pytest.raises(RuntimeError, match="carries adapters"):
        Generator(family).generate([request(preset_name, AdapterSpec("a", adapters[0]))])
    assert list(family.transformer.peft_config) == ["student"]  # another owner's adapter is left alone


# Batching


def test_batched_images_equal_unbatched_ones_prompt_major(
    preset_name: str, family: ModelFamily, adapters: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests, two compatible (same adapter and scale, same settings): with max_batch=3 the compatible
    pair's 4 images take 2 calls (3 + 1) and the third request's image 1; with max_batch=1, 5 calls; the same
    images within the tolerance, each request's in prompt-major order."""
    calls: list[int] = []
    original = family.text_to_image

    def counting(prompts: Any, generators: Any, **kwargs: Any) -> list[Image.Image]:
        calls.append(len(prompts))
        return original(prompts, generators, **kwargs)

    monkeypatch.setattr(family, "text_to_image", counting)
    a = AdapterSpec(f"{preset_name}-a", adapters[0])
    requests = [
        request(preset_name, a, prompts=PROMPTS, seeds=(5,)),
        request(preset_name, prompts=("a watercolor painting of sks",)),
        request(preset_name, a, prompts=("sks",), seeds=(1, 2)),
    ]
    length = max_length(preset_name)
    batched = Generator(family, max_batch=3, max_sequence_length=length).generate(requests)
    assert calls == [1, 3, 1]  # the adapter-free request first, on the untouched base model
    calls.clear()
    single = Generator(family, max_batch=1, max_sequence_length=length).generate(requests)
    assert calls == [1] * 5
    for req, got, alone in zip(requests, batched, single, strict=True):
        assert [(g.prompt, g.seed) for g in got] == [(p, s) for p in req.prompts for s in req.seeds]
        assert all((g.width, g.height) == g.image.size == (64, 64) for g in got)
        diffs = [max_diff(x.image, y.image) for x, y in zip(got, alone, strict=True)]
        assert max(diffs) <= TOLERANCE, diffs


def test_non_square_bucket(preset_name: str, generator: Generator) -> None:
    width, height = buckets_for_resolution(64)[1]
    assert width != height
    (images,) = generator.generate([GenerationRequest(("sks",), (0,), (), settings(preset_name, width, height))])
    assert images[0].image.size == (width, height) == (images[0].width, images[0].height)


# The adapter cache


def test_lru_is_bounded_counts_and_reads_a_file_once(preset_name: str, family: ModelFamily, tmp_path: Path) -> None:
    """Capacity 1: a (miss), a (hit: its file is gone and not needed), b (miss, evicts a), a (miss: read again)."""
    import shutil

    maker = tiny_family(preset_name)
    a_path, b_path = make_adapter(maker, 1, tmp_path / "a"), make_adapter(maker, 2, tmp_path / "b")
    engine = Generator(family, adapter_cache_size=1, max_sequence_length=max_length(preset_name))
    a, b = AdapterSpec("a", a_path), AdapterSpec("b", b_path)
    first = images_of(engine.generate([request(preset_name, a)]))
    assert engine.cache_stats() | {"bytes": 0} == {
        "hits": 0, "misses": 1, "size": 1, "evictions": 0, "bytes": 0, "capacity": 1
    }  # fmt: skip
    assert engine.is_cached("a") and engine.cache_stats()["bytes"] > 0
    moved = tmp_path / "a-moved.safetensors"
    shutil.move(a_path, moved)
    second = images_of(engine.generate([request(preset_name, a)]))  # served from memory
    assert [max_diff(x, y) for x, y in zip(first, second, strict=True)] == [0]  # same request, same images
    engine.generate([request(preset_name, b)])
    stats = engine.cache_stats()
    assert (stats["hits"], stats["misses"], stats["size"], stats["evictions"]) == (1, 2, 1, 1)
    assert not engine.is_cached("a") and engine.is_cached("b")
    with pytest.raises(ModelLoadError, match="adapter 'a': no file"):
        engine.generate([request(preset_name, a)])
    assert engine.generate([request(preset_name, AdapterSpec("a", moved))])
    assert engine.cache_stats()["misses"] == 4 and engine.cache_stats()["size"] == 1
    assert not getattr(family.transformer, "peft_config", None)


def test_lru_byte_bound(preset_name: str, family: ModelFamily, adapters: tuple[Path, Path]) -> None:
    """With a byte bound of one adapter's size, the second evicts the first; the newest always stays."""
    engine = Generator(family, adapter_cache_size=8, max_sequence_length=max_length(preset_name))
    engine.generate([request(preset_name, AdapterSpec("a", adapters[0]))])
    one_adapter = engine.cache_stats()["bytes"]
    bounded = Generator(family, adapter_cache_size=8, adapter_cache_bytes=one_adapter,
                        max_sequence_length=max_length(preset_name))  # fmt: skip
    bounded.generate(
        [request(preset_name, AdapterSpec("a", adapters[0])), request(preset_name, AdapterSpec("b", adapters[1]))]
    )
    stats = bounded.cache_stats()
    assert (stats["size"], stats["evictions"], stats["bytes"]) == (1, 1, one_adapter) and bounded.is_cached("b")
    tiny = Generator(family, adapter_cache_bytes=1, max_sequence_length=max_length(preset_name))
    tiny.generate([request(preset_name, AdapterSpec("a", adapters[0]))])
    assert tiny.cache_stats()["size"] == 1  # over the bound alone, still kept: it is the one in use


def test_warm_adapter_skips_the_file(preset_name: str, generator: Generator, adapters: tuple[Path, Path]) -> None:
    """A second use of a cached adapter reads nothing: the spec's path may even be gone."""
    spec = AdapterSpec(f"{preset_name}-a", adapters[0])
    generator.generate([request(preset_name, spec)])
    assert generator.is_cached(spec.name)
    hits = generator.cache_stats()["hits"]
    generator.generate([request(preset_name, AdapterSpec(spec.name, Path("/nonexistent/adapter.safetensors")))])
    assert generator.cache_stats()["hits"] == hits + 1


# Cancellation and errors


def test_should_stop_cancels_between_pipeline_calls(
    preset_name: str, family: ModelFamily, adapters: tuple[Path, Path]
) -> None:
    before = model_state(family.transformer)
    engine = Generator(family, max_batch=1, max_sequence_length=max_length(preset_name))
    progress: list[tuple[int, int]] = []
    with pytest.raises(GenerationCancelled) as caught:
        engine.generate(
            [request(preset_name, AdapterSpec("a", adapters[0]), seeds=(0, 1, 2))],
            should_stop=lambda: len(progress) >= 1,
            progress=lambda done, total: progress.append((done, total)),
        )
    assert caught.value.images_done == 1 and progress == [(1, 3)]
    assert_same_state(before, model_state(family.transformer))


def test_an_adapter_of_another_family_is_refused_cleanly(
    preset_name: str, family: ModelFamily, adapter_files: dict[str, tuple[Path, Path]]
) -> None:
    other = next(n for n in PRESET_NAMES if n != preset_name)
    before = model_state(family.transformer)
    engine = Generator(family, max_sequence_length=max_length(preset_name))
    own = AdapterSpec("own", adapter_files[preset_name][0])
    foreign = AdapterSpec("foreign", adapter_files[other][0])
    with pytest.raises(ModelLoadError, match="adapter 'foreign'"):
        engine.generate([request(preset_name, own, foreign)])
    assert_same_state(before, model_state(family.transformer))


def test_bad_requests_are_refused(preset_name: str, generator: Generator, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        generator.generate([GenerationRequest(("x",), (0,), (), settings(preset_name, 72, 64))])
    with pytest.raises(ValueError, match="named twice"):
        GenerationRequest(
            ("x",), (0,), (AdapterSpec("a", tmp_path), AdapterSpec("a", tmp_path)), settings(preset_name)
        )
    with pytest.raises(ValueError, match="seeds"):
        GenerationRequest(("x",), (-1,), (), settings(preset_name))
    with pytest.raises(ValueError, match="at least one prompt"):
        GenerationRequest((), (0,), (), settings(preset_name))
    with pytest.raises(ValueError, match="num_steps"):
        GenerationSettings(64, 64, 0, 0.0)
    with pytest.raises(ValueError, match="scale"):
        AdapterSpec("a", tmp_path, float("nan"))
    not_lora = tmp_path / "broken.safetensors"
    not_lora.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="adapter 'broken'"):
        generator.generate(
            [GenerationRequest(("x",), (0,), (AdapterSpec("broken", not_lora),), settings(preset_name))]
        )
    assert not generator.is_cached("broken")


# Presets


def test_presets_carry_the_native_guidance_and_the_allowed_sizes() -> None:
    assert get_preset("z-image-turbo").native_guidance_scale == 0.0
    assert get_preset("tiny-z-image").native_guidance_scale == 0.0
    assert {get_preset(n).native_guidance_scale for n in ("flux2-klein-4b", "flux2-klein-9b", "tiny-flux2-klein")} == {
        1.0
    }
    assert get_preset("z-image-turbo").generation_sizes()[0] == (1024, 1024)
    assert (1344, 576) in get_preset("z-image-turbo").generation_sizes()
    for preset in PRESETS.values():
        sizes = preset.generation_sizes()
        assert sizes == buckets_for_resolution(preset.defaults["resolution"])
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)


@pytest.fixture(autouse=True)
def _no_adapter_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test leaves the shared family bare."""
    yield
    if "family" in request.fixturenames:
        family = request.getfixturevalue("family")
        assert not getattr(family.transformer, "peft_config", None)
