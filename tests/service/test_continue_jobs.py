"""Continuing an earlier job's adapter through HTTP on the production-shaped stack (PostgreSQL, Redis, SeaweedFS,
a real worker process): `spec.init_adapter` names a succeeded job of the same key and preset; the child starts
where its parent ended and its report says what it kept; another key's job is a 404, an unfinished one a 409, a
spec the parent does not fit a 422 (as every spec refusal), and a parent deleted while the child waits fails the
child with `bad_input`."""

from __future__ import annotations

import json
import statistics
from typing import Any

import httpx
import pytest

from tests.conftest import Stack, example_files, quick_spec
from tests.pace import wait_for_status


def submit(client: httpx.Client, spec: dict[str, Any], *, dry_run: bool = False) -> httpx.Response:
    params = {"dry_run": "true"} if dry_run else None
    return client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(spec)}, params=params)


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()["data"]


def artifact_json(client: httpx.Client, job_id: str, name: str) -> Any:
    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    return httpx.get(artifacts[name]["url"], timeout=30).json()


@pytest.fixture(scope="module")
def owner(prod_stack: Stack) -> str:
    return prod_stack.create_key("continue")


@pytest.fixture(scope="module")
def parent(prod_stack: Stack, owner: str) -> dict[str, Any]:
    """A succeeded job at rank 4 (not the preset's 8), two sample seeds, no report of its own."""
    with prod_stack.client(owner) as client:
        spec = quick_spec(steps=8, rank=4, lora_alpha=8.0, sample_seeds=[0, 1], eval_seeds=0)
        job = submit(client, spec).json()
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})
        assert done["status"] == "succeeded", done
        return done


def test_a_continued_job_starts_where_its_parent_ended(prod_stack: Stack, owner: str, parent: dict[str, Any]) -> None:
    with prod_stack.client(owner) as client:
        plan = submit(client, quick_spec(init_adapter=parent["id"]), dry_run=True)
        assert plan.status_code == 200, plan.text
        assert plan.json()["config"]["init_adapter"] == parent["id"] and plan.json()["config"]["rank"] == 4
        job = submit(client, quick_spec(steps=3, sample_seeds=[0, 1], init_adapter=parent["id"])).json()
        assert job["config"]["init_adapter"] == parent["id"]  # the resolved config names it
        assert (job["config"]["rank"], job["config"]["lora_alpha"]) == (4, 8.0)  # the adapter's shape
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})
        assert done["status"] == "succeeded", done
        ended = next(e for e in events(client, parent["id"]) if e["type"] == "succeeded")["data"]
        child_events = events(client, job["id"])
        started = next(e for e in child_events if e["type"] == "succeeded")["data"]
        # Same images, captions and seeds: the child's gap before is its parent's gap after (tests/dopsd measures
        # them bit-identical in fp32; JSON round trips keep every digit).
        assert started["gap_before"] == pytest.approx(ended["gap_after"], rel=1e-6, abs=0)
        parent_losses = artifact_json(client, parent["id"], "metrics.json")["loss"]
        first = next(e for e in child_events if e["type"] == "progress")["data"]["loss"]
        assert first != parent_losses[0]  # a run that started over would repeat it (same pair and noise)
        assert first <= 2 * statistics.mean(parent_losses[-5:])
        metrics = artifact_json(client, job["id"], "metrics.json")
        assert metrics["init_adapter"] == {"source": parent["id"], "steps": 8, "rank": 4, "alpha": 8.0}
        retention = done["report"]["retention"]
        assert retention["verdict"] in ("kept", "partly", "lost") and retention["source"] == parent["id"]
        assert retention["cases"] == [{"prompt": "a photo of sks", "seed": 0}, {"prompt": "a photo of sks", "seed": 1}]
        assert retention["figures"]["retention_pixel"]["mean"] <= 1.0


def test_another_keys_job_and_unusable_parents_are_refused(
    prod_stack: Stack, owner: str, parent: dict[str, Any]
) -> None:
    stranger = prod_stack.create_key("stranger")
    with prod_stack.client(stranger) as client:
        response = submit(client, quick_spec(init_adapter=parent["id"]))
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    with prod_stack.client(owner) as client:
        cases = [
            (quick_spec(init_adapter="00000000-0000-4000-8000-000000000000"), 404, "job_not_found"),
            (quick_spec(preset="tiny-flux2-klein", init_adapter=parent["id"]), 422, "init_adapter_preset_mismatch"),
            (quick_spec(rank=8, init_adapter=parent["id"]), 422, "init_adapter_rank_mismatch"),
        ]
        for spec, status, code in cases:
            response = submit(client, spec, dry_run=True)
            assert response.status_code == status and response.json()["error"]["code"] == code, response.text
        preview = client.post(
            "/v1/previews",
            files=example_files(1),
            data={"spec": json.dumps({"preset": "tiny-z-image", "init_adapter": parent["id"]})},
        )
        assert preview.status_code == 422 and preview.json()["error"]["code"] == "init_adapter_not_supported"
        # An unfinished job: refused while it runs, then cancelled.
        long = submit(client, quick_spec(steps=5000)).json()
        wait_for_status(client, long["id"], {"running"})
        response = submit(client, quick_spec(init_adapter=long["id"]))
        assert response.status_code == 409 and response.json()["error"]["code"] == "init_adapter_not_ready"
        assert long["id"] in response.json()["error"]["message"]
        client.post(f"/v1/jobs/{long['id']}/cancel")
        wait_for_status(client, long["id"], {"canceled", "succeeded", "failed"})


def test_a_parent_deleted_while_its_child_waits_fails_the_child(prod_stack: Stack, owner: str) -> None:
    with prod_stack.client(owner) as client:
        doomed = submit(client, quick_spec(steps=2, eval_seeds=0)).json()
        assert wait_for_status(client, doomed["id"], {"succeeded", "failed", "canceled"})["status"] == "succeeded"
        blocker = submit(client, quick_spec(steps=5000)).json()  # keeps the only worker busy
        wait_for_status(client, blocker["id"], {"running"})
        child = submit(client, quick_spec(init_adapter=doomed["id"])).json()
        assert child["status"] == "queued"
        assert client.delete(f"/v1/jobs/{doomed['id']}").status_code == 204
        client.post(f"/v1/jobs/{blocker['id']}/cancel")
        failed = wait_for_status(client, child["id"], {"succeeded", "failed", "canceled"})
        assert failed["status"] == "failed" and failed["error"]["code"] == "bad_input", failed
        assert doomed["id"] in failed["error"]["message"] and "deleted" in failed["error"]["message"]
