"""The checks of uploaded images, as they run in the validation processes (`api/validation_pool.py`): first every
header (size, format; no pixel data read), then every image decoded, JPEGs at 1/8 scale.

Why two phases: the headers tell what decoding would cost (pixels per image and per request) before any of it is
spent, so the API refuses an expensive request for the price of reading a few bytes. Why JPEG at 1/8: Pillow's
`draft` makes libjpeg decode every coefficient of the file (a truncated or corrupt one still fails) but compute
1/64 of the pixels, which is all validation needs; PNG and WebP have no reduced decode and cost their full size,
bounded by the pixel limits. The trainer decodes the stored file again on the worker (`dopsd.data.load_image`).

Everything here takes and returns plain picklable values (paths, names, small dataclasses): results cross a
process boundary, and a refusal is a value (`ImageRefusal`) rather than an exception.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from dopsd.data import FORMAT_ALIASES, MAX_IMAGE_PIXELS, header_refusal


# Every mode Pillow decodes PNG, JPEG and WebP files to; `dopsd.data` converts each of them to RGB.
CONVERTIBLE_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "I", "I;16", "I;16B", "I;16L", "I;16N",
     "CMYK", "YCbCr", "LAB", "F"}
)  # fmt: skip
JPEG_DRAFT_SCALE = 8


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its format and full size (pixels decoded by the trainer)."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Width x height at full size."""
        return self.width * self.height


@dataclass(frozen=True)
class ImageRefusal:
    """Why one image is refused: a stable code (the API's error code), a reason, the file's display name."""

    code: str
    reason: str
    file: str


def start_validation_process() -> None:
    """Initialises a validation process: a lower CPU priority, so the API's own process (every other route)
    is scheduled first when the cores are busy, and Pillow's decompression-bomb warnings as errors."""
    try:
        os.nice(10)
    except OSError:  # not permitted here: the process still runs, at the API's priority
        pass
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _open(path: str, name: str) -> Image.Image | ImageRefusal:
    try:
        return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageRefusal("decompression_bomb", f"image is too large to decode safely ({_describe(exc)})", name)
    except UnidentifiedImageError:
        return ImageRefusal("not_an_image", "not a recognizable image file", name)
    except OSError as exc:
        return ImageRefusal("unreadable_image", f"cannot read file ({_describe(exc)})", name)
    except Exception as exc:  # any parser failure on untrusted input means "not an image"
        return ImageRefusal("not_an_image", f"not a recognizable image file ({_describe(exc)})", name)


def read_header(path: str, name: str, *, min_side: int) -> ImageHeader | ImageRefusal:
    """The header of one image, or why it is refused: not an image, a decompression bomb (more than
    `dopsd.data.MAX_IMAGE_PIXELS`), an unsupported format, a short side under `min_side`. Reads no pixel data."""
    opened = _open(path, name)
    if isinstance(opened, ImageRefusal):
        return opened
    with opened as img:
        width, height = img.size
        refused = header_refusal(width, height, img.format, max_pixels=MAX_IMAGE_PIXELS)
        if refused is not None:
            return ImageRefusal(*refused, name)
        fmt = FORMAT_ALIASES.get(img.format or "", img.format or "")
    if min(width, height) < min_side:  # EXIF orientation swaps the sides, never changes the short one
        return ImageRefusal(
            "image_too_small",
            f"image is {width}x{height}; its short side {min(width, height)}px is below the minimum of {min_side}px",
            name,
        )
    return ImageHeader(format=fmt, width=width, height=height)


def read_headers(files: list[tuple[str, str]], *, min_side: int) -> list[ImageHeader] | ImageRefusal:
    """`read_header` of every (path, display name), in order; the first refusal stops it."""
    headers = []
    for path, name in files:
        header = read_header(path, name, min_side=min_side)
        if isinstance(header, ImageRefusal):
            return header
        headers.append(header)
    return headers


def decode(path: str, name: str) -> ImageRefusal | None:
    """Decodes one image whose header passed (JPEG at 1/8 scale), or says why it cannot be: truncated or corrupt
    pixel data (`unreadable_image`), a mode that does not convert to RGB."""
    opened = _open(path, name)
    if isinstance(opened, ImageRefusal):
        return opened
    with opened as img:
        if FORMAT_ALIASES.get(img.format or "", img.format or "") == "JPEG":
            width, height = img.size
            img.draft(img.mode, (max(1, width // JPEG_DRAFT_SCALE), max(1, height // JPEG_DRAFT_SCALE)))
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return ImageRefusal("decompression_bomb", f"image is too large to decode safely ({_describe(exc)})", name)
        except MemoryError:
            return ImageRefusal("unreadable_image", "the image needs more memory to decode than is allowed", name)
        except Exception as exc:  # truncated/corrupt data surfaces as many exception types
            return ImageRefusal("unreadable_image", f"truncated or unreadable image ({_describe(exc)})", name)
        if img.mode not in CONVERTIBLE_MODES:
            return ImageRefusal("unreadable_image", f"cannot convert image mode {img.mode} to RGB", name)
    return None


def decode_all(files: list[tuple[str, str]]) -> ImageRefusal | None:
    """`decode` of every (path, display name), one after another (one process's memory holds one image at a
    time); the first refusal stops it."""
    for path, name in files:
        refusal = decode(path, name)
        if refusal is not None:
            return refusal
    return None
