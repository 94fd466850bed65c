"""Turning a multipart upload into a validated job: spec -> resolved `DOPSDConfig`, then every image checked in the
validation processes (`api/image_checks.py`) within the pixel limits. The images come as files, as one archive
(`api/archives.py`), or as an archive the API fetches from `spec.images_url` (`api/remote_archive.py`). An invalid
request creates nothing."""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.archives import ArchiveLimits, ArchiveRefusal, archive_kind, expand_archive
from api.image_checks import ImageRefusal, decode_all, read_headers
from api.remote_archive import FetchRules, fetch_archive
from api.schemas import JobSpec
from api.spec_fields import training_values
from api.upload_guards import UploadGuards
from api.uploads import ParsedUpload, UploadedFile, safe_display_name
from core.config import Settings
from core.errors import Conflict, InvalidImage, InvalidRequest, InvalidSpec, PayloadTooLarge
from core.jobs import client_side
from core.jobs.states import JobStatus
from core.storage import ADAPTER_FILES
from dopsd.config import DOPSDConfig
from dopsd.data import DataError, resolve_caption
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


def build_config(
    spec: JobSpec, files: list[UploadedFile], archive_captions: dict[str, list[str]] | None = None
) -> tuple[Preset, dict[str, Any]]:
    """The resolved `DOPSDConfig` of a job, as a dict (resolved here, once: the worker and the trainer take it as
    it is); captions are re-keyed to the stored file names. An archive's own captions (by member name) come
    first, the spec's `captions` override them file by file."""
    values = training_values(spec)
    try:
        preset = get_preset(values["preset"])
    except ValueError as exc:
        raise InvalidSpec(str(exc), code="unknown_preset") from exc
    by_name = {f.filename.replace("\\", "/").rsplit("/", 1)[-1]: f for f in files}
    unknown = sorted(set(values["captions"]) - set(by_name))
    if unknown:
        raise InvalidSpec(f"`captions` names files that were not uploaded: {', '.join(unknown)}", code="unknown_file")
    captions = {
        f.safe_name: (archive_captions or {})[f.filename] for f in files if f.filename in (archive_captions or {})
    }
    captions.update({by_name[name].safe_name: caps for name, caps in values["captions"].items()})
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


async def validate_images(
    files: list[UploadedFile], preset: Preset, *, owner_id: uuid.UUID, settings: Settings, guards: UploadGuards
) -> list[tuple[UploadedFile, str, str]]:
    """Checks every image in the validation processes, headers first: the pixel limits (per image and per
    request) and the key's per-minute pixel budget are applied before any pixel is decoded; then each image is
    decoded (JPEGs at 1/8 scale). The first bad image is an `invalid_image` with its code."""
    named = [(str(f.path), f.safe_name) for f in files]
    headers = await guards.checks.run(
        owner_id, guards.pool, functools.partial(read_headers, min_side=preset.min_image_side), named
    )
    if isinstance(headers, ImageRefusal):
        raise _refused(headers)
    for f, header in zip(files, headers, strict=True):
        if header.pixels > settings.max_image_pixels:
            raise PayloadTooLarge(
                f"{f.safe_name}: {header.width}x{header.height} = {header.pixels} pixels, more than the limit of "
                f"{settings.max_image_pixels} per image; downscale it (training uses about 1 megapixel)",
                code="image_too_large",
                details={"file": f.safe_name, "pixels": header.pixels, "limit": settings.max_image_pixels},
            )
    total = sum(h.pixels for h in headers)
    if total > settings.max_request_pixels:
        raise PayloadTooLarge(
            f"the images have {total} pixels together, more than the limit of {settings.max_request_pixels} "
            "per request; send fewer or smaller images",
            code="too_many_pixels",
            details={"pixels": total, "limit": settings.max_request_pixels},
        )
    guards.pixels.charge(owner_id, total)
    refusal = await guards.checks.run(owner_id, guards.pool, decode_all, named)
    if refusal is not None:
        raise _refused(refusal)
    return [(f, *EXTENSIONS[h.format]) for f, h in zip(files, headers, strict=True)]


def _refused(refusal: ImageRefusal) -> InvalidImage:
    message = f"{refusal.file}: {refusal.reason}"
    return InvalidImage(message, code=refusal.code, details={"file": refusal.file, "reason": refusal.reason})


def check_fields(upload: ParsedUpload) -> JobSpec:
    """The first checks of a submission, in the order a client fixes them: no unexpected form field, then the
    spec; and the images given one way, as `images` files or as `spec.images_url`, not both."""
    unexpected = sorted(set(upload.fields) - {"spec"})
    if unexpected:
        raise InvalidRequest(f"unexpected form fields: {', '.join(unexpected)}")
    spec = parse_spec(upload.fields.get("spec"))
    if spec.images_url is not None and upload.files:
        raise InvalidSpec(
            "send the images one way: as `images` files or as one archive named by `spec.images_url`, not both"
        )
    return spec


def check_request(
    upload: ParsedUpload, spec: JobSpec, max_images: int, archive_captions: dict[str, list[str]] | None = None
) -> tuple[Preset, dict[str, Any]]:
    """The checks of a submission that need no image decoded, after `check_fields`: file count, the config
    resolved against the preset (captions included)."""
    if not upload.files:
        raise InvalidRequest(
            "upload 1 to 64 images in the `images` field, or name one archive of them in `spec.images_url`",
            code="no_images",
        )
    if len(upload.files) > max_images:
        raise InvalidRequest(f"at most {max_images} images per job", code="too_many_files")
    return build_config(spec, upload.files, archive_captions)


async def expand_archive_upload(
    upload: ParsedUpload, max_images: int, *, owner_id: uuid.UUID, settings: Settings, guards: UploadGuards
) -> dict[str, list[str]] | None:
    """When the one uploaded file is a zip or tar archive: expands it in a validation process, replaces the
    upload's files with its images (each then checked like an uploaded image) and returns its captions by member
    name. A refused member ends the submission with an error naming it; nothing is stored. None for images."""
    if len(upload.files) != 1 or archive_kind(str(upload.files[0].path)) is None:
        return None
    archive = upload.files[0]
    folder = archive.path.parent / "archive"
    folder.mkdir()
    limits = ArchiveLimits(
        max_members=4 * max_images + 16,  # an image, its caption file and a folder each, and some archiver files
        max_images=max_images,
        max_member_bytes=settings.max_file_bytes,
        max_total_bytes=settings.max_total_bytes,
    )
    expanded = await guards.checks.run(owner_id, guards.pool, expand_archive, str(archive.path), str(folder), limits)
    if isinstance(expanded, ArchiveRefusal):
        where = f"{archive.safe_name}: {expanded.member}: " if expanded.member else f"{archive.safe_name}: "
        error = (
            PayloadTooLarge if expanded.code in ("archive_too_large", "archive_too_many_members") else InvalidRequest
        )
        raise error(where + expanded.reason, code=expanded.code,
                    details={"file": archive.safe_name, "member": expanded.member, "reason": expanded.reason})  # fmt: skip
    taken: set[str] = set()
    files = []
    for index, (name, path) in enumerate(expanded.images):
        member = UploadedFile(
            index=index, filename=name, safe_name=safe_display_name(name, index, taken), path=Path(path)
        )
        data = member.path.read_bytes()
        member.size = len(data)
        member.digest.update(data)
        files.append(member)
    upload.files[:] = files
    return expanded.captions


async def validate_submission(
    upload: ParsedUpload,
    spec: JobSpec,
    max_images: int,
    *,
    owner_id: uuid.UUID,
    settings: Settings,
    guards: UploadGuards,
    fetch: FetchRules,
    folder: Path,
) -> ValidatedJob:
    """Every check of a job submission whose fields and spec passed `check_fields`, in the order a client fixes
    them; the images last (they cost most). A `spec.images_url` is fetched into `folder` first, within `fetch`,
    and then taken as an uploaded archive."""
    if spec.images_url is not None:
        upload.files.append(await fetch_archive(spec.images_url, folder, fetch))
    archive_captions = await expand_archive_upload(
        upload, max_images, owner_id=owner_id, settings=settings, guards=guards
    )
    preset, config = check_request(upload, spec, max_images, archive_captions)
    check_processes(config, settings)
    images = await validate_images(upload.files, preset, owner_id=owner_id, settings=settings, guards=guards)
    return ValidatedJob(spec=spec, preset=preset, config=config, images=images)


def check_processes(config: dict[str, Any], settings: Settings) -> None:
    """A job may ask for more processes (GPUs) than one only where the deployment's workers run that many for one
    job (`DOPSD_MAX_PROCESSES_PER_JOB`); elsewhere it is refused now, not failed at its start."""
    asked = int(config.get("num_processes") or 1)
    if asked > settings.max_processes_per_job:
        raise InvalidSpec(
            f"`num_processes` {asked}: this service runs at most {settings.max_processes_per_job} process(es) per "
            "job; multi-process training runs with `dopsd train --num-processes N` (docs/distributed.md)",
            code="num_processes_unavailable",
            details={"asked": asked, "limit": settings.max_processes_per_job},
        )


def resolve_init_adapter(validated: ValidatedJob, *, session: Session, owner_id: uuid.UUID, kind: str) -> None:
    """`spec.init_adapter`: the earlier training job a new one continues. It must be the caller's (another key's
    job, a deleted or an unknown one: 404 `job_not_found`), a training job (422 `init_adapter_not_training`) of the
    same preset (422 `init_adapter_preset_mismatch`) that succeeded with a stored adapter (409
    `init_adapter_not_ready`). The resolved config then names it (`init_adapter`: the job's id; its worker fetches
    the adapter) and takes its rank and alpha: a spec that asks for others is a 422 `init_adapter_rank_mismatch`.
    A preview shows what the base model sees, so it takes none (422 `init_adapter_not_supported`)."""
    parent_id = validated.spec.init_adapter
    if parent_id is None:
        return
    if kind != "training":
        raise InvalidSpec(
            "`init_adapter` is for training jobs; a preview shows the base model", code="init_adapter_not_supported"
        )
    parent = client_side.get_job(session=session, owner_id=owner_id, job_id=parent_id)  # 404 for another key's job
    if parent.kind != "training":
        raise InvalidSpec(
            f"job {parent_id} is a {parent.kind}, not a training job with an adapter", code="init_adapter_not_training"
        )
    if parent.job_status != JobStatus.SUCCEEDED:
        raise Conflict(
            f"job {parent_id} is {parent.status}; a job can continue it once it succeeded",
            code="init_adapter_not_ready",
        )
    if parent.preset != validated.preset.name:
        raise InvalidSpec(
            f"job {parent_id} trained an adapter for {parent.preset}, not for {validated.preset.name}",
            code="init_adapter_preset_mismatch",
        )
    if not any(a.name == ADAPTER_FILES["diffusers"] for a in parent.artifacts):
        raise Conflict(f"job {parent_id} has no stored adapter to continue", code="init_adapter_not_ready")
    asked = training_values(validated.spec)
    shape = {"rank": parent.config["rank"], "lora_alpha": parent.config["lora_alpha"]}
    for name, value in shape.items():
        if asked.get(name) is not None and asked[name] != value:
            raise InvalidSpec(
                f"`{name}` {asked[name]:g} differs from the adapter's {value:g} (job {parent_id}); a continued job "
                f"keeps the adapter's shape: leave `{name}` unset",
                code="init_adapter_rank_mismatch",
            )
    resolved = DOPSDConfig.from_dict({**validated.config, **shape, "init_adapter": str(parent.id)}).to_dict()
    validated.config.clear()
    validated.config.update(resolved)
