"""Tests for dopsd.data: image validation, captions, concept dataset loading and aspect buckets."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, features

from dopsd import data
from dopsd.data import (
    BASE_BUCKETS_1MP,
    MAX_IMAGE_PIXELS,
    ConceptDataset,
    ConceptItem,
    DataError,
    buckets_for_resolution,
    load_captions_file,
    load_concept_dataset,
    load_image,
    nearest_bucket,
    resize_to_cover,
    resolve_caption,
)


def _save(
    path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (10, 120, 200), fmt: str | None = None
) -> Path:
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height (1-bit gray) but carries almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(body)
    return path


def _load_dir(directory: Path, **kwargs: object) -> ConceptDataset:
    params: dict[str, object] = {"trigger": "sks", "default_caption": "a photo of [V] dog", "min_side": 16}
    params.update(kwargs)
    return load_concept_dataset(directory, **params)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# DataError
# ----------------------------------------------------------------------------------------------------------


def test_data_error_fields_and_message() -> None:
    err = DataError("unreadable_image", "truncated or unreadable image (image file is truncated)", "cat.png")
    assert isinstance(err, ValueError)
    assert err.code == "unreadable_image"
    assert err.file == "cat.png"
    assert str(err) == "cat.png: truncated or unreadable image (image file is truncated)"
    assert err.as_dict()["code"] == "unreadable_image"
    assert str(DataError("no_images", "no image files were provided")) == "no image files were provided"


# ----------------------------------------------------------------------------------------------------------
# load_image: one test per error code
# ----------------------------------------------------------------------------------------------------------


def test_truncated_png_is_unreadable(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    Image.effect_noise((128, 128), 64).convert("RGB").save(full)
    raw = full.read_bytes()
    cut = tmp_path / "cat.png"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        load_image(cut, min_side=16)
    assert info.value.code == "unreadable_image"
    assert info.value.file == "cat.png"
    assert str(info.value).startswith("cat.png: truncated or unreadable image")


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_image(tmp_path / "nope.png", min_side=16)
    assert info.value.code == "unreadable_image"
    assert info.value.file == "nope.png"


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("hello, I am not a picture\n")
    with pytest.raises(DataError) as info:
        load_image(fake, min_side=16)
    assert info.value.code == "not_an_image"
    assert info.value.file == "fake.png"


def test_svg_is_not_an_image(tmp_path: Path) -> None:
    svg = tmp_path / "logo.svg"
    svg.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
    )
    with pytest.raises(DataError) as info:
        load_image(svg, min_side=16)
    assert info.value.code == "not_an_image"


def test_empty_file_is_not_an_image(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_image(empty, min_side=16)
    assert info.value.code == "not_an_image"


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_gif_and_bmp_are_unsupported(tmp_path: Path, fmt: str) -> None:
    path = _save(tmp_path / f"anim.{fmt.lower()}", fmt=fmt)
    with pytest.raises(DataError) as info:
        load_image(path, min_side=16)
    assert info.value.code == "unsupported_format"
    assert fmt in info.value.reason


def test_decompression_bomb_via_max_pixels(tmp_path: Path) -> None:
    path = _save(tmp_path / "big.png", size=(100, 100))
    with pytest.raises(DataError) as info:
        load_image(path, min_side=16, max_pixels=5_000)
    assert info.value.code == "decompression_bomb"
    assert "100x100" in info.value.reason
    # The same file is fine under the default limit.
    assert load_image(path, min_side=16).size == (100, 100)


def test_decompression_bomb_one_bit_png_with_lowered_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (3000, 3000)).save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError) as info:
        load_image(path, min_side=16, max_pixels=1_000_000)
    assert info.value.code == "decompression_bomb"


def test_decompression_bomb_header_only_default_limit(tmp_path: Path) -> None:
    # 9000 x 9000 = 81 MP: above our 64 MP limit, below Pillow's own limit; must fail before decoding.
    assert 9000 * 9000 > MAX_IMAGE_PIXELS
    path = _png_header_only(tmp_path / "bomb.png", 9000, 9000)
    with pytest.raises(DataError) as info:
        load_image(path, min_side=16)
    assert info.value.code == "decompression_bomb"


def test_decompression_bomb_pillow_error_and_warning(tmp_path: Path) -> None:
    # Pillow's own guard raises above 2x its limit and warns above 1x; both must become DataError.
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert pil_limit is not None
    side_error = math.isqrt(3 * pil_limit)
    side_warn = math.isqrt(int(1.5 * pil_limit))
    for side in (side_error, side_warn):
        path = _png_header_only(tmp_path / f"bomb{side}.png", side, side)
        with pytest.raises(DataError) as info:
            load_image(path, min_side=16, max_pixels=10**12)
        assert info.value.code == "decompression_bomb"


def test_image_too_small(tmp_path: Path) -> None:
    path = _save(tmp_path / "tiny.png", size=(300, 100))
    with pytest.raises(DataError) as info:
        load_image(path, min_side=256)
    assert info.value.code == "image_too_small"
    assert "300x100" in info.value.reason
    assert "256" in info.value.reason


def test_name_overrides_basename_in_errors(tmp_path: Path) -> None:
    fake = tmp_path / "upload-123.tmp"
    fake.write_text("nope")
    with pytest.raises(DataError) as info:
        load_image(fake, min_side=16, name="holiday.jpg")
    assert info.value.file == "holiday.jpg"
    assert str(info.value).startswith("holiday.jpg: ")


# ----------------------------------------------------------------------------------------------------------
# load_image: accepted inputs
# ----------------------------------------------------------------------------------------------------------


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    loaded = load_image(path, min_side=16)
    assert loaded.size == (20, 40)
    assert loaded.mode == "RGB"


def test_min_side_checked_after_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    with pytest.raises(DataError) as info:
        load_image(path, min_side=30)
    assert info.value.code == "image_too_small"
    assert "20x40" in info.value.reason


def test_sixteen_bit_png_is_scaled_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.new("I;16", (32, 32), 60000).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    loaded = load_image(path, min_side=16)
    assert loaded.mode == "RGB"
    r, g, b = loaded.getpixel((0, 0))  # type: ignore[misc]
    assert r == g == b
    assert 225 <= r <= 240  # 60000 / 65535 * 255 ~= 233, not clipped to 255


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    loaded = load_image(path, min_side=16)
    assert loaded.mode == "RGB"
    r, g, b = loaded.getpixel((16, 16))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_is_accepted(tmp_path: Path) -> None:
    path = _save(tmp_path / "photo.webp", size=(48, 32), fmt="WEBP")
    loaded = load_image(path, min_side=16)
    assert loaded.size == (48, 32)
    assert loaded.mode == "RGB"


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.save(path)
    loaded = load_image(path, min_side=16)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1"])
def test_other_modes_are_converted(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"img_{mode}.png"
    Image.new("RGB", (32, 32), (0, 128, 255)).convert(mode).save(path)
    loaded = load_image(path, min_side=16)
    assert loaded.mode == "RGB"
    assert loaded.size == (32, 32)


def test_palette_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "pal.png"
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.info["transparency"] = 0
    img.putpixel((1, 1), 1)
    img.save(path, transparency=0)
    loaded = load_image(path, min_side=16)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (0, 255, 0)


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------


def test_resolve_caption_replaces_every_placeholder() -> None:
    assert resolve_caption("  a photo of [V] dog, [V] running  ", "sks") == "a photo of sks dog, sks running"


def test_resolve_caption_without_placeholder_unchanged() -> None:
    assert resolve_caption(" a photo of a dog ", "sks") == "a photo of a dog"


@pytest.mark.parametrize("caption", ["", "   ", "\n\t"])
def test_resolve_caption_empty(caption: str) -> None:
    with pytest.raises(DataError) as info:
        resolve_caption(caption, "sks")
    assert info.value.code == "empty_caption"


def test_resolve_caption_missing_trigger() -> None:
    with pytest.raises(DataError) as info:
        resolve_caption("a photo of [V]", "  ")
    assert info.value.code == "missing_trigger"


def test_load_captions_file(tmp_path: Path) -> None:
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"a.png": "a photo of [V]", "b.png": ["one [V]", "two [V]"]}))
    assert load_captions_file(path) == {"a.png": ["a photo of [V]"], "b.png": ["one [V]", "two [V]"]}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ('["a.png"]', "JSON object"),
        ('{"a.png": 3}', "'a.png'"),
        ('{"a.png": ["ok", 7]}', "'a.png'"),
    ],
)
def test_load_captions_file_invalid(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "captions.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_captions_file(path)
    assert info.value.code == "invalid_captions_file"
    assert info.value.file == "captions.json"
    assert fragment in info.value.reason


def test_load_captions_file_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_captions_file(tmp_path / "captions.json")
    assert info.value.code == "invalid_captions_file"


# ----------------------------------------------------------------------------------------------------------
# load_concept_dataset
# ----------------------------------------------------------------------------------------------------------


def test_directory_order_stable_and_default_caption(tmp_path: Path) -> None:
    for name in ("c.png", "a.jpg", "b.png"):
        _save(tmp_path / name)
    ds = _load_dir(tmp_path)
    assert [item.name for item in ds.items] == ["a.jpg", "b.png", "c.png"]
    assert len(ds) == 3
    assert ds.trigger == "sks"
    assert all(item.captions == ("a photo of sks dog",) for item in ds.items)
    assert all(isinstance(item, ConceptItem) and item.image.mode == "RGB" for item in ds.items)
    assert ds.pairs == [(0, "a photo of sks dog"), (1, "a photo of sks dog"), (2, "a photo of sks dog")]


def test_several_captions_per_image(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        _save(tmp_path / name)
    ds = _load_dir(tmp_path, captions={"b.png": ["[V] on grass", "close-up of [V]"]})
    assert ds.items[0].captions == ("a photo of sks dog",)
    assert ds.items[1].captions == ("sks on grass", "close-up of sks")
    assert ds.pairs == [(0, "a photo of sks dog"), (1, "sks on grass"), (1, "close-up of sks")]


def test_captions_json_and_hidden_files_skipped(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": ["[V] dog"]}))
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / "nested").mkdir()
    _save(tmp_path / "nested" / "z.png")
    captions = load_captions_file(tmp_path / "captions.json")
    ds = _load_dir(tmp_path, captions=captions, default_caption=None)
    assert [item.name for item in ds.items] == ["a.png"]
    assert ds.items[0].captions == ("sks dog",)


def test_non_image_in_directory_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("remember to buy dog food")
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path)
    assert info.value.code == "not_an_image"
    assert info.value.file == "notes.txt"


def test_explicit_file_list_keeps_order(tmp_path: Path) -> None:
    paths = [_save(tmp_path / "z.png"), _save(tmp_path / "a.png")]
    ds = load_concept_dataset(files=paths, trigger="sks", default_caption="[V]", min_side=16)
    assert [item.name for item in ds.items] == ["z.png", "a.png"]
    assert ds.pairs == [(0, "sks"), (1, "sks")]


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "captions.json").write_text("{}")
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path)
    assert info.value.code == "no_images"
    with pytest.raises(DataError) as info:
        load_concept_dataset(files=[], trigger="sks", default_caption="[V]", min_side=16)
    assert info.value.code == "no_images"


def test_missing_directory_is_no_images(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path / "does-not-exist")
    assert info.value.code == "no_images"


def test_too_many_images(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _save(tmp_path / name)
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path, max_images=2)
    assert info.value.code == "too_many_images"
    assert "3" in info.value.reason and "2" in info.value.reason


def test_unknown_caption_file(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path, captions={"missing.png": ["a photo of [V]"]})
    assert info.value.code == "unknown_caption_file"
    assert info.value.file == "missing.png"


def test_empty_caption_without_default(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path, default_caption=None, captions={"a.png": ["[V]"]})
    assert info.value.code == "empty_caption"
    assert info.value.file == "b.png"


def test_blank_caption_in_mapping_names_file(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path, captions={"a.png": ["ok [V]", "   "]})
    assert info.value.code == "empty_caption"
    assert info.value.file == "a.png"


def test_missing_trigger_in_dataset(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path, trigger="")
    assert info.value.code == "missing_trigger"
    assert info.value.file == "a.png"


def test_duplicate_file_names(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    paths = [_save(tmp_path / "x" / "a.png"), _save(tmp_path / "y" / "a.png")]
    with pytest.raises(DataError) as info:
        load_concept_dataset(files=paths, trigger="sks", default_caption="[V]", min_side=16)
    assert info.value.code == "duplicate_file_name"


def test_image_errors_propagate_from_dataset(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", size=(64, 64))
    _save(tmp_path / "b.png", size=(64, 8))
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path, min_side=32)
    assert info.value.code == "image_too_small"
    assert info.value.file == "b.png"


def test_dataset_max_pixels_override(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", size=(100, 100))
    with pytest.raises(DataError) as info:
        _load_dir(tmp_path, max_pixels=1_000)
    assert info.value.code == "decompression_bomb"


def test_image_dir_and_files_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        load_concept_dataset(tmp_path, files=[], trigger="sks", default_caption="[V]", min_side=16)
    with pytest.raises(ValueError, match="exactly one"):
        load_concept_dataset(trigger="sks", default_caption="[V]", min_side=16)


# ----------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------


def test_buckets_1024_exact() -> None:
    assert buckets_for_resolution(1024) == list(BASE_BUCKETS_1MP)


def test_buckets_512() -> None:
    buckets = buckets_for_resolution(512)
    assert (512, 512) in buckets
    assert len(buckets) == len(set(buckets))
    for (w, h), (bw, bh) in zip(buckets, BASE_BUCKETS_1MP, strict=True):
        assert w % 16 == 0 and h % 16 == 0
        # Every bucket's area is within 10% of its base bucket's area scaled to 512^2 / 1024^2 ...
        assert abs(w * h - bw * bh / 4) <= 0.1 * bw * bh / 4
        # ... and never exceeds the 512^2 budget by more than 10%.
        assert w * h <= 1.1 * 512**2
    # The near-square buckets (the 1 MP ones in the base list) are within 10% of 512^2 itself.
    for w, h in buckets[:7]:
        assert abs(w * h - 512**2) <= 0.1 * 512**2


def test_buckets_small_resolution_dedup_and_minimum() -> None:
    buckets = buckets_for_resolution(32)
    assert len(buckets) == len(set(buckets))
    assert all(w >= 16 and h >= 16 and w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert buckets[0] == (32, 32)


def test_buckets_custom_multiple() -> None:
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets_for_resolution(768, multiple=64))


def test_nearest_bucket() -> None:
    buckets = buckets_for_resolution(1024)
    assert nearest_bucket(3000, 4000, buckets) == (864, 1152)
    assert nearest_bucket(2000, 3000, buckets) == (832, 1248)
    assert nearest_bucket(1920, 1080, buckets) == (1280, 720)
    assert nearest_bucket(500, 500, buckets) == (1024, 1024)
    w, h = nearest_bucket(100, 300, buckets)
    assert h > w


def test_resize_to_cover_exact_size() -> None:
    img = Image.new("RGB", (640, 480), (1, 2, 3))
    for size in [(512, 512), (576, 1344), (1344, 576), (100, 75)]:
        out = resize_to_cover(img, size)
        assert out.size == size
        assert out.mode == "RGB"


def test_resize_to_cover_center_crops() -> None:
    # Left third red, middle third green, right third blue; a square crop must keep the green centre.
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    out = resize_to_cover(img, (50, 50))
    assert out.getpixel((25, 25)) == (0, 255, 0)


# ----------------------------------------------------------------------------------------------------------
# Import hygiene
# ----------------------------------------------------------------------------------------------------------


def test_module_does_not_import_torch() -> None:
    code = "import sys, dopsd.data; sys.exit(1 if 'torch' in sys.modules or 'numpy' in sys.modules else 0)"
    root = Path(data.__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
