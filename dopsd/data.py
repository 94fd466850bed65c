"""Concept-image dataset loading, caption handling and aspect-ratio bucketing for D-OPSD LoRA training.

This module deliberately depends only on the standard library and Pillow (no torch, no numpy) so that the
HTTP API can validate uploaded training images and captions without loading the training stack.

Every problem with user-supplied data is reported as a :class:`DataError` carrying a stable machine-readable
``code``, the offending ``file`` name (when there is one) and a human-readable ``reason``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError


__all__ = [
    "BASE_BUCKETS_1MP",
    "CAPTIONS_FILE_NAME",
    "FORMAT_ALIASES",
    "MAX_IMAGES",
    "MAX_IMAGE_PIXELS",
    "SUPPORTED_FORMATS",
    "TRIGGER_PLACEHOLDER",
    "ConceptDataset",
    "ConceptItem",
    "DataError",
    "buckets_for_resolution",
    "header_refusal",
    "load_captions_file",
    "load_concept_dataset",
    "load_image",
    "nearest_bucket",
    "resize_to_cover",
    "resolve_caption",
]

#: Pillow format names accepted for training images.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
#: Maximum number of images in one concept dataset.
MAX_IMAGES: int = 64
#: Images whose header claims more pixels than this are rejected as decompression bombs (before decoding).
MAX_IMAGE_PIXELS: int = 64_000_000
#: Placeholder in caption templates that is replaced by the trigger word.
TRIGGER_PLACEHOLDER: str = "[V]"
#: Name of the optional captions file that may live next to the images; it is skipped when listing images.
CAPTIONS_FILE_NAME: str = "captions.json"

# Pillow format names that are the same container as a supported format. Many cameras write multi-picture
# JPEGs which Pillow reports as "MPO"; they are ordinary JPEGs for our purposes (the first picture is used).
FORMAT_ALIASES: dict[str, str] = {"MPO": "JPEG"}

# Aspect buckets at ~1 megapixel, as (width, height).
BASE_BUCKETS_1MP: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1152, 864),
    (864, 1152),
    (1248, 832),
    (832, 1248),
    (1280, 720),
    (720, 1280),
    (1344, 576),
    (576, 1344),
)
_BASE_RESOLUTION = 1024


class DataError(ValueError):
    """A problem with user-supplied training data (images, captions), with a stable machine-readable code.

    It subclasses ``ValueError`` so generic callers still treat it as bad input, while the API can map
    ``code`` to a typed error response and show ``str(err)`` (one line naming the file) to the user.

    Codes: ``no_images``, ``too_many_images``, ``unreadable_image``, ``not_an_image``, ``unsupported_format``,
    ``image_too_small``, ``decompression_bomb``, ``empty_caption``, ``unknown_caption_file``,
    ``missing_trigger``, ``duplicate_file_name``, ``invalid_captions_file``.
    """

    code: str
    file: str | None
    reason: str

    def __init__(self, code: str, reason: str, file: str | None = None) -> None:
        """Create the error from a machine code, a human reason and optionally the offending file's name."""
        self.code = code
        self.file = file
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.file}: {self.reason}" if self.file else self.reason

    def __str__(self) -> str:
        """Return one line: ``"<file>: <reason>"`` or just the reason when no file is involved."""
        return self._message()

    def __repr__(self) -> str:
        """Return a debug representation with all three fields."""
        return f"DataError(code={self.code!r}, reason={self.reason!r}, file={self.file!r})"

    def with_file(self, file: str) -> DataError:
        """Return a copy of this error attributed to ``file`` (used when a file-less helper failed for a file)."""
        return DataError(self.code, self.reason, file=file)

    def as_dict(self) -> dict[str, str | None]:
        """Return ``{"code", "file", "reason", "message"}`` for JSON error responses."""
        return {"code": self.code, "file": self.file, "reason": self.reason, "message": str(self)}


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded Pillow image to 8-bit RGB; transparency is composited onto white."""
    mode = image.mode
    if mode.startswith("I"):
        # 16-bit grayscale (the only integer mode the supported formats produce, from PNG): Pillow's plain
        # convert() clips to 0..255, turning most 16-bit data white, so rescale the full range to 8 bits.
        scaled = image.convert("I").point(lambda v: v * (1.0 / 257.0))
        return scaled.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def header_refusal(width: int, height: int, image_format: str | None, *, max_pixels: int) -> tuple[str, str] | None:
    """Why an image's header alone refuses it, as (code, reason): invalid dimensions, more pixels than
    `max_pixels` (a decompression bomb), a format other than PNG, JPEG or WebP; None if it passes. One rule for the
    API, which checks uploads before decoding them, and the trainer, which checks them again as it loads them."""
    if width <= 0 or height <= 0:
        return "unreadable_image", f"invalid image dimensions {width}x{height}"
    if width * height > max_pixels:
        return (
            "decompression_bomb",
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
        )
    if FORMAT_ALIASES.get(image_format or "", image_format or "") not in SUPPORTED_FORMATS:
        return "unsupported_format", (
            f"unsupported image format {image_format or 'unknown'} (supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    return None


def load_image(
    path: Path | str,
    *,
    min_side: int,
    name: str | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Open, validate and fully decode one training image, returning an 8-bit RGB image.

    Why so strict: a bad file must fail here, at upload/validation time, with a precise typed error, rather
    than deep inside a training job. The checks, in order:

    * not decodable as any image (text file, SVG, empty file) -> ``not_an_image``;
    * header claims more than ``max_pixels`` pixels (default :data:`MAX_IMAGE_PIXELS`), or Pillow's own
      decompression-bomb guard fires -> ``decompression_bomb``; this is checked from the header only,
      before any pixel data is decoded;
    * a format other than :data:`SUPPORTED_FORMATS` (GIF, BMP, TIFF, ...) -> ``unsupported_format``;
    * pixel data cannot be fully decoded (truncated/corrupt) or the file cannot be read -> ``unreadable_image``;
    * after EXIF orientation is applied, the short side is below ``min_side`` -> ``image_too_small``.

    16-bit, CMYK, palette, L/LA and RGBA images are accepted; alpha is composited onto white.
    Errors name the file by ``name`` if given, else by the path's basename.
    """
    if min_side < 0:
        raise ValueError(f"min_side must be >= 0, got {min_side}")
    path = Path(path)
    label = name if name is not None else path.name
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels

    with warnings.catch_warnings():
        # Pillow warns (rather than raises) for images between its limit and twice its limit; make it fatal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(
                "decompression_bomb", f"image is too large to decode safely ({_describe(exc)})", label
            ) from exc
        except UnidentifiedImageError:
            raise DataError("not_an_image", "not a recognizable image file", label) from None
        except OSError as exc:
            raise DataError("unreadable_image", f"cannot read file ({_describe(exc)})", label) from exc
        except Exception as exc:  # any parser failure on untrusted input means "not an image"
            raise DataError("not_an_image", f"not a recognizable image file ({_describe(exc)})", label) from exc

        with opened as img:
            width, height = img.size
            refused = header_refusal(width, height, img.format, max_pixels=limit)
            if refused is not None:
                raise DataError(*refused, label)
            try:
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise DataError(
                    "decompression_bomb", f"image is too large to decode safely ({_describe(exc)})", label
                ) from exc
            except Exception as exc:  # truncated/corrupt data surfaces as many exception types
                raise DataError(
                    "unreadable_image", f"truncated or unreadable image ({_describe(exc)})", label
                ) from exc

            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:
                oriented = img.copy()
            try:
                rgb = _to_rgb(oriented)
            except Exception as exc:  # exotic modes Pillow cannot convert
                raise DataError(
                    "unreadable_image", f"cannot convert image mode {oriented.mode} to RGB ({_describe(exc)})", label
                ) from exc

    short = min(rgb.size)
    if short < min_side:
        raise DataError(
            "image_too_small",
            f"image is {rgb.width}x{rgb.height}; its short side {short}px is below the minimum of {min_side}px",
            label,
        )
    return rgb


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------


def image_files(image_dir: Path | str) -> list[Path]:
    """The image files of a folder, as `load_concept_dataset` takes them (sorted; hidden files skipped)."""
    return _list_image_dir(Path(image_dir))


def resolve_caption(template: str, trigger: str) -> str:
    """Replace every ``[V]`` in a caption template with the trigger word and return the stripped caption.

    The placeholder lets users write captions once ("a photo of [V] dog") independent of the trigger word
    chosen for the LoRA. A caption without the placeholder is returned unchanged (apart from stripping).
    Raises ``DataError("empty_caption")`` for an empty/whitespace-only caption, and
    ``DataError("missing_trigger")`` if the caption uses the placeholder but the trigger is empty.
    """
    caption = template.strip()
    if not caption:
        raise DataError("empty_caption", "caption is empty")
    if TRIGGER_PLACEHOLDER in caption:
        word = trigger.strip()
        if not word:
            raise DataError("missing_trigger", f"caption uses {TRIGGER_PLACEHOLDER} but the trigger word is empty")
        caption = caption.replace(TRIGGER_PLACEHOLDER, word).strip()
    return caption


def load_captions_file(path: Path | str) -> dict[str, list[str]]:
    """Read a JSON captions file mapping image file names to a caption string or a list of caption strings.

    Returns ``{file_name: [caption, ...]}`` (a single string becomes a one-element list). Captions are not
    resolved or checked for emptiness here; :func:`load_concept_dataset` does that per image so its errors
    name the image. Any malformation raises ``DataError("invalid_captions_file")`` with a clear reason.
    """
    path = Path(path)
    label = path.name

    def fail(reason: str) -> DataError:
        return DataError("invalid_captions_file", reason, label)

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"not valid UTF-8 text ({_describe(exc)})") from exc
    except OSError as exc:
        raise fail(f"cannot read file ({_describe(exc)})") from exc
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise fail(f"expected a JSON object mapping file names to captions, got {type(data).__name__}")

    result: dict[str, list[str]] = {}
    for key, value in data.items():
        if isinstance(value, str):
            result[key] = [value]
        elif isinstance(value, list):
            for index, entry in enumerate(value):
                if not isinstance(entry, str):
                    raise fail(f"caption {index} for {key!r} must be a string, got {type(entry).__name__}")
            result[key] = list(value)
        else:
            raise fail(f"captions for {key!r} must be a string or a list of strings, got {type(value).__name__}")
    return result


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptItem:
    """One training image of the concept with its captions (already resolved with the trigger word)."""

    name: str
    image: Image.Image
    captions: tuple[str, ...]


@dataclass(frozen=True)
class ConceptDataset:
    """The validated concept images and the trigger word; iterate over ``pairs`` to get training samples."""

    items: tuple[ConceptItem, ...]
    trigger: str

    @property
    def pairs(self) -> list[tuple[int, str]]:
        """Every (item index, caption) pair, in item order then caption order, so sampling is reproducible."""
        return [(index, caption) for index, item in enumerate(self.items) for caption in item.captions]

    def __len__(self) -> int:
        """Return the number of images (not caption pairs)."""
        return len(self.items)


def _list_image_dir(image_dir: Path) -> list[Path]:
    if not image_dir.is_dir():
        raise DataError("no_images", f"image directory {str(image_dir)!r} does not exist or is not a directory")
    entries: list[Path] = []
    for entry in image_dir.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.name.lower() == CAPTIONS_FILE_NAME:
            continue
        if not entry.is_file():
            continue
        entries.append(entry)
    return sorted(entries, key=lambda p: p.name)


def load_concept_dataset(
    image_dir: Path | str | None = None,
    *,
    files: Sequence[Path | str] | None = None,
    trigger: str,
    default_caption: str | None,
    captions: Mapping[str, Sequence[str]] | None = None,
    min_side: int,
    max_images: int = MAX_IMAGES,
    max_pixels: int | None = None,
) -> ConceptDataset:
    """Load and validate a concept dataset from a directory or an explicit file list.

    Exactly one of ``image_dir`` and ``files`` must be given. A directory is read non-recursively; its regular
    files are taken sorted by name, hidden files (leading ``.``) and a ``captions.json`` file are skipped, and
    every other file must be a valid image (a stray non-image is an error, never silently dropped, so the user
    learns their upload contains junk). An explicit file list is used in the given order.

    Each image's captions come from ``captions[file_name]`` (several allowed) when present and non-empty,
    otherwise ``[default_caption]``; each is resolved with :func:`resolve_caption`. Cheap checks run before
    any image is decoded, so malformed requests fail fast. Errors (all :class:`DataError`): ``no_images``,
    ``too_many_images`` (more than ``max_images``), ``duplicate_file_name`` (two listed files share a name),
    ``unknown_caption_file`` (a captions key matches no image), ``empty_caption`` (no caption or an empty one,
    naming the file), ``missing_trigger``, and every :func:`load_image` error.
    """
    if (image_dir is None) == (files is None):
        raise ValueError("pass exactly one of image_dir and files")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")

    paths = _list_image_dir(Path(image_dir)) if image_dir is not None else [Path(f) for f in files or ()]

    if not paths:
        raise DataError("no_images", "no image files were provided")
    if len(paths) > max_images:
        raise DataError("too_many_images", f"{len(paths)} images were provided; the maximum is {max_images}")

    seen: set[str] = set()
    for p in paths:
        if p.name in seen:
            raise DataError("duplicate_file_name", "more than one file has this name", p.name)
        seen.add(p.name)

    mapping: Mapping[str, Sequence[str]] = captions if captions is not None else {}
    for key in mapping:
        if key not in seen:
            raise DataError("unknown_caption_file", "captions were given for a file that is not in the image set", key)

    resolved: list[tuple[str, ...]] = []
    for p in paths:
        raw = mapping.get(p.name)
        templates: list[str]
        if isinstance(raw, str):
            templates = [raw]
        elif raw:
            templates = list(raw)
        elif default_caption is not None:
            templates = [default_caption]
        else:
            raise DataError("empty_caption", "no caption for this image and no default caption was set", p.name)
        try:
            resolved.append(tuple(resolve_caption(t, trigger) for t in templates))
        except DataError as exc:
            raise exc.with_file(p.name) from None

    items = tuple(
        ConceptItem(
            name=p.name, image=load_image(p, min_side=min_side, name=p.name, max_pixels=max_pixels), captions=caps
        )
        for p, caps in zip(paths, resolved, strict=True)
    )
    return ConceptDataset(items=items, trigger=trigger.strip())


# --------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# --------------------------------------------------------------------------------------------------------------


def buckets_for_resolution(resolution: int, multiple: int = 16) -> list[tuple[int, int]]:
    """Scale :data:`BASE_BUCKETS_1MP` (defined at 1024²) to ``resolution``, as (width, height) pairs.

    Each side is multiplied by ``resolution / 1024`` (so areas scale by ``(resolution / 1024) ** 2`` and the
    square bucket has area ``resolution ** 2``), rounded half-up to a multiple of ``multiple`` (at least
    ``multiple``), because latent/patch sizes require it. Duplicates created by rounding are dropped and the
    order of :data:`BASE_BUCKETS_1MP` is kept. ``resolution=1024`` with the default multiple returns exactly
    :data:`BASE_BUCKETS_1MP`. Note the wide buckets of the base list are below 1 MP (1344x576 is ~0.77 MP).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    scale = resolution / _BASE_RESOLUTION

    def snap(side: int) -> int:
        return max(multiple, math.floor(side * scale / multiple + 0.5) * multiple)

    result: list[tuple[int, int]] = []
    for width, height in BASE_BUCKETS_1MP:
        bucket = (snap(width), snap(height))
        if bucket not in result:
            result.append(bucket)
    return result


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Return the bucket whose aspect ratio is closest to ``width / height``, comparing log aspect ratios.

    Log ratios make 2:1 and 1:2 equally far from 1:1, so portrait and landscape are treated symmetrically.
    Ties go to the earlier bucket in ``buckets``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("buckets must not be empty")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def resize_to_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` (LANCZOS) so it covers ``size`` (width, height) and center-crop to exactly ``size``.

    Cropping instead of padding or stretching keeps the subject's proportions, which matters for learning a
    concept's appearance. The crop box is applied in source coordinates during the single resample.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
