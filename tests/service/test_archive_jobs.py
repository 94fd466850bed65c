"""A dataset sent as one archive trains on the real stack: the job succeeds on the archive's images with the
captions of its sidecar files, which its resolved config and its `config.json` show."""

from __future__ import annotations

import io
import json
import tarfile

import httpx

from tests.conftest import EXAMPLES, Stack, quick_spec
from tests.pace import wait_for_status


def test_a_tar_gz_dataset_with_sidecar_captions_trains(prod_stack: Stack) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for image in sorted(EXAMPLES.glob("*.png"))[:2]:
            tar.add(image, arcname=f"dataset/{image.name}")
            caption = f"a photo of [V], {image.stem}".encode()
            info = tarfile.TarInfo(f"dataset/{image.stem}.txt")
            info.size = len(caption)
            tar.addfile(info, io.BytesIO(caption))
    with prod_stack.client(prod_stack.create_key("archive")) as client:
        response = client.post(
            "/v1/jobs",
            files=[("images", ("dataset.tar.gz", archive.getvalue(), "application/gzip"))],
            data={"spec": json.dumps(quick_spec(steps=2))},
        )
        assert response.status_code == 202, response.text
        job = wait_for_status(client, response.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
        assert job["config"]["captions"] == {
            "robot-1.png": ["a photo of [V], robot-1"], "robot-2.png": ["a photo of [V], robot-2"]
        }  # fmt: skip
        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        config_url = next(a["url"] for a in artifacts if a["name"] == "config.json")
        used = httpx.get(config_url).json()
    assert set(used["captions"]) == {"robot-1.png", "robot-2.png"}
