"""The `shapes` world, its ground-truth metrics (with the committed classifier), the base model's klein edit branch,
the training script's data and resumption, and the gate measurement's code paths. No training beyond 2 tiny steps."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from dopsd.evaluation.embedding import EmbedderError, load_embedder
from dopsd.presets import get_preset
from dopsd.shapes import gates, metrics, train_base, world
from dopsd.shapes.model import (
    REFERENCE_TIME_COORDINATE,
    ShapesModel,
    ShapesModelConfig,
    latent_ids,
    load_model,
    pack,
    patchify,
    save_model,
    text_ids,
    to_pixels,
    to_uint8,
    unpatchify,
)


WEIGHTS = Path(world.__file__).parent / "weights"
TINY = ShapesModelConfig(heads=1, head_dim=32, double_layers=1, single_layers=1, text_dim=16)


@pytest.fixture(scope="module")
def classifier() -> metrics.ShapeClassifier:
    return metrics.load_classifier()


# --- the world -----------------------------------------------------------------------------------------------


def test_renders_are_deterministic_two_coloured_and_captioned() -> None:
    a = [world.sample_scene(np.random.default_rng(3), s) for s in world.CLASSES]
    b = [world.sample_scene(np.random.default_rng(3), s) for s in world.CLASSES]
    assert a == b
    for scene in a:
        image = world.render(scene)
        assert image.shape == (world.SIZE, world.SIZE, 3) and image.dtype == np.uint8
        colours = {tuple(int(c) for c in px) for px in image.reshape(-1, 3)}
        assert colours == {world.COLOURS[scene.colour], world.COLOURS[scene.background]}
        assert 8 <= world.shape_mask(scene).sum() < world.SIZE**2 * 0.7
    assert a[0].caption() == f"a {a[0].colour} circle on a {a[0].background} background"
    cross = next(s for s in a if s.shape == world.NEW_CONCEPT)
    assert cross.caption() == f"a {cross.colour} [V] on a {cross.background} background"


def test_tokenize_pads_and_refuses_words_outside_the_world() -> None:
    ids = world.tokenize("a red circle on a blue background")
    assert len(ids) == world.MAX_TOKENS and ids[-1] == world.VOCABULARY.index(world.PAD)
    with pytest.raises(ValueError, match="vocabulary"):
        world.tokenize("a red cross on a blue background")
    with pytest.raises(ValueError, match="longer"):
        world.tokenize(" ".join(["a"] * (world.MAX_TOKENS + 1)))


def test_reference_keeps_the_shape_and_place_and_changes_colour() -> None:
    rng = np.random.default_rng(0)
    for shape in world.CLASSES:
        scene = world.sample_scene(rng, shape)
        ref = world.reference_for(rng, scene)
        assert ref.shape == scene.shape and ref.colour != scene.colour and ref.colour != ref.background
        assert ref.vertices == scene.vertices
        assert (ref.cx, ref.cy, ref.size) == (scene.cx, scene.cy, scene.size)
        assert (world.shape_mask(ref) == world.shape_mask(scene)).all()


def test_a_shifted_reference_keeps_the_shape_and_moves_within_the_world() -> None:
    rng = np.random.default_rng(3)
    lo, hi = world.SIZE / 2 - world.CENTRE_JITTER, world.SIZE / 2 + world.CENTRE_JITTER
    moved = []
    for i in range(200):
        scene = world.sample_scene(rng, world.CLASSES[i % len(world.CLASSES)])
        ref = world.reference_for(rng, scene, shift=2.0)
        assert ref.shape == scene.shape and ref.vertices == scene.vertices and ref.colour != scene.colour
        assert abs(ref.cx - scene.cx) <= 2.0 and abs(ref.cy - scene.cy) <= 2.0 and abs(ref.size - scene.size) <= 1.0
        assert lo <= ref.cx <= hi and lo <= ref.cy <= hi and world.SIZE_RANGE[0] <= ref.size <= world.SIZE_RANGE[1]
        moved.append(np.hypot(ref.cx - scene.cx, ref.cy - scene.cy))
    assert np.mean(moved) > 0.5  # the target is not where the reference is


def test_an_unshifted_reference_draws_the_aligned_worlds_stream() -> None:
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    scene = world.sample_scene(a, world.NEW_CONCEPT)
    assert world.sample_scene(b, world.NEW_CONCEPT) == scene
    assert world.reference_for(a, scene) == world.reference_for(b, scene, shift=0.0)
    assert a.random() == b.random()  # shift 0 draws nothing more: the committed runs' data are unchanged


def test_a_fraction_of_in_context_references_is_moved() -> None:
    def aligned(p_shift: float) -> float:
        _, targets, refs = train_base.in_context_batch(np.random.default_rng(5), 200, shift=2.0, p_shift=p_shift)
        masks = [[(im != im[0, 0]).any(-1) for im in pair] for pair in zip(targets, refs, strict=True)]
        return float(np.mean([np.array_equal(t, r) for t, r in masks]))

    assert aligned(0.0) == 1.0
    assert 0.35 < aligned(0.5) < 0.75  # moved references rarely keep the target's exact pixels
    assert aligned(1.0) < 0.25


def test_pretraining_data_never_shows_the_new_concept_or_its_trigger() -> None:
    rng = np.random.default_rng(1)
    captions, _ = train_base.text_only_batch(rng, 300)
    ctx_captions, _, _ = train_base.in_context_batch(rng, 300)
    assert all(world.TRIGGER not in c for c in captions + ctx_captions)
    assert all(c.split()[2] in world.BASE_SHAPES for c in captions)
    words = {c.split()[2] for c in ctx_captions}
    assert words == {*world.BASE_SHAPES, world.OBJECT}  # the neutral word appears, so copying is trained


def test_pretraining_images_contain_no_cross(classifier: metrics.ShapeClassifier) -> None:
    rng = np.random.default_rng(2)
    _, images = train_base.text_only_batch(rng, 200)
    _, targets, refs = train_base.in_context_batch(rng, 200)
    assert world.NEW_CONCEPT not in metrics.classify(classifier, images + targets + refs)


# --- the metrics -----------------------------------------------------------------------------------------------


def test_committed_classifier_matches_its_record_and_reads_fresh_renders(classifier: metrics.ShapeClassifier) -> None:
    record = json.loads((WEIGHTS / "classifier.json").read_text())
    assert hashlib.sha256((WEIGHTS / "classifier.safetensors").read_bytes()).hexdigest() == record["sha256"]
    acc = metrics.clean_accuracy(classifier, seed=12345, n=1000)
    assert acc["all"] >= 0.98, acc
    assert acc[world.NEW_CONCEPT] >= 0.98, acc


def test_the_reports_embedder_never_saw_the_cross_yet_tells_crosses_from_other_shapes() -> None:
    """`shapes://embedder`, the preset's embedding model for the report's similarity figure: the committed weights
    match their record, its classes leave the new concept out, and a cross's embedding is nearer other crosses (in
    other colours and places) than any pretraining shape's."""
    record = json.loads((WEIGHTS / "embedder.json").read_text())
    assert hashlib.sha256((WEIGHTS / "embedder.safetensors").read_bytes()).hexdigest() == record["sha256"]
    assert world.NEW_CONCEPT not in record["labels"] and get_preset("shapes").embedding_model == "shapes://embedder"
    embedder = load_embedder("shapes://embedder")
    assert not embedder.has_text
    rng = np.random.default_rng(31)

    def embed(shape: str) -> torch.Tensor:
        images = np.stack([world.render(world.sample_scene(rng, shape)) for _ in range(32)])
        return embedder.embed_images(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)

    crosses, others = embed(world.NEW_CONCEPT), {s: embed(s) for s in world.BASE_SHAPES}
    assert torch.allclose(crosses.norm(dim=-1), torch.ones(32), atol=1e-5)
    within = float((crosses @ crosses.T).mean())
    for shape, embedded in others.items():
        assert within > float((crosses @ embedded.T).mean()) + 0.05, shape
    with pytest.raises(EmbedderError, match="ships 'shapes://embedder'"):
        load_embedder("shapes://classifier")


def test_speckle_is_no_shape_and_a_render_is_not(classifier: metrics.ShapeClassifier) -> None:
    rng = np.random.default_rng(99)
    garbage = [metrics.garbage_image(rng) for _ in range(200)]
    renders = [world.render(world.sample_scene(rng, s)) for s in world.CLASSES for _ in range(40)]
    assert np.mean([p == metrics.NONE for p in metrics.classify(classifier, garbage)]) >= 0.95
    assert np.mean([p == metrics.NONE for p in metrics.classify(classifier, renders)]) <= 0.02


def test_purity_and_colour_match_are_one_on_renders_and_fall_on_wrong_images() -> None:
    rng = np.random.default_rng(4)
    scenes = [world.sample_scene(rng) for _ in range(50)]
    images = [world.render(s) for s in scenes]
    assert all(metrics.colour_purity(im, s.colour, s.background) == 1.0 for im, s in zip(images, scenes, strict=True))
    assert all(metrics.colours_match(im, s.colour, s.background) for im, s in zip(images, scenes, strict=True))
    scene = scenes[0]
    grey = np.full_like(images[0], 128)
    assert metrics.colour_purity(grey, scene.colour, scene.background) == 0.0
    swapped = world.render(world.Scene(scene.shape, scene.background, scene.colour, scene.cx, scene.cy, scene.size))
    assert not metrics.colours_match(swapped, scene.colour, scene.background)


def test_frechet_distance_separates_sets(classifier: metrics.ShapeClassifier) -> None:
    rng = np.random.default_rng(5)
    a = [world.render(world.sample_scene(rng)) for _ in range(200)]
    b = [world.render(world.sample_scene(rng)) for _ in range(200)]
    noisy = [np.clip(im + rng.normal(0, 60, im.shape), 0, 255).astype(np.uint8) for im in b]
    fa, fb, fn = (metrics.features(classifier, x) for x in (a, b, noisy))
    assert abs(metrics.frechet_distance(fa, fa)) < 1e-6 * np.trace(np.cov(fa, rowvar=False))  # rounding only
    assert metrics.frechet_distance(fa, fb) < 0.25 * metrics.frechet_distance(fa, fn)


def test_diversity_shows_collapse() -> None:
    rng = np.random.default_rng(6)
    scenes = [world.sample_scene(rng) for _ in range(100)]
    spread = metrics.diversity([world.render(s) for s in scenes], [s.colour for s in scenes])
    assert spread["found"] == 1.0 and spread["x_std"] > 0.8 and spread["size_std"] > 0.3
    same = [world.render(scenes[0])] * 100
    collapsed = metrics.diversity(same, [scenes[0].colour] * 100)
    assert collapsed["x_std"] == 0.0 and collapsed["size_std"] == 0.0


# --- the model -------------------------------------------------------------------------------------------------


def test_packing_and_position_ids_match_the_klein_pipeline() -> None:
    x = torch.randn(2, 3, world.SIZE, world.SIZE)
    packed = patchify(x)
    assert torch.equal(packed, Flux2KleinPipeline._patchify_latents(x))
    assert torch.equal(unpatchify(packed), x)
    assert torch.equal(pack(packed), Flux2KleinPipeline._pack_latents(packed))
    assert torch.equal(latent_ids(8, 8, 2, x.device), Flux2KleinPipeline._prepare_latent_ids(packed))
    ref_ids = Flux2KleinPipeline._prepare_image_ids([packed[:1]], scale=REFERENCE_TIME_COORDINATE)
    assert torch.equal(latent_ids(8, 8, 1, x.device, time=REFERENCE_TIME_COORDINATE), ref_ids)
    text = torch.zeros(2, world.MAX_TOKENS, 4)
    assert torch.equal(text_ids(2, world.MAX_TOKENS, x.device), Flux2KleinPipeline._prepare_text_ids(text))


def test_reference_reaches_the_output_through_the_edit_branch() -> None:
    torch.manual_seed(0)
    model = ShapesModel(TINY).eval()
    x, ref = torch.randn(2, 3, world.SIZE, world.SIZE), torch.randn(2, 3, world.SIZE, world.SIZE)
    text = model.text.encode(["a red circle on a blue background", "a red object on a blue background"])
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        plain, with_ref = model.velocity(x, sigma, text), model.velocity(x, sigma, text, ref)
        other_ref = model.velocity(x, sigma, text, torch.randn_like(ref))
    assert plain.shape == with_ref.shape == x.shape
    assert (with_ref - plain).abs().max() > 1e-4 and (with_ref - other_ref).abs().max() > 1e-4


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = ShapesModel(TINY).eval()
    save_model(model, tmp_path / "m.safetensors", {"step": 3})
    loaded = load_model(tmp_path / "m.safetensors")
    captions = ["a green square on a red background"]
    a = model.sample(captions, steps=2, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(captions, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert np.array_equal(to_uint8(to_pixels(list(to_uint8(a)))), to_uint8(a))


@pytest.mark.parametrize("name", ["base", "distilled"])
def test_committed_checkpoint_matches_its_hash_and_samples(name: str) -> None:
    weights = WEIGHTS / f"{name}.safetensors"
    expected = (WEIGHTS / f"{name}.safetensors.sha256").read_text().split()[0]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == expected
    if name == "distilled":  # distilled from the committed base, as its header says
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata()
        base = (WEIGHTS / "base.safetensors.sha256").read_text().split()[0]
        assert header["base_sha256"] == base and json.loads(header["sigmas"]) == [1.0, 0.75, 0.5, 0.25, 0.0]
    model = load_model(weights)
    image = model.sample(["a red circle on a blue background"], steps=2, generator=torch.Generator().manual_seed(0))
    assert image.shape == (1, 3, world.SIZE, world.SIZE) and torch.isfinite(image).all()


# --- training and gates ------------------------------------------------------------------------------------------


def _train_args(tmp_path: Path, steps: int) -> list[str]:
    return [
        "--steps", str(steps), "--batch", "4", "--heads", "1", "--double-layers", "1", "--single-layers", "1",
        "--log-every", "1", "--save-every", "1", "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state.pt"),
        "--resume", "--warmup", "1",
    ]  # fmt: skip


def test_training_resumes_exactly(tmp_path: Path) -> None:
    train_base.main(_train_args(tmp_path / "a", 2))
    train_base.main(_train_args(tmp_path / "b", 1))
    train_base.main(_train_args(tmp_path / "b", 2))
    a = load_model(tmp_path / "a" / "out" / "base.safetensors").state_dict()
    b = load_model(tmp_path / "b" / "out" / "base.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "b" / "out" / "base-train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss_text" in r] == [1, 2]
    assert all(np.isfinite(r["loss_ref"]) for r in log if "loss_ref" in r)
    torch.set_num_threads(2)  # train_base sets its own thread count


def test_a_decaying_run_ends_at_a_small_learning_rate(tmp_path: Path) -> None:
    train_base.main([*_train_args(tmp_path, 4), "--lr", "1e-3", "--decay-steps", "2"])
    log = [json.loads(line) for line in (tmp_path / "out" / "base-train.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if "loss_text" in r] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])
    torch.set_num_threads(2)


class _Copier:
    """A stand-in teacher that draws its reference, moved by `jitter` px at random per sample (0: a pure copier)."""

    def __init__(self, jitter: int) -> None:
        self.jitter = jitter

    def sample(self, captions, *, steps, generator, references):  # type: ignore[no-untyped-def]
        shifts = torch.randint(-self.jitter, self.jitter + 1, (len(captions), 2), generator=generator)
        moved = [
            torch.roll(r, (int(dy), int(dx)), dims=(1, 2)) for r, (dy, dx) in zip(references, shifts, strict=True)
        ]
        return torch.stack(moved)


def test_teacher_variation_tells_a_copier_from_a_teacher_that_varies() -> None:
    copier = gates.teacher_variation(_Copier(0), steps=1, n=24, seed=0)  # type: ignore[arg-type]
    varies = gates.teacher_variation(_Copier(2), steps=1, n=24, seed=0)  # type: ignore[arg-type]
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in copier.values()), copier
    assert varies["x_std"] > 0.5 and varies["y_std"] > 0.5, varies


def test_gate_measurement_runs_every_probe(classifier: metrics.ShapeClassifier) -> None:
    torch.manual_seed(2)
    result = gates.measure(ShapesModel(TINY).eval(), classifier, steps=2, n=3)
    prior = result["prior"]
    assert isinstance(prior, dict) and 0.0 <= prior["accuracy"] <= 1.0 and prior["frechet"] > 0.0
    misses = ("cross_rate", "object_rate", "wrong_shape_rate", "no_shape_rate")
    assert sum(prior[k] for k in misses) == pytest.approx(1.0 - prior["accuracy"])  # every miss is counted once
    spread = result["teacher_noise_spread"]
    assert isinstance(spread, dict) and set(spread) == {"x_std", "y_std", "size_std"}
    for key in ("teacher_concept_rate", "trigger_text_concept_rate", "copy_known_shapes_accuracy"):
        assert 0.0 <= float(result[key]) <= 1.0  # type: ignore[arg-type]
    flags = result["gates"]
    assert isinstance(flags, dict)
    assert set(flags) == {"prior_accuracy", "teacher_concept_rate", "trigger_text_near_zero"}


def test_classify_cli_reads_the_bundled_crosses_and_refuses_other_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crosses = sorted(str(p) for p in (Path(__file__).parents[2] / "examples" / "shapes").glob("cross-*.png"))
    circle = tmp_path / "circle.png"
    Image.fromarray(world.render(world.sample_scene(np.random.default_rng(0), "circle"))).save(circle)
    metrics.main(["classify", *crosses, str(circle)])
    out = json.loads(capsys.readouterr().out)
    assert out["counts"] == {"circle": 1, "cross": len(crosses)} and len(crosses) == 6
    assert out["images"][str(circle)] == "circle"
    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    with pytest.raises(SystemExit, match="32x32"):
        metrics.main(["classify", str(tmp_path / "big.png")])
