"""Real presets load from folders on disk: `DOPSD_MODEL_PATHS` maps a preset's model ids to folders in the layout
the real models are published in (here: tiny models exported with `dopsd models export`, weights sharded with
an index like the real checkpoints), the loading branches of the real presets (Z-Image-Turbo, FLUX.2-klein with
either teacher context, the Qwen3-VL teacher and captioner) run on them, and an incomplete folder is refused
naming what it lacks. Then through the worker (in process, on the embedded mode's SQLite database and local
store): a training job and a generation render with the folder's weights, and a job whose folder is incomplete
fails with `model_unavailable`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from diffusers import Flux2KleinPipeline, ZImagePipeline
from PIL import Image
from transformers import Qwen3Config, Qwen3ForCausalLM

from api.commands import migrate
from api.generation_schemas import GenerationSpec
from api.services.generations import resolve
from core import api_keys
from core.config import Settings, get_settings
from core.db import make_engine, make_sessionmaker
from core.jobs import client_side
from core.jobs.models import GENERATION, Job
from core.queue import generation_queue_for_family, queue_for_family
from core.storage import input_key, make_store
from dopsd.captioning import auto_captions
from dopsd.cli import main as cli_main
from dopsd.config import DOPSDConfig
from dopsd.data import resolve_caption
from dopsd.errors import ModelLoadError
from dopsd.models.base import ModelFamily
from dopsd.models.loading import (
    export_teacher_encoder,
    flux2_klein_family,
    load_family,
    load_family_for,
    load_pipeline,
)
from dopsd.models.tiny import build_tiny_flux2_klein_pipeline, build_tiny_z_image_pipeline, tiny_text_config
from dopsd.presets import PRESETS, get_preset
from worker.generations import run_generation
from worker.model_paths import with_local_weights
from worker.runner import reset_process_state, run_job


REPO = Path(__file__).resolve().parents[2]
CPU, FP32 = torch.device("cpu"), torch.float32
Z_IMAGE = {"base": "Tongyi-MAI/Z-Image-Turbo", "teacher": "Qwen/Qwen3-VL-4B-Instruct"}
KLEIN = {"base": "black-forest-labs/FLUX.2-klein-4B", "teacher": "Qwen/Qwen3-VL-4B-Instruct"}
SHARD = "200KB"  # the tiny transformer and VLM in several shards with an index, as the real checkpoints come
PIXELS = {"teacher_min_pixels": 32 * 32, "teacher_max_pixels": 64 * 64}  # keeps the tiny teacher cheap


def exported(folder: Path, preset: str) -> tuple[Path, Path]:
    """`dopsd models export PRESET BASE --teacher-encoder TEACHER --max-shard-size 200KB`: the base pipeline and
    the teacher VLM as the two folders a real preset's weights come in."""
    base, teacher = folder / "base", folder / "teacher"
    code = cli_main(
        ["models", "export", preset, str(base), "--teacher-encoder", str(teacher), "--max-shard-size", SHARD]
    )
    assert code == 0
    return base, teacher


@pytest.fixture(scope="module")
def z_image_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base, teacher = exported(tmp_path_factory.mktemp("z-image-turbo"), "tiny-z-image")
    assert len(list((base / "transformer").glob("*.safetensors"))) > 1  # sharded, with an index
    assert (base / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (teacher / "model.safetensors.index.json").is_file()
    return base, teacher


def klein_with_28_text_layers() -> Flux2KleinPipeline:
    """The tiny FLUX.2-klein with a text encoder as deep as Qwen3-4B's 36 layers need not be, but deep enough for
    the real presets' feature layers (9, 18, 27); everything else is the tiny preset's."""
    tiny = build_tiny_flux2_klein_pipeline()
    values = tiny_text_config(len(tiny.tokenizer)).to_dict()
    values.pop("layer_types", None)  # derived from the layer count
    config = Qwen3Config(**{**values, "num_hidden_layers": 28})
    torch.manual_seed(5)
    return Flux2KleinPipeline(
        scheduler=tiny.scheduler, vae=tiny.vae, text_encoder=Qwen3ForCausalLM(config), tokenizer=tiny.tokenizer,
        transformer=tiny.transformer, is_distilled=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def klein_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("flux2-klein-4b")
    pipe = klein_with_28_text_layers()
    pipe.save_pretrained(folder / "base", max_shard_size=SHARD)
    export_teacher_encoder(pipe, folder / "teacher", max_shard_size=SHARD)
    return folder / "base", folder / "teacher"


def mapped_config(preset: str, ids: dict[str, str], base: Path, teacher: Path, **given: Any) -> DOPSDConfig:
    """The config a worker runs a job of `preset` with, under `DOPSD_MODEL_PATHS` mapping its ids to the folders."""
    paths = {ids["base"]: str(base), ids["teacher"]: str(teacher)}
    return with_local_weights(DOPSDConfig.for_preset(preset, **PIXELS, **given), paths)


def render(family: ModelFamily, *, steps: int, guidance: float) -> np.ndarray:
    image = family.text_to_image(
        ["a photo of sks on a beach"], [torch.Generator().manual_seed(0)], width=64, height=64, num_steps=steps,
        guidance_scale=guidance,
    )[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


RED = Image.new("RGB", (64, 48), (200, 40, 40))


def test_z_image_turbo_loads_from_mapped_folders_as_the_model_they_hold(z_image_folders: tuple[Path, Path]) -> None:
    """The real Z-Image preset's branches (pipeline `from_pretrained` of a sharded folder, the Qwen3-VL teacher from
    its folder with the text encoder copied in) give exactly the model that was exported: the same image at the
    preset's native setting and the same teacher features."""
    base, teacher = z_image_folders
    config = mapped_config("z-image-turbo", Z_IMAGE, base, teacher)
    assert (config.pretrained_model_name_or_path, config.teacher_encoder_path) == (str(base), str(teacher))
    family = load_family_for(config, device=CPU, dtype=FP32)
    tiny = get_preset("tiny-z-image")
    in_code = load_family(
        tiny, base=tiny.base_model, teacher=tiny.teacher_encoder, device=CPU, dtype=FP32, **PIXELS
    )  # fmt: skip
    preset = get_preset("z-image-turbo")
    steps, guidance = preset.native_sample_steps, preset.native_guidance_scale
    image = render(family, steps=steps, guidance=guidance)
    assert image.std() > 5  # a picture, not a flat field
    assert np.abs(image - render(in_code, steps=steps, guidance=guidance)).max() == 0
    features = family.encode_teacher(RED, "a photo of sks", text_max_length=512, context_max_length=1024)
    expected = in_code.encode_teacher(RED, "a photo of sks", text_max_length=512, context_max_length=1024)
    assert features.shape == expected.shape and features.shape[0] > len("a photo of sks")  # image tokens included
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_flux2_klein_loads_from_mapped_folders_and_renders_as_diffusers_does(klein_folders: tuple[Path, Path]) -> None:
    """The real FLUX.2-klein-4B preset (text features of layers 9, 18, 27; 4 steps, guidance 1.0; the edit-branch
    teacher) on the mapped folder renders what diffusers' own pipeline makes from the same folder."""
    base, teacher = klein_folders
    family = load_family_for(mapped_config("flux2-klein-4b", KLEIN, base, teacher), device=CPU, dtype=FP32)
    preset = get_preset("flux2-klein-4b")
    assert preset.text_encoder_layers == (9, 18, 27) and family.teacher_encoder is None  # edit: no VLM loaded
    pipe = Flux2KleinPipeline.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    diffusers_image = pipe(
        prompt="a photo of sks on a beach", height=64, width=64, num_inference_steps=preset.native_sample_steps,
        guidance_scale=preset.native_guidance_scale, generator=torch.Generator().manual_seed(0),
        text_encoder_out_layers=preset.text_encoder_layers,
    ).images[0]  # fmt: skip
    image = render(family, steps=preset.native_sample_steps, guidance=preset.native_guidance_scale)
    assert image.std() > 5
    assert np.abs(image - np.asarray(diffusers_image, dtype=np.int16)).max() <= 1
    cond = family.encode_teacher(RED, "a photo of sks", text_max_length=64, context_max_length=1024)
    assert cond.ref_tokens is not None and cond.embeds.shape == (64, 3 * 32)  # three hidden states, concatenated


def test_flux2_klein_vlm_teacher_loads_from_its_mapped_folder(klein_folders: tuple[Path, Path]) -> None:
    """With `teacher_context: vlm` the klein preset's Qwen3-VL teacher comes from its folder (a VLM as deep as the
    text encoder it takes the weights of) and encodes as the same model built in code does."""
    base, teacher = klein_folders
    config = mapped_config("flux2-klein-4b", KLEIN, base, teacher, teacher_context="vlm")
    family = load_family_for(config, device=CPU, dtype=FP32)
    cond = family.encode_teacher(RED, "a photo of sks", text_max_length=64, context_max_length=1024)
    in_code = flux2_klein_family(
        klein_with_28_text_layers(), "tiny://qwen3-vl", teacher_context="vlm", text_layers=(9, 18, 27), device=CPU,
        dtype=FP32, **PIXELS,
    )  # fmt: skip
    expected = in_code.encode_teacher(RED, "a photo of sks", text_max_length=64, context_max_length=1024)
    assert cond.ref_tokens is None and cond.embeds.shape == expected.embeds.shape
    torch.testing.assert_close(cond.embeds, expected.embeds, rtol=0, atol=0)


def test_captions_are_written_by_the_mapped_teacher_folder(z_image_folders: tuple[Path, Path]) -> None:
    """A real preset's captioner loads the VLM and its tokenizer from the teacher folder (a tiny preset would get
    the template caption instead), and the caption names the trigger."""
    base, teacher = z_image_folders
    config = mapped_config("z-image-turbo", Z_IMAGE, base, teacher)
    captions = auto_captions(
        {"red.png": RED}, trigger="zwx", preset=get_preset("z-image-turbo"), teacher_path=config.teacher_encoder_path,
        device=CPU, dtype=FP32, min_pixels=config.teacher_min_pixels, max_pixels=config.teacher_max_pixels,
    )  # fmt: skip
    assert list(captions) == ["red.png"]
    assert "zwx" in captions["red.png"] and captions["red.png"] != "a photo of zwx"  # made by the model


def broken(folder: Path, target: Path, damage: str) -> Path:
    """A copy of an exported model folder with one thing missing or wrong."""
    shutil.copytree(folder, target)
    if damage == "shard":
        next(iter(sorted((target / "transformer").glob("*-00002-of-*.safetensors")))).unlink()
    elif damage == "vae":
        shutil.rmtree(target / "vae")
    elif damage == "model_index":
        (target / "model_index.json").unlink()
    elif damage == "teacher_type":
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    elif damage == "preprocessor":
        (target / "preprocessor_config.json").unlink()
    return target


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "which does not exist on this worker"),
        ("shard", "1 of 8 weight shards missing (transformer/diffusion_pytorch_model-00002-of-00008.safetensors)"),
        ("vae", "no vae/ folder"),
        ("model_index", "no model_index.json"),
        ("teacher_type", "config.json is a 'qwen3' model, not 'qwen3_vl'"),
        ("preprocessor", "no preprocessor_config.json"),
    ],
)
def test_a_missing_or_incomplete_mapped_folder_is_refused_naming_it(
    z_image_folders: tuple[Path, Path], tmp_path: Path, damage: str, message: str
) -> None:
    base, teacher = z_image_folders
    if damage == "missing":
        base = tmp_path / "not-mounted"
    elif damage in ("teacher_type", "preprocessor"):
        teacher = broken(teacher, tmp_path / "teacher", damage)
    else:
        base = broken(base, tmp_path / "base", damage)
    folder = teacher if damage in ("teacher_type", "preprocessor") else base
    with pytest.raises(ModelLoadError) as raised:
        mapped_config("z-image-turbo", Z_IMAGE, base, teacher)
    assert f"to {folder}, which" in str(raised.value) and message in str(raised.value)
    role = "teacher encoder Qwen/Qwen3-VL-4B-Instruct" if folder == teacher else "base model Tongyi-MAI/Z-Image-Turbo"
    assert role in str(raised.value)


def test_ids_not_mapped_are_kept_and_a_folder_given_directly_is_checked_too(
    z_image_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    config = DOPSDConfig.for_preset("z-image-turbo")
    assert with_local_weights(config, {"some/other-model": "/models/other"}) == config
    with pytest.raises(ModelLoadError, match="the model folder /no/such/folder does not exist"):
        load_pipeline("z_image", "/no/such/folder", dtype=FP32)  # `dopsd train --base FOLDER`
    with pytest.raises(ModelLoadError, match=r"is not a ZImagePipeline: no vae/ folder"):
        load_pipeline("z_image", str(broken(z_image_folders[0], tmp_path / "base", "vae")), dtype=FP32)


def test_the_setting_takes_absolute_folders_only() -> None:
    assert Settings(environment="development", model_paths={"a/b": "/models/b"}).model_paths == {"a/b": "/models/b"}
    with pytest.raises(ValueError, match="absolute folders"):
        Settings(environment="development", model_paths={"a/b": "models/b"})


def test_the_compose_gpu_workers_find_every_model_of_the_family_they_serve() -> None:
    """docker-compose.yml's GPU workers: DOPSD_MODEL_PATHS parses as the setting takes it and names a folder in
    the read-only /models mount for the base model and teacher encoder of every real preset of the queue's family;
    no hub access; the multi-GPU worker reserves its four GPUs with room in /dev/shm for NCCL."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    workers = {n: s for n, s in services.items() if s.get("build", {}).get("dockerfile") == "Dockerfile.gpu"}
    assert set(workers) == {"worker-gpu", "worker-generate", "worker-gpu-x4"}
    for name, service in workers.items():
        environment = service["environment"]
        paths = Settings(environment="development", model_paths=json.loads(environment["DOPSD_MODEL_PATHS"]))
        queue = service["command"][service["command"].index("-Q") + 1]
        family = queue.split(".")[1]
        needed = {
            model
            for preset in PRESETS.values()
            if preset.family == family and not preset.is_tiny
            for model in (preset.base_model, preset.teacher_encoder)  # the teacher also writes missing captions
            if model is not None
        }
        assert needed and needed <= set(paths.model_paths), (name, needed)
        assert all(folder.startswith("/models/") for folder in paths.model_paths.values())
        assert any(volume.endswith(":/models:ro") for volume in service["volumes"]), name
        assert environment["HF_HUB_OFFLINE"] == "1"
    x4 = workers["worker-gpu-x4"]
    assert x4["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    assert int(x4["shm_size"].removesuffix("gb")) >= 16 and {"NCCL_P2P_LEVEL", "NCCL_IB_DISABLE"} <= set(
        x4["environment"]
    )


# Through the worker: `run_job` and `run_generation` in this process, with the settings a worker reads from its
# environment, on the embedded mode's SQLite database and local store.


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, z_image_folders: tuple[Path, Path]) -> Iterator[dict[str, Path]]:
    """A worker's environment whose `DOPSD_MODEL_PATHS` maps the tiny presets' ids: `tiny://z-image` to a folder of
    other weights than the ones built in code (seed 7), so what a job makes shows where its weights came from, and
    `tiny://flux2-klein` to a folder with its transformer missing."""
    home = tmp_path_factory.mktemp("worker")
    other = build_tiny_z_image_pipeline(seed=7)
    other.save_pretrained(home / "z-image-seed-7")
    klein = home / "klein-incomplete"
    build_tiny_flux2_klein_pipeline().save_pretrained(klein)
    shutil.rmtree(klein / "transformer")
    paths = {
        "tiny://z-image": home / "z-image-seed-7",
        "tiny://qwen3-vl": z_image_folders[1],
        "tiny://flux2-klein": klein,
    }
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("DOPSD_")]:
            env.delenv(name)
        env.setenv("DOPSD_ENVIRONMENT", "development")
        env.setenv("DOPSD_DATABASE_URL", f"sqlite:///{home / 'dopsd.db'}")
        env.setenv("DOPSD_STORAGE_DIR", str(home / "artifacts"))
        env.setenv("DOPSD_MODEL_PATHS", json.dumps({model: str(folder) for model, folder in paths.items()}))
        migrate(f"sqlite:///{home / 'dopsd.db'}")
        get_settings.cache_clear()
        reset_process_state()
        try:
            yield {"home": home, **{model: Path(folder) for model, folder in paths.items()}}
        finally:
            get_settings.cache_clear()
            reset_process_state()


def queued(preset: str, config: dict[str, Any], *, kind: str = "training", images: int = 2) -> uuid.UUID:
    """A queued job as the API records it: the resolved config (ids, not folders) and its images in storage."""
    settings = get_settings()
    sessions, store, job_id = make_sessionmaker(make_engine(settings.database_url)), make_store(settings), uuid.uuid4()
    stored = []
    for index, path in enumerate(sorted(Path("examples/concept").glob("*.png"))[:images]):
        key = input_key(job_id, index, ".png")
        stored.append({"name": path.name, "key": key, "size": store.put_file(key, path, "image/png")})
    family = get_preset(preset).family
    queue = generation_queue_for_family(family) if kind == GENERATION else queue_for_family(family)
    with sessions() as session:
        owner, _ = api_keys.create_api_key(session=session, name=f"local-weights-{job_id.hex[:6]}")
        client_side.create_job(
            session=session, job_id=job_id, owner_id=owner.id, preset=preset, queue=queue, spec={}, config=config,
            images=stored, kind=kind,
        )  # fmt: skip
        session.commit()
    return job_id


def finished(job_id: uuid.UUID) -> tuple[Job, dict[str, Path]]:
    """The job's row once the worker is done, and its stored artifacts by name as local files."""
    settings = get_settings()
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        job = session.get_one(Job, job_id)
        files = {a.name: settings.storage_dir / a.key for a in job.artifacts}
        session.expunge(job)
    return job, files


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def diffusers_render(folder: Path | None, prompt: str, seed: int, max_sequence_length: int = 512) -> np.ndarray:
    """What `ZImagePipeline.from_pretrained(folder)` makes at the tiny preset's native setting (None: the model
    built in code)."""
    pipe = build_tiny_z_image_pipeline() if folder is None else ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompt, height=64, width=64, num_inference_steps=8, guidance_scale=0.0,
        generator=torch.Generator().manual_seed(seed), max_sequence_length=max_sequence_length,
    ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


def test_a_job_of_a_mapped_preset_trains_on_the_folders_weights(worker: dict[str, Path]) -> None:
    config = DOPSDConfig.for_preset(
        "tiny-z-image",
        trigger="sks",
        max_train_steps=2,
        validation_prompts=["a photo of [V]"],
        sample_seeds=[0],
        eval_seeds=0,
        gap_eval_seeds=1,
    ).to_dict()  # fmt: skip  (no report: what matters here is which weights rendered the samples)
    job_id = queued("tiny-z-image", config, images=1)
    run_job(job_id, worker_id="local-weights")
    job, files = finished(job_id)
    assert job.status == "succeeded", job.error_message
    assert job.config["pretrained_model_name_or_path"] == "tiny://z-image"  # the row keeps what the user sees
    base_sample = pixels(next(p for name, p in files.items() if name.endswith("prompt-00-seed-0-base.png")))
    prompt = resolve_caption("a photo of [V]", "sks")
    assert np.abs(base_sample - diffusers_render(worker["tiny://z-image"], prompt, 0)).max() <= 1
    assert np.abs(base_sample - diffusers_render(None, prompt, 0)).max() > 10  # not the weights built in code


def test_a_generation_of_a_mapped_preset_renders_with_the_folders_weights(worker: dict[str, Path]) -> None:
    with make_sessionmaker(make_engine(get_settings().database_url))() as session:
        owner, _ = api_keys.create_api_key(session=session, name="local-weights-generation")
        session.commit()
        spec = GenerationSpec(preset="tiny-z-image", prompt="a robot on a table", seeds=[3])
        config = resolve(spec, session=session, owner_id=owner.id, settings=get_settings()).config
    job_id = queued("tiny-z-image", config, kind=GENERATION, images=0)
    run_generation(job_id, worker_id="local-weights")
    job, files = finished(job_id)
    assert job.status == "succeeded", job.error_message
    expected = diffusers_render(worker["tiny://z-image"], "a robot on a table", 3, config["max_sequence_length"])
    assert np.abs(pixels(files["images/000-seed-3.png"]) - expected).max() <= 1


def test_a_job_whose_mapped_folder_is_incomplete_fails_with_model_unavailable(worker: dict[str, Path]) -> None:
    config = DOPSDConfig.for_preset("tiny-flux2-klein", trigger="sks", max_train_steps=2).to_dict()
    job_id = queued("tiny-flux2-klein", config)
    run_job(job_id, worker_id="local-weights")
    job, _ = finished(job_id)
    assert job.status == "failed"
    assert job.error_code == "model_unavailable" and job.error_message is not None
    folder = worker["tiny://flux2-klein"]
    assert f"maps the base model tiny://flux2-klein to {folder}, which is incomplete" in job.error_message
    assert "no transformer/ folder" in job.error_message
