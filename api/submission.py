"""Turning a multipart upload into a validated job: spec -> resolved `DOPSDConfig`, every image decoded and
checked, the images stored, then the job row. An invalid request creates nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import ValidationError

from api.schemas import JobSpec
from api.spec_fields import training_values
from api.uploads import ParsedUpload, UploadedFile
from core.errors import InvalidImage, InvalidRequest, InvalidSpec
from dopsd.config import DOPSDConfig
from dopsd.data import DataError, load_image, resolve_caption
from dopsd.presets import Preset, get_preset


EXTENSIONS = {"PNG": (".png", "image/png"), "JPEG": (".jpg", "image/jpeg"), "WEBP": (".webp", "image/webp")}


@dataclass(frozen=True)
class ValidatedJob:
    """A request that passed every check, ready to be stored."""

    spec: JobSpec
    preset: Preset
    config: dict[str, Any]
    images: list[tuple[UploadedFile, str, str]]  # file, extension, content type


def parse_spec(raw: str | None) -> JobSpec:
    """The `spec` field as a strict `JobSpec`; JSON and field errors become `invalid_spec` with details."""
    if raw is None:
        raise InvalidSpec("the `spec` field is missing (a JSON object)")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidSpec(f"`spec` is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise InvalidSpec("`spec` must be a JSON object")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        details = [{"loc": list(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        raise InvalidSpec("`spec` has invalid fields", details=details) from exc


def build_config(spec: JobSpec, files: list[UploadedFile]) -> tuple[Preset, dict[str, Any]]:
    """The resolved `DOPSDConfig` of a job, as a dict (resolved here, once: the worker and the trainer take it as
    it is); captions are re-keyed to the stored file names."""
    values = training_values(spec)
    try:
        preset = get_preset(values["preset"])
    except ValueError as exc:
        raise InvalidSpec(str(exc), code="unknown_preset") from exc
    by_name = {f.filename.replace("\\", "/").rsplit("/", 1)[-1]: f for f in files}
    unknown = sorted(set(values["captions"]) - set(by_name))
    if unknown:
        raise InvalidSpec(f"`captions` names files that were not uploaded: {', '.join(unknown)}", code="unknown_file")
    captions = {by_name[name].safe_name: caps for name, caps in values["captions"].items()}
    default_caption, trigger = values["default_caption"], values["trigger"]
    for f in files:
        # No caption and no default caption: the worker writes one (see dopsd.captioning).
        templates = captions.get(f.safe_name) or ([default_caption] if default_caption is not None else [])
        for caption in templates:
            try:
                resolve_caption(caption, trigger)
            except DataError as exc:
                raise InvalidSpec(f"{f.safe_name}: {exc.reason}", code=exc.code) from exc
    values["captions"] = captions or None
    try:
        config = DOPSDConfig.for_preset(**values)
    except ValueError as exc:
        raise InvalidSpec(str(exc).removeprefix("invalid DOPSDConfig: ")) from exc
    return preset, config.to_dict()


def validate_images(files: list[UploadedFile], preset: Preset) -> list[tuple[UploadedFile, str, str]]:
    """Decodes every image fully (size, format, truncation, bombs); the first bad one is an `invalid_image`."""
    checked = []
    for f in files:
        try:
            load_image(f.path, min_side=preset.min_image_side, name=f.safe_name)
            with Image.open(f.path) as im:
                fmt = "JPEG" if im.format == "MPO" else str(im.format)
        except DataError as exc:
            raise InvalidImage(str(exc), code=exc.code, details={"file": f.safe_name, "reason": exc.reason}) from exc
        ext, content_type = EXTENSIONS[fmt]
        checked.append((f, ext, content_type))
    return checked


def validate_submission(upload: ParsedUpload, max_images: int) -> ValidatedJob:
    """Every check of a job submission, in the order a client fixes them."""
    unexpected = sorted(set(upload.fields) - {"spec"})
    if unexpected:
        raise InvalidRequest(f"unexpected form fields: {', '.join(unexpected)}")
    spec = parse_spec(upload.fields.get("spec"))
    if not upload.files:
        raise InvalidRequest("upload 1 to 64 images in the `images` field", code="no_images")
    if len(upload.files) > max_images:
        raise InvalidRequest(f"at most {max_images} images per job", code="too_many_files")
    preset, config = build_config(spec, upload.files)
    images = validate_images(upload.files, preset)
    return ValidatedJob(spec=spec, preset=preset, config=config, images=images)
