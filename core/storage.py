"""Artifact storage behind one interface: any S3-compatible server (boto3), or a local folder in embedded mode.

Keys are built here only, from job ids and our own names; an uploaded file's name never becomes a key.
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from core.config import Settings
from core.errors import NotFound, ServiceUnavailable


# The adapter files a training job writes, by format (names as dopsd's trainer writes them).
ADAPTER_FILES = {
    "diffusers": "pytorch_lora_weights.safetensors",
    "comfyui": "pytorch_lora_weights_comfyui.safetensors",
}


def job_prefix(job_id: uuid.UUID) -> str:
    """Every object of a job lives under this prefix."""
    return f"jobs/{job_id}/"


def input_key(job_id: uuid.UUID, index: int, extension: str) -> str:
    """Key of the `index`-th uploaded image (its name is kept in the database, never in the key)."""
    return f"{job_prefix(job_id)}inputs/{index:02d}{extension}"


def checkpoint_prefix(job_id: uuid.UUID) -> str:
    """Prefix of a job's training checkpoints."""
    return f"{job_prefix(job_id)}checkpoints/"


def generation_image_name(index: int, seed: int) -> str:
    """The artifact name of a generation's `index`-th image (prompt-major, one per seed): names sort in order."""
    return f"images/{index:03d}-seed-{seed}.png"


def output_key(job_id: uuid.UUID, relative: str) -> str:
    """Key of an output file, `relative` to the trainer's output folder."""
    return f"{job_prefix(job_id)}outputs/{relative}"


@dataclass(frozen=True)
class StoredObject:
    """A stored object's key and size."""

    key: str
    size: int


class ArtifactStore(Protocol):
    """What the service needs from storage."""

    def check(self) -> None:
        """Raises `ServiceUnavailable` when storage cannot be reached."""

    def put_file(self, key: str, path: Path, content_type: str) -> int:
        """Uploads a local file (streamed, never whole in memory); returns its size."""

    def get_file(self, key: str, path: Path) -> None:
        """Downloads an object to a local file; `NotFound` when it does not exist."""

    def list(self, prefix: str) -> list[StoredObject]:
        """Every object under `prefix`, sorted by key."""

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every object under `prefix`; returns how many."""

    def download_url(self, key: str, *, filename: str, ttl_s: int) -> str:
        """A URL that grants a download of `key` only, for `ttl_s` seconds."""


def sign_local_url(secret: str, key: str, expires: int) -> str:
    """HMAC-SHA256 of (key, expiry) for the local store's download URLs."""
    return hmac.new(secret.encode(), f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


class LocalStore:
    """A folder on disk, for the embedded mode; the API serves downloads behind signed, expiring URLs."""

    def __init__(self, root: Path, *, public_url: str, signing_key: str) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_url = public_url.rstrip("/")
        self.signing_key = signing_key

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise NotFound("no such object")
        return path

    def check(self) -> None:
        if not self.root.is_dir():
            raise ServiceUnavailable(f"artifact folder {self.root} is missing")

    def put_file(self, key: str, path: Path, content_type: str) -> int:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
        return target.stat().st_size

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"no object {key}")
        shutil.copyfile(source, path)

    def list(self, prefix: str) -> list[StoredObject]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.exists():
            return []
        files = [p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
        return sorted(
            (StoredObject(str(p.relative_to(self.root)), p.stat().st_size) for p in files), key=lambda o: o.key
        )

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        base = self._path(prefix.rstrip("/"))
        if base.is_dir():
            shutil.rmtree(base)
        return len(objects)

    def download_url(self, key: str, *, filename: str, ttl_s: int) -> str:
        expires = int(time.time()) + ttl_s
        query = urlencode(
            {"expires": expires, "filename": filename, "sig": sign_local_url(self.signing_key, key, expires)}
        )
        return f"{self.public_url}/v1/files/{quote(key)}?{query}"

    def open_signed(self, key: str, expires: int, signature: str) -> Path:
        """The file behind a signed URL; `NotFound` for a wrong, expired or unknown one (no oracle)."""
        expected = sign_local_url(self.signing_key, key, expires)
        if not hmac.compare_digest(expected, signature) or expires < time.time():
            raise NotFound("no such object, or the link has expired")
        path = self._path(key)
        if not path.is_file():
            raise NotFound("no such object, or the link has expired")
        return path


class S3Store:
    """Any S3-compatible server through boto3 (path-style addressing, retried by botocore)."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = settings.s3_bucket

        def client_for(endpoint_url: str | None) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=settings.s3_region,
                aws_access_key_id=settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None,
                aws_secret_access_key=(
                    settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
                ),
                config=Config(
                    s3={"addressing_style": "path"},
                    signature_version="s3v4",
                    retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                ),
            )

        self.client: Any = client_for(settings.s3_endpoint_url)
        # Presigned URLs are signed for the address clients use (SigV4 covers the host), which in a compose or
        # Kubernetes deployment is not the internal one the services use; signing makes no request.
        public = settings.s3_public_endpoint_url
        self.signer: Any = client_for(public) if public and public != settings.s3_endpoint_url else self.client

    @contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        """botocore's errors and boto3's transfer errors (S3UploadFailedError, RetriesExceededError) become
        `ServiceUnavailable`, which callers retry; a missing key becomes `NotFound`."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise NotFound("no such object") from exc
            raise ServiceUnavailable(f"object storage is unavailable: {type(exc).__name__}") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise ServiceUnavailable(f"object storage is unavailable: {type(exc).__name__}") from exc

    def ensure_bucket(self) -> None:
        """Creates the bucket if it does not exist (used by start-up and tests)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def check(self) -> None:
        with self._unavailable_on_error():
            self.client.head_bucket(Bucket=self.bucket)

    def put_file(self, key: str, path: Path, content_type: str) -> int:
        with self._unavailable_on_error():
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"ContentType": content_type})
        return path.stat().st_size

    def get_file(self, key: str, path: Path) -> None:
        with self._unavailable_on_error():
            self.client.download_file(self.bucket, key, str(path))

    def list(self, prefix: str) -> list[StoredObject]:
        out: list[StoredObject] = []
        with self._unavailable_on_error():
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                out.extend(StoredObject(o["Key"], int(o["Size"])) for o in page.get("Contents", []))
        return sorted(out, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> int:
        keys = [o.key for o in self.list(prefix)]
        with self._unavailable_on_error():
            for start in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[start : start + 1000]]
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if answer.get("Errors"):
                    raise ServiceUnavailable(f"object storage refused to delete {len(answer['Errors'])} objects")
        return len(keys)

    def download_url(self, key: str, *, filename: str, ttl_s: int) -> str:
        return str(
            self.signer.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": key,
                    "ResponseContentDisposition": f'attachment; filename="{filename}"',
                },
                ExpiresIn=ttl_s,
            )
        )


def make_store(settings: Settings) -> ArtifactStore:
    """The store the settings describe."""
    if settings.storage_backend == "s3":
        return S3Store(settings)
    return LocalStore(
        settings.storage_dir, public_url=settings.public_url, signing_key=settings.signing_key.get_secret_value()
    )
