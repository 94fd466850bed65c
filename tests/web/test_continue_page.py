"""The web page's side of continuing an adapter: a continued job's page shows the job it continued and the
report's retention section; "Continue training" on a succeeded job opens the new-job form with that job's adapter
and preset, and the job it submits continues it (headless Chromium against the production-shaped stack)."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import Stack, example_files, quick_spec
from tests.pace import wait_for_status
from tests.web.test_page import EXAMPLES, JOB_URL, sign_in


def finished(client: Any, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(spec)})
    assert response.status_code == 202, response.text
    job = wait_for_status(client, response.json()["id"], {"succeeded", "failed", "canceled"})
    assert job["status"] == "succeeded", job
    return job


def test_continue_training_from_a_finished_job(page: Any, prod_stack: Stack, api_key: str) -> None:
    from playwright.sync_api import expect

    client = prod_stack.client(api_key)
    parent = finished(client, quick_spec(steps=3, eval_seeds=0))
    child = finished(client, quick_spec(steps=2, init_adapter=parent["id"]))
    retention = child["report"]["retention"]

    sign_in(page, api_key)
    page.goto(f"/app/#/jobs/{child['id']}")
    section = page.locator("#retention")
    expect(section).to_have_attribute("data-verdict", retention["verdict"])
    expect(section.locator(".verdict-word")).to_have_text(retention["verdict"].capitalize())
    expect(section.locator("#retention-figures tr[data-figure='retention_pixel']")).to_have_count(1)
    expect(page.locator("#continued-from a")).to_have_attribute("href", f"#/jobs/{parent['id']}")

    page.get_by_role("button", name="Continue training").click()
    page.wait_for_url("**/#/new")
    expect(page.get_by_role("heading", name="Continue training")).to_be_visible()
    expect(page.locator("#continuing")).to_have_attribute("data-init-adapter", child["id"])
    expect(page.locator("#preset")).to_have_value("tiny-z-image")
    expect(page.locator("#preset")).to_be_disabled()
    expect(page.locator("#trigger")).to_have_value("sks")
    page.set_input_files("#images", [str(p) for p in EXAMPLES[:2]])
    for path in EXAMPLES[:2]:
        expect(page.locator(f'.file[data-name="{path.name}"]')).to_have_attribute("data-status", "ok")
    page.get_by_label("Steps", exact=True).fill("2")
    expect(page.locator("#estimate-gpu")).to_contain_text("GPU-second")  # the draft's dry run passed
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(JOB_URL)
    match = JOB_URL.search(page.url)
    assert match is not None
    made = client.get(f"/v1/jobs/{match.group(1)}").json()
    assert made["config"]["init_adapter"] == child["id"] and made["config"]["max_train_steps"] == 2
    client.post(f"/v1/jobs/{made['id']}/cancel")

    # Once submitted the form starts afresh; and "Start from the base model instead" drops the adapter.
    page.goto("/app/#/new")
    expect(page.get_by_role("heading", name="Start a training job")).to_be_visible()
    page.goto(f"/app/#/jobs/{child['id']}")
    page.get_by_role("button", name="Continue training").click()
    expect(page.locator("#continuing")).to_have_count(1)
    page.get_by_role("button", name="Start from the base model instead").click()
    expect(page.locator("#continuing")).to_have_count(0)
    expect(page.get_by_role("heading", name="Start a training job")).to_be_visible()
    expect(page.locator("#preset")).to_be_enabled()
