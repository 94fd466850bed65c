"""Work that must not be lost, through `dopsd train` as a new user runs it: ordinary photos of different shapes train
to the end on a small resolution (their aspect buckets fall under FLUX.2's minimum reference size, which the run
handles before the first step), and a stage after training that fails leaves the adapter and a warning, not an
error and nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from dopsd.cli import main as cli_main
from dopsd.data import buckets_for_resolution, nearest_bucket
from dopsd.lora import LORA_WEIGHT_NAME
from dopsd.models.flux2_klein import MIN_REFERENCE_SIDE, reference_image
from tests.photos import PHOTO_SIZES, photo_jpegs


FAST = ["--validation-prompts", "a photo of [V]", "--sample-seeds", "0", "--eval-seeds", "1", "--quiet"]


def five_photos(folder: Path) -> Path:
    """The five photos of `tests.photos`, written to `folder`."""
    folder.mkdir()
    for name, data in photo_jpegs():
        (folder / name).write_bytes(data)
    return folder


def test_the_small_buckets_of_these_photos_are_under_the_pipelines_minimum() -> None:
    """The premise of the run below: the photos' buckets at 64 px include sides the pipeline refuses."""
    buckets = buckets_for_resolution(64)
    sides = [min(nearest_bucket(w, h, buckets)) for w, h in PHOTO_SIZES]
    assert min(sides) < MIN_REFERENCE_SIDE
    with pytest.raises(ValueError, match="Image too small"):
        Flux2ImageProcessor.check_image_input(Image.new("RGB", (80, 48)))


def test_a_reference_under_the_minimum_is_enlarged_to_what_the_pipeline_accepts() -> None:
    """`MIN_REFERENCE_SIDE` is the pipeline's own limit, and an enlarged reference keeps its shape."""
    with pytest.raises(ValueError, match="Image too small"):
        Flux2ImageProcessor.check_image_input(Image.new("RGB", (MIN_REFERENCE_SIDE, MIN_REFERENCE_SIDE - 1)))
    Flux2ImageProcessor.check_image_input(Image.new("RGB", (MIN_REFERENCE_SIDE, MIN_REFERENCE_SIDE)))
    assert reference_image(Image.new("RGB", (80, 48)), 16).size == (112, 64)
    assert reference_image(Image.new("RGB", (80, 32)), 16).size == (160, 64)
    big = Image.new("RGB", (80, 64))
    assert reference_image(big, 16) is big
    for width, height in [(80, 48), (80, 32), (48, 80), (16, 16)]:
        Flux2ImageProcessor.check_image_input(reference_image(Image.new("RGB", (width, height)), 16))


def test_photos_of_different_shapes_train_to_an_adapter_on_tiny_flux2_klein(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's run: it used to train every step, then stop with `error: Image too small: 80×48`."""
    photos, out = five_photos(tmp_path / "photos"), tmp_path / "out"
    code = cli_main(
        ["train", "--preset", "tiny-flux2-klein", "--images", str(photos), "--caption", "a photo of [V]",
         "--trigger", "sks", "--steps", "2", "--out", str(out), *FAST]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "error" not in captured.err and "warning" not in captured.err
    assert f"adapter: {out / LORA_WEIGHT_NAME}" in captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["warnings"] == [] and metrics["steps"] == 2
    # The teacher context of every photo was rendered, through the pipeline's own reference-image input.
    teacher = sorted(p.name for p in (out / "samples" / "step-00000002").glob("teacher-*.png"))
    assert teacher == [f"teacher-photo-{i}.png" for i in range(5)]
    assert (out / "report.json").is_file()


def test_a_stage_after_training_that_fails_leaves_the_adapter_and_a_warning(
    tmp_path: Path, example_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An embedding-model folder that holds no model fails the final report only: the run ends with exit 0, the
    adapter, its samples and metrics, and a warning that says what is missing and why."""
    not_a_model = tmp_path / "clip"
    not_a_model.mkdir()
    out = tmp_path / "out"
    code = cli_main(
        ["train", "--preset", "tiny-z-image", "--images", str(example_dir), "--caption", "a photo of [V]",
         "--trigger", "sks", "--steps", "2", "--out", str(out), "--eval-embedding-model", str(not_a_model), *FAST]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: report: the evaluation report failed after training" in captured.err
    assert str(not_a_model) in captured.err and "the adapter is kept" in captured.err
    assert (out / LORA_WEIGHT_NAME).is_file() and (out / "config.json").is_file()
    assert not (out / "report.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [w["stage"] for w in metrics["warnings"]] == ["report"]
    assert metrics["evaluation"] is None and metrics["samples"]
    assert all((out / sample).is_file() for sample in metrics["samples"])


def test_a_preview_of_photos_of_different_shapes_renders_on_tiny_flux2_klein(tmp_path: Path) -> None:
    """A preview renders each reference through the pipeline's reference-image input: the same limit applies."""
    from dopsd.config import DOPSDConfig
    from dopsd.preview import preview

    photos = five_photos(tmp_path / "photos")
    config = DOPSDConfig.for_preset(
        preset="tiny-flux2-klein",
        instance_data_dir=str(photos),
        output_dir=str(tmp_path / "out"),
        trigger="sks",
        default_caption="a photo of [V]",
        validation_prompts=["a photo of [V]"],
    )
    samples = preview(config, tmp_path / "preview")
    assert sorted(i.source or "" for i in samples.images) == sorted(name for name, _ in photo_jpegs())
