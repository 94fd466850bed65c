"""Datasets sent as one archive: a `.zip`, `.tar` or `.tar.gz` of images with their captions, as sidecar
`.txt` files (`dog.png` + `dog.txt`, the community trainers' convention) or a `captions.json` mapping file names to
captions. Expanded in a validation process (`api/validation_pool.py`), like every decode of uploaded data.

An archive is a second way in for everything the image upload refuses, and a few attacks of its own, so each
member is checked before a byte of it is written: no absolute path, no `..`, no link or device, no nested
archive, no more members than the limit, no member and no total larger than the limits, counted on the bytes
actually decompressed (a zip bomb's headers may lie), and nothing that is neither an image nor a caption file.
Members are written under names of our own (`member-000`), never their own, so no name reaches the disk. The
first refused member ends the expansion with an `ArchiveRefusal` that names it; the caller then stores nothing.

Takes and returns plain picklable values: it runs in another process.
"""

from __future__ import annotations

import functools
import json
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Literal


ARCHIVE_NAME_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
NESTED_SUFFIXES = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"})
CAPTIONS_FILE = "captions.json"
MAX_CAPTION_BYTES = 64 * 1024  # one sidecar .txt or the captions.json
CHUNK = 1024 * 1024
ArchiveKind = Literal["zip", "tar"]


@dataclass(frozen=True)
class ArchiveLimits:
    """How much one archive may hold once expanded."""

    max_members: int
    max_images: int
    max_member_bytes: int
    max_total_bytes: int


@dataclass(frozen=True)
class ArchiveRefusal:
    """Why an archive is refused: a stable code (the API's error code), a reason, and the member at fault."""

    code: str
    reason: str
    member: str


@dataclass
class ExpandedArchive:
    """The images of an archive (member name, where its bytes are), in archive order, and the captions its
    caption files give, by image member name."""

    images: list[tuple[str, str]] = field(default_factory=list)
    captions: dict[str, list[str]] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, code: str, reason: str, member: str) -> None:
        super().__init__(reason)
        self.refusal = ArchiveRefusal(code, reason, member)


def looks_like_archive(filename: str, content_type: str) -> bool:
    """Whether an uploaded part is meant as an archive (by its name or type): it may then be as large as a whole
    request instead of one image."""
    name = filename.lower()
    return name.endswith(ARCHIVE_NAME_SUFFIXES) or content_type.lower() in {
        "application/zip", "application/x-zip-compressed", "application/x-tar", "application/gzip",
        "application/x-gzip", "application/x-compressed-tar",
    }  # fmt: skip


def archive_kind(path: str) -> ArchiveKind | None:
    """What the file's bytes are: a zip, a (gzipped) tar, or neither (then it is treated as an image)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
        return "tar"
    return None


def expand_archive(path: str, out_dir: str, limits: ArchiveLimits) -> ExpandedArchive | ArchiveRefusal:
    """Expands the archive at `path` into `out_dir` under names of our own; the images and their captions, or the
    first refused member."""
    kind = archive_kind(path)
    try:
        if kind == "zip":
            members = _zip_members(path, limits)
        elif kind == "tar":
            members = _tar_members(path, limits)
        else:
            return ArchiveRefusal("archive_invalid", "not a zip or tar archive", Path(path).name)
        return _collect(members, Path(out_dir), limits)
    except _Refused as refused:
        return refused.refusal
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as exc:
        return ArchiveRefusal("archive_invalid", f"the archive cannot be read ({type(exc).__name__}: {exc})", "")


# One member as the two formats describe it: its name, whether it is a regular file, a directory or something
# else (a link, a device), its declared size, and a way to read its bytes.
@dataclass
class _Member:
    name: str
    kind: Literal["file", "dir", "link", "other"]
    declared_size: int
    open: Callable[[], IO[bytes] | None]  # its bytes (tarfile gives None for a member without data)


def _zip_members(path: str, limits: ArchiveLimits) -> Iterator[_Member]:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            raise _Refused("archive_too_many_members",
                           f"{len(infos)} members, more than the limit of {limits.max_members}", "")  # fmt: skip
        for info in infos:
            mode = (info.external_attr >> 16) & 0o170000
            if info.flag_bits & 0x1:
                raise _Refused("archive_unsafe_member", "the member is encrypted", info.filename)
            if mode == 0o120000:
                kind: Literal["file", "dir", "link", "other"] = "link"
            elif info.is_dir():
                kind = "dir"
            elif mode in (0, 0o100000):
                kind = "file"
            else:
                kind = "other"
            yield _Member(info.filename, kind, info.file_size, functools.partial(archive.open, info))


def _tar_members(path: str, limits: ArchiveLimits) -> Iterator[_Member]:
    # Streaming mode ("r|*"): headers are read in order as the (gzip) stream is decompressed, never all at once.
    with tarfile.open(path, mode="r|*") as archive:
        for count, info in enumerate(archive, start=1):
            if count > limits.max_members:
                raise _Refused("archive_too_many_members",
                               f"more than the limit of {limits.max_members} members", info.name)  # fmt: skip
            if info.issym() or info.islnk():
                kind: Literal["file", "dir", "link", "other"] = "link"
            elif info.isdir():
                kind = "dir"
            elif info.isfile():
                kind = "file"
            else:
                kind = "other"
            yield _Member(info.name, kind, info.size, functools.partial(archive.extractfile, info))


def _check_name(name: str) -> PurePosixPath:
    if "\x00" in name or not name.strip():
        raise _Refused("archive_unsafe_member", "the member has an invalid name", name)
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"^[A-Za-z]:", normalised):
        raise _Refused("archive_unsafe_member", "the member has an absolute path", name)
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused("archive_unsafe_member", "the member's path leaves the archive (`..`)", name)
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _ignored(path: PurePosixPath) -> bool:
    """Files archivers add on their own (macOS resource forks and folder settings)."""
    return (
        any(p == "__MACOSX" for p in path.parts)
        or path.name in {".DS_Store", "Thumbs.db"}
        or (path.name.startswith("._"))
    )


def _copy(member: _Member, target: Path, cap: int, total: list[int], limits: ArchiveLimits) -> None:
    """Copies a member's decompressed bytes to `target`, counting every byte against the member's and the
    archive's limits as it is read."""
    if member.declared_size > cap:
        raise _Refused("archive_too_large",
                       f"the member is {member.declared_size} bytes, more than the limit of {cap}", member.name)  # fmt: skip
    opened = member.open()
    if opened is None:
        raise _Refused("archive_unsafe_member", "the member has no data", member.name)
    source: IO[bytes] = opened
    written = 0
    with source, target.open("wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            total[0] += len(chunk)
            if written > cap:
                raise _Refused("archive_too_large", f"the member expands past the limit of {cap} bytes", member.name)
            if total[0] > limits.max_total_bytes:
                raise _Refused("archive_too_large",
                               f"the archive expands past the limit of {limits.max_total_bytes} bytes", member.name)  # fmt: skip
            out.write(chunk)


def _collect(members: Iterator[_Member], out: Path, limits: ArchiveLimits) -> ExpandedArchive:
    expanded = ExpandedArchive()
    sidecars: dict[PurePosixPath, tuple[str, str]] = {}  # image path without suffix -> (member name, caption)
    captions_files: list[tuple[PurePosixPath, str, dict[str, object]]] = []
    images: dict[PurePosixPath, str] = {}  # path without suffix -> member name
    total = [0]
    for index, member in enumerate(members):
        path = _check_name(member.name)
        if member.kind == "dir" or _ignored(path):
            continue
        if member.kind == "link":
            raise _Refused("archive_unsafe_member", "the member is a link", member.name)
        if member.kind != "file":
            raise _Refused("archive_unsafe_member", "the member is not a regular file", member.name)
        suffix = path.suffix.lower()
        target = out / f"member-{index:03d}"
        if suffix in IMAGE_SUFFIXES:
            if len(expanded.images) >= limits.max_images:
                raise _Refused("too_many_files", f"more than {limits.max_images} images", member.name)
            _copy(member, target, limits.max_member_bytes, total, limits)
            if archive_kind(str(target)) is not None:
                raise _Refused("archive_nested", "the member is an archive inside the archive", member.name)
            expanded.images.append((member.name, str(target)))
            images[path.with_suffix("")] = member.name
        elif suffix == ".txt" or path.name == CAPTIONS_FILE:
            _copy(member, target, MAX_CAPTION_BYTES, total, limits)
            text = _text(target, member.name)
            if path.name == CAPTIONS_FILE:
                captions_files.append((path.parent, member.name, _captions_json(text, member.name)))
            else:
                sidecars[path.with_suffix("")] = (member.name, text.strip())
        elif suffix in NESTED_SUFFIXES or path.name.lower().endswith(ARCHIVE_NAME_SUFFIXES):
            raise _Refused("archive_nested", "the member is an archive inside the archive", member.name)
        else:
            raise _Refused("archive_member_refused",
                           "neither an image (PNG, JPEG, WebP) nor a caption file (.txt, captions.json)", member.name)  # fmt: skip
    if not expanded.images:
        raise _Refused("no_images", "the archive holds no PNG, JPEG or WebP image", "")
    for stem, (name, caption) in sidecars.items():
        if stem not in images:
            raise _Refused("unknown_file", "a caption file for no image of the archive (same name, .txt)", name)
        if caption:
            expanded.captions[images[stem]] = [caption]
    for folder, name, mapping in captions_files:
        by_name = {PurePosixPath(images[stem]).name: images[stem] for stem in images if stem.parent == folder}
        for file_name, value in mapping.items():
            if file_name not in by_name:
                raise _Refused(
                    "unknown_file", f"`captions.json` names {file_name!r}, which is not in its folder", name
                )
            chosen = [value] if isinstance(value, str) else value
            if not isinstance(chosen, list) or not all(isinstance(c, str) for c in chosen):
                raise _Refused("invalid_captions", f"the caption of {file_name!r} is not a string or a list of strings",
                               name)  # fmt: skip
            expanded.captions.setdefault(by_name[file_name], [str(c) for c in chosen])
    return expanded


def _text(path: Path, member: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _Refused("invalid_captions", "the caption file is not UTF-8 text", member) from None


def _captions_json(text: str, member: str) -> dict[str, object]:
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Refused("invalid_captions", f"`captions.json` is not valid JSON ({exc.msg})", member) from None
    if not isinstance(mapping, dict):
        raise _Refused("invalid_captions", "`captions.json` must map file names to captions", member)
    return mapping
