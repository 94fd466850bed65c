"""A dataset as one archive, in process: a zip or tar(.gz) of images with sidecar `.txt` captions or a
`captions.json` becomes a job whose resolved config shows those captions; every archive attack is refused with an
error that names the member at fault, and creates nothing (no job, no stored file, no broker message)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from typing import Any

import pytest

from tests.api.local_api import LocalApi
from tests.api.payloads import png_bytes
from tests.conftest import EXAMPLES, quick_spec


ROBOTS = sorted(EXAMPLES.glob("*.png"))


def zip_of(members: dict[str, bytes], *, links: tuple[str, ...] = ()) -> bytes:
    """A zip of `members` (name: bytes); names in `links` are stored as symbolic links."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in links:
                info.external_attr = 0o120777 << 16
            archive.writestr(info, data)
    return out.getvalue()


def tar_of(
    members: dict[str, bytes], *, gz: bool = True, extra: Callable[[tarfile.TarFile], None] | None = None
) -> bytes:
    """A tar (gzipped unless told) of `members`; `extra` adds members of other kinds (links, devices)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(archive)
    return out.getvalue()


def submit(local_api: LocalApi, name: str, archive: bytes, *, dry_run: bool = False, **spec: Any) -> Any:
    key = local_api.create_key(f"archive-{name}")
    with local_api.client(key) as client:
        return client.post(
            "/v1/jobs" + ("?dry_run=true" if dry_run else ""),
            files=[("images", (name, archive, "application/octet-stream"))],
            data={"spec": json.dumps({**quick_spec(), "default_caption": "a photo of [V]", **spec})},
        ), key


def test_a_zip_with_sidecar_captions_is_a_job_with_those_captions(local_api: LocalApi) -> None:
    members = {f"robots/{p.name}": p.read_bytes() for p in ROBOTS[:2]}
    members["robots/robot-1.txt"] = b"a photo of [V] on a desk\n"
    members["__MACOSX/robots/._robot-1.png"] = b"resource fork"  # what macOS adds; skipped
    response, key = submit(local_api, "robots.zip", zip_of(members))
    assert response.status_code == 202, response.text
    job = response.json()
    with local_api.client(key) as client:
        config = client.get(f"/v1/jobs/{job['id']}").json()["config"]
    assert config["captions"] == {"robot-1.png": ["a photo of [V] on a desk"]}  # robot-2 takes the default caption
    assert len([p for p in local_api.stored() if f"jobs/{job['id']}/inputs/" in p]) == 2


def test_a_tar_gz_with_captions_json_and_a_spec_caption_that_overrides_one(local_api: LocalApi) -> None:
    members = {p.name: p.read_bytes() for p in ROBOTS[:3]}
    members["captions.json"] = json.dumps(
        {"robot-1.png": "a photo of [V]", "robot-2.png": ["[V] robot", "a [V] toy"], "robot-3.png": "a [V]"}
    ).encode()
    response, _ = submit(
        local_api, "robots.tar.gz", tar_of(members), dry_run=True, captions={"robot-3.png": ["a [V] in snow"]}
    )
    assert response.status_code == 200, response.text
    captions = response.json()["config"]["captions"]
    assert captions == {"robot-1.png": ["a photo of [V]"], "robot-2.png": ["[V] robot", "a [V] toy"],
                        "robot-3.png": ["a [V] in snow"]}  # fmt: skip


def _hardlink(archive: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("copy.png")
    info.type, info.linkname = tarfile.LNKTYPE, "robot-1.png"
    archive.addfile(info)


def _symlink(archive: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("passwd.png")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive.addfile(info)


def _fifo(archive: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("pipe.png")
    info.type = tarfile.FIFOTYPE
    archive.addfile(info)


ROBOT = ROBOTS[0].read_bytes()
BOMB = b"\0" * (3 * 1024 * 1024)  # deflates to a few KB; more than the tier's 2 MiB per image once expanded

ATTACKS: list[tuple[str, str, bytes, int, str, str]] = [
    # (case, upload name, archive, status, code, the member the error must name)
    ("path traversal", "a.zip", zip_of({"robot-1.png": ROBOT, "../escape.png": ROBOT}), 422, "archive_unsafe_member", "../escape.png"),
    ("absolute path", "a.tar", tar_of({"/etc/cron.d/x.png": ROBOT}, gz=False), 422, "archive_unsafe_member", "/etc/cron.d/x.png"),
    ("windows absolute path", "a.zip", zip_of({"C:/x.png": ROBOT}), 422, "archive_unsafe_member", "C:/x.png"),
    ("zip symlink", "a.zip", zip_of({"robot-1.png": ROBOT, "link.png": b"/etc/passwd"}, links=("link.png",)), 422, "archive_unsafe_member", "link.png"),
    ("tar symlink", "a.tar.gz", tar_of({"robot-1.png": ROBOT}, extra=_symlink), 422, "archive_unsafe_member", "passwd.png"),
    ("tar hard link", "a.tar.gz", tar_of({"robot-1.png": ROBOT}, extra=_hardlink), 422, "archive_unsafe_member", "copy.png"),
    ("tar device", "a.tar.gz", tar_of({"robot-1.png": ROBOT}, extra=_fifo), 422, "archive_unsafe_member", "pipe.png"),
    ("nested archive", "a.zip", zip_of({"robot-1.png": ROBOT, "more.zip": zip_of({"r.png": ROBOT})}), 422, "archive_nested", "more.zip"),
    ("archive named as an image", "a.zip", zip_of({"robot-1.png": ROBOT, "more.png": zip_of({"r.png": ROBOT})}), 422, "archive_nested", "more.png"),
    ("zip bomb", "a.zip", zip_of({"robot-1.png": ROBOT, "bomb.png": BOMB}), 413, "archive_too_large", "bomb.png"),
    ("too many members", "a.zip", zip_of({f"{i}.txt": b"x" for i in range(300)}), 413, "archive_too_many_members", ""),
    ("not an image", "a.zip", zip_of({"robot-1.png": ROBOT, "notes.pdf": b"%PDF-1.4"}), 422, "archive_member_refused", "notes.pdf"),
    ("caption for no image", "a.zip", zip_of({"robot-1.png": ROBOT, "robot-9.txt": b"a [V]"}), 422, "unknown_file", "robot-9.txt"),
    ("captions.json naming no image", "a.zip", zip_of({"robot-1.png": ROBOT, "captions.json": b'{"x.png": "a [V]"}'}), 422, "unknown_file", "captions.json"),
    ("broken captions.json", "a.zip", zip_of({"robot-1.png": ROBOT, "captions.json": b"{not json"}), 422, "invalid_captions", "captions.json"),
    ("no image", "a.zip", zip_of({"readme/": b""}), 422, "no_images", ""),
    ("a member that is no image", "a.zip", zip_of({"robot-1.png": ROBOT, "fake.png": b"not a png"}), 422, "not_an_image", "fake.png"),
    ("a member too small", "a.zip", zip_of({"tiny.png": png_bytes((8, 8))}), 422, "image_too_small", "tiny.png"),
    ("corrupt archive", "a.zip", zip_of({"robot-1.png": ROBOT})[:-30], 422, "archive_invalid", ""),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name", "archive", "status", "code", "member"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_archive_attacks_are_refused_naming_the_member_and_store_nothing(
    local_api: LocalApi, case: str, name: str, archive: bytes, status: int, code: str, member: str
) -> None:
    before, messages = local_api.stored(), local_api.messages()
    response, key = submit(local_api, name, archive)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    if member:
        assert member in error["message"], error
    with local_api.client(key) as client:
        assert client.get("/v1/jobs").json()["data"] == []
    assert local_api.stored() == before
    assert local_api.messages() == messages
