"""The page's generations, as a person uses them: "Try it" on a finished job makes images with its adapter beside
the base model's on the same seeds, and the gallery (#/generations) lists them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import Stack, example_files, quick_spec
from tests.pace import wait_for_status
from tests.web.test_page import loaded_images, shoot, sign_in, wait_for_js


def test_try_an_adapter_then_find_it_in_the_gallery(
    page: Any, prod_stack: Stack, api_key: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with prod_stack.client(api_key) as client:
        job = client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(quick_spec())}).json()
        assert wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})["status"] == "succeeded"

    sign_in(page, api_key)
    page.goto(f"/app/#/jobs/{job['id']}")
    expect(page.locator("#try-card")).to_be_visible()
    expect(page.locator("#try-card")).to_contain_text("“sks”")  # what [V] becomes
    page.fill("#try-prompt", "a photo of [V] on the moon")
    page.fill("#try-seeds", "3, 4")
    page.click("#try-generate")
    wait_for_js(page, "document.querySelectorAll('#try-results img').length === 4", timeout=120_000)
    wait_for_js(page, "[...document.querySelectorAll('#try-results img')].every(i => i.complete && i.naturalWidth)")
    assert loaded_images(page, "#try-results img") == 4
    captions = page.locator("#try-results figcaption").all_inner_texts()
    assert captions == [
        "Base model · seed 3",
        "With the adapter · seed 3",
        "Base model · seed 4",
        "With the adapter · seed 4",
    ]
    expect(page.locator("#try-results .sample-prompt").first).to_have_text("“a photo of sks on the moon”")
    shoot(page, "try-it.png", tmp_path)

    # A bad seed is said in words, nothing is sent.
    page.fill("#try-seeds", "one")
    page.click("#try-generate")
    expect(page.locator("#try-status")).to_contain_text("Not a seed: one")

    page.click("nav a[href='#/generations']")
    expect(page.locator("#generation-list .generation").first).to_be_visible()
    assert page.locator("#generation-list .generation").count() >= 2  # with the adapter, and the base model
    expect(page.locator("#generation-list")).to_contain_text(job["id"][:8])
