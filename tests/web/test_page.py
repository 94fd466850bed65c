"""The web page (api/web) end to end: headless Chromium, driven by Playwright, against the production-shaped stack.

The page is only a client of the public REST API, so these tests act as a person would: enter the key, drop images
(one of them broken), read the estimate, start a tiny job, watch it over server-sent events, compare the adapter
it downloads with the one the API serves, cancel and delete a running job, preview a concept, and use the page on a
phone-sized screen with the keyboard. Screenshots go to test-artifacts/screenshots/ and the test's tmp dir (docs/screenshots/ with
DOPSD_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Stack, example_files, quick_spec
from tests.pace import PACE


REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "concept").glob("*.png"))
# Test artifacts (git-ignored); `DOPSD_UPDATE_SCREENSHOTS=1` also refreshes the README's copies in docs/.
ARTIFACTS = REPO / "test-artifacts" / "screenshots"
DOC_SCREENSHOTS = REPO / "docs" / "screenshots"
JOB_URL = re.compile(r"#/jobs/([0-9a-f-]{36})$")
CONCEPT_VERDICTS = {"learned", "not learned", "inconclusive"}
QUALITY_VERDICTS = {"kept", "degraded", "inconclusive"}
DROP_BROKEN_FILE = """() => {
    const dt = new DataTransfer();
    dt.items.add(new File(["this is text, not a PNG"], "broken.png", { type: "image/png" }));
    return dt;
}"""


# Every Content-Security-Policy violation on the page, recorded from before its first script runs.
RECORD_CSP_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
    window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


def within_ms(seconds: float) -> float:
    """`PACE.limit_s(seconds)` in Playwright's milliseconds: a busy machine slows a wait for the stack's work (a
    job's progress or end) instead of failing it."""
    return PACE.limit_s(seconds) * 1000


def assert_security_headers(headers: dict[str, str]) -> None:
    """The page's response headers: its own policy (no inline code, no framing), nosniff, no referrer."""
    policy = headers["content-security-policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy, policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy, policy
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def wait_for_js(page: Any, expression: str, timeout: float = 120_000) -> None:
    """Waits until `expression` is true in the page. Evaluated from here, not by Playwright's in-page polling
    (`wait_for_function`), which compiles the expression with `eval` and so breaks the page's Content-Security-Policy
    (no `unsafe-eval`); `page.evaluate` goes through the browser's debugging protocol, which the policy does not
    cover. It returns as soon as the expression holds; the long limit is for a busy machine, where the presigned S3
    images of a finished job once took over 30 s to load while the whole suite ran."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout / 1000:.0f} s: {expression}")
        page.wait_for_timeout(100)


def sign_in(page: Any, key: str) -> None:
    """What the key form does, before any page script runs: the key in this tab's sessionStorage."""
    page.add_init_script(f"sessionStorage.setItem('dopsd.apiKey', {json.dumps(key)})")


def shoot(page: Any, name: str, tmp_path: Path) -> None:
    """Saves a full-page screenshot as a test artifact."""
    folders = [ARTIFACTS, tmp_path] + ([DOC_SCREENSHOTS] if os.environ.get("DOPSD_UPDATE_SCREENSHOTS") else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / name), full_page=True)


def loaded_images(page: Any, selector: str) -> int:
    """How many images under `selector` have actually been decoded by the browser."""
    count: int = page.eval_on_selector_all(selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length")
    return count


def add_images(page: Any) -> None:
    """The example images through the file input, the broken file dropped on the drop zone."""
    page.set_input_files("#images", [str(p) for p in EXAMPLES])
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": page.evaluate_handle(DROP_BROKEN_FILE)})


def test_sign_in_upload_train_watch_and_download(page: Any, prod_stack: Stack, api_key: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request))
    page.add_init_script(RECORD_CSP_VIOLATIONS)

    response = page.goto("/")
    assert page.url.endswith("/app/")  # `/` redirects to the page
    assert_security_headers(response.headers)
    key_field = page.get_by_label("API key", exact=True)
    key_field.fill("dopsd_wrong_key")
    page.get_by_role("button", name="Use this key").click()
    expect(page.get_by_role("alert")).to_have_text("The API key was not accepted. Enter a valid key.")
    key_field.fill(api_key)
    page.get_by_role("button", name="Use this key").click()
    expect(page.get_by_role("heading", name="Start a training job")).to_be_visible()
    expect(page.locator("#preset option[value='tiny-z-image']")).to_have_count(1)
    page.select_option("#preset", "tiny-z-image")

    add_images(page)
    expect(page.locator("#file-list .file")).to_have_count(len(EXAMPLES) + 1)
    wait_for_js(
        page,
        f"document.querySelectorAll('#file-list img.thumb').length === {len(EXAMPLES)}"
        " && [...document.querySelectorAll('#file-list img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
    )  # thumbnails at once, from the local files; the broken file shows a placeholder
    broken = page.locator('.file[data-name="broken.png"]')
    expect(broken).to_have_attribute("data-status", "refused")
    expect(broken.locator(".file-status")).to_have_text("Refused: Not a recognizable image file.")
    for path in EXAMPLES:
        expect(page.locator(f'.file[data-name="{path.name}"]')).to_have_attribute("data-status", "ok")

    page.get_by_label("Caption for robot-1.png (optional)").fill("a photo of [V] on a desk")
    page.get_by_label("Steps", exact=True).fill("6")
    page.locator("#sample-every").fill("3")
    page.get_by_label("Sample seeds").fill("0")
    page.get_by_label("Validation prompts (one per line)").fill("a photo of [V]")
    expect(page.locator("#estimate-gpu")).to_contain_text("GPU-second")
    expect(page.locator("#estimate-queue")).not_to_be_empty()
    expect(page.locator("#file-note")).to_contain_text("1 refused file is left out.")
    shoot(page, "new-job.png", tmp_path)

    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(JOB_URL)
    match = JOB_URL.search(page.url)
    assert match is not None
    job_id = match.group(1)
    expect(page.locator("#job-status .badge")).to_have_attribute("data-status", "succeeded", timeout=within_ms(150))

    # Progress reached the end, the loss was drawn, the samples of both steps arrived (base beside adapter).
    assert page.eval_on_selector("#job-progress", "e => [e.value, e.max]") == [6, 6]
    expect(page.locator("#progress-text")).to_have_text("Finished: 6 of 6 steps.")
    expect(page.locator("#event-log")).to_contain_text("Step 6 of 6")
    expect(page.locator("#event-log li[data-type='succeeded']")).to_have_count(1)
    assert page.locator("#loss-chart polyline").count() == 1
    for step in (3, 6):
        section = page.locator(f".sample-step[data-step='{step}']")
        expect(section.locator("figure[data-kind='base'] img")).to_have_count(1)
        expect(section.locator("figure[data-kind='adapter'] img")).to_have_count(1)
    wait_for_js(
        page, "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)"
    )  # the presigned S3 URLs of the events load
    assert loaded_images(page, "#gallery img") >= 4
    expect(page.locator("#download-diffusers")).to_be_visible()

    # The verdict card: both verdicts in words with their summaries, the step judged and the figures, as the API's
    # report says (the page reads it from the finished job, without asking for it again).
    client = prod_stack.client(api_key)
    report = client.get(f"/v1/jobs/{job_id}").json()["report"]
    assert report is not None and report["step"] == 6
    verdict = page.locator("#verdict")
    expect(verdict).to_have_attribute("data-source", "report")
    expect(verdict.locator("#verdict-step")).to_contain_text("Judged at step 6")
    for axis, words in (("concept", CONCEPT_VERDICTS), ("few_step_quality", QUALITY_VERDICTS)):
        said = report["verdicts"][axis]
        assert said["verdict"] in words, said
        block = verdict.locator(f".verdict[data-axis='{axis}']")
        expect(block).to_have_attribute("data-verdict", said["verdict"])
        expect(block.locator(".verdict-word")).to_have_text(said["verdict"].capitalize())
        summary = said["summary"].replace("`", "").strip().rstrip(".")  # the page writes it as a sentence
        expect(block.locator(".verdict-summary")).to_contain_text(summary, ignore_case=True)
        if said["verdict"] in {"not learned", "degraded"}:  # these stand out
            expect(block).to_have_class(re.compile(r"\bverdict-bad\b"))
    rows = verdict.locator("#figures tbody tr")
    expect(rows).to_have_count(len(report["figures"]))
    assert report["figures"], "the report has figures"
    for name, figure in report["figures"].items():
        row = verdict.locator(f"#figures tr[data-figure='{name}']")
        expect(row.locator("th")).to_contain_text(figure["title"])
        if figure["not_measured"]:
            expect(row).to_contain_text("Not measured: ")
        else:
            expect(row).to_have_attribute("data-verdict", figure["verdict"])
    expect(page.locator("#event-log li[data-type='evaluated']").last).to_contain_text("Evaluated at step 6: concept ")
    shoot(page, "finished-job.png", tmp_path)

    # Downloads are the job's own files, byte for byte.
    for fmt in ("diffusers", "comfyui"):
        with page.expect_download() as download:
            page.locator(f"#download-{fmt}").click()
        served = client.get(f"/v1/jobs/{job_id}/adapter", params={"format": fmt}, follow_redirects=True)
        assert served.status_code == 200
        assert Path(download.value.path()).read_bytes() == served.content
        assert download.value.suggested_filename.endswith(".safetensors")
    snippet = page.locator("#snippet").inner_text()
    assert "load_lora_weights(" in snippet and "DiffusionPipeline" in snippet
    page.get_by_role("button", name="Copy code").click()
    expect(page.get_by_text("Copied.")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == snippet

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert sorted(i["name"] for i in job["images"]) == [p.name for p in EXAMPLES]  # the refused file left out
    assert job["config"]["captions"] == {"robot-1.png": ["a photo of [V] on a desk"]}
    assert job["config"]["max_train_steps"] == 6 and job["config"]["sample_every"] == 3

    # Live updates came from the server-sent event stream, not from polling; the key never was in a URL.
    streams = [r for r in requests if r.url.endswith(f"/v1/jobs/{job_id}/events")]
    assert streams and all(r.headers.get("accept") == "text/event-stream" for r in streams)
    assert all(r.headers.get("authorization") == f"Bearer {api_key}" for r in streams)
    polls = [r for r in requests if r.url.endswith(f"/v1/jobs/{job_id}")]
    assert len(polls) <= 2, [r.url for r in polls]
    assert not [r.url for r in requests if api_key in r.url]
    # All of it under the page's Content-Security-Policy: nothing was blocked (scripts, styles, the API, the
    # thumbnails' blob: URLs, the samples' signed storage URLs).
    assert page.evaluate("window.cspViolations") == []


def test_watch_a_running_job_then_cancel_and_delete_it(
    page: Any, prod_stack: Stack, api_key: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    client = prod_stack.client(api_key)
    spec = quick_spec(steps=3000, sample_every=4, checkpointing_steps=0)
    response = client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(spec)})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    sign_in(page, api_key)
    page.goto("/app/#/jobs")
    row = page.locator(f".job-row[data-id='{job_id}']")
    # live in the list
    expect(row.locator(".badge")).to_have_attribute("data-status", "running", timeout=within_ms(120))
    expect(row.locator("progress")).to_be_visible(timeout=within_ms(120))  # the first progress report
    shoot(page, "jobs.png", tmp_path)

    row.get_by_role("link").click()
    page.wait_for_url(f"**/#/jobs/{job_id}")
    wait_for_js(page, "Number(document.querySelector('#progress-text')?.dataset.step) >= 6", timeout=within_ms(120))
    expect(page.locator("#progress-text")).to_contain_text(re.compile(r"Step \d+ of 3000 · about .+ left"))
    wait_for_js(page, "document.querySelector('#loss-chart polyline')?.points.numberOfItems >= 2")
    expect(page.locator(".sample-step[data-step='4'] figure[data-kind='adapter'] img")).to_have_count(1)  # live
    # The latest quick check's verdicts, live from the `evaluated` events of the sample steps.
    verdict = page.locator("#verdict")
    expect(verdict).to_have_attribute("data-source", "quick")
    expect(verdict.locator("#verdict-step")).to_contain_text("Quick check at step ")
    concept = verdict.locator(".verdict[data-axis='concept']")
    expect(concept).to_have_attribute("data-verdict", re.compile(r"^(learned|not learned|inconclusive)$"))
    quality = verdict.locator(".verdict[data-axis='few_step_quality']")
    expect(quality).to_have_attribute("data-verdict", re.compile(r"^(kept|degraded|inconclusive)$"))
    shoot(page, "running-job.png", tmp_path)

    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status .badge")).to_have_attribute("data-status", "canceled", timeout=60_000)
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"

    page.get_by_role("button", name="Delete job and data").click()
    page.get_by_role("button", name="Yes, delete everything").click()
    page.wait_for_url("**/#/jobs")
    expect(page.locator(f".job-row[data-id='{job_id}']")).to_have_count(0)
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert prod_stack.s3_keys(f"jobs/{job_id}/") == []


def test_zero_shot_preview_before_training(page: Any, prod_stack: Stack, api_key: str) -> None:
    from playwright.sync_api import expect

    sign_in(page, api_key)
    page.goto("/app/#/new")
    expect(page.locator("#preset option[value='tiny-z-image']")).to_have_count(1)
    page.select_option("#preset", "tiny-z-image")
    page.set_input_files("#images", [str(p) for p in EXAMPLES[:2]])
    page.get_by_label("Validation prompts (one per line)").fill("a photo of [V]")
    for path in EXAMPLES[:2]:
        expect(page.locator(f'.file[data-name="{path.name}"]')).to_have_attribute("data-status", "ok")

    page.get_by_role("button", name="Preview the concept first").click()
    preview = page.locator("#preview")
    expect(preview.locator(".badge")).to_have_attribute("data-status", "succeeded", timeout=within_ms(150))
    expect(preview.locator("figure img")).to_have_count(2)  # one per reference image and prompt
    wait_for_js(page, "[...document.querySelectorAll('#preview img')].every(i => i.complete && i.naturalWidth)")
    expect(preview.locator("figcaption").first).to_contain_text("a photo of")
    preview_id = preview.get_by_role("link", name="Open the preview's page").get_attribute("href").rsplit("/", 1)[-1]
    assert prod_stack.client(api_key).get(f"/v1/jobs/{preview_id}").json()["kind"] == "preview"


def test_a_first_job_starts_on_the_shapes_model_with_its_example_images(
    page: Any, prod_stack: Stack, api_key: str
) -> None:
    """A newcomer's page: the pretrained `shapes` model is chosen, with its trigger word, no default caption, its
    own prompt and its bundled cross images one click away; the preview shows its teacher drawing them. Another
    model takes its own starting points, and a field the person edited keeps their text."""
    from playwright.sync_api import expect

    sign_in(page, api_key)
    page.goto("/app/#/new")
    expect(page.locator("#preset")).to_have_value("shapes")
    expect(page.locator("#trigger")).to_have_value("[V]")
    expect(page.locator("#default-caption")).to_have_value("")
    expect(page.locator("#prompts")).to_have_value("a red [V] on a blue background")
    page.get_by_role("button", name="Use the example images").click()
    crosses = sorted(p.name for p in (REPO / "examples" / "shapes").glob("*.png"))
    expect(page.locator("#file-list .file")).to_have_count(len(crosses))
    for name in crosses:
        expect(page.locator(f'.file[data-name="{name}"]')).to_have_attribute("data-status", "ok")
    expect(page.locator("#estimate-gpu")).to_contain_text("GPU-second")

    page.get_by_label("Validation prompts (one per line)").fill("a green [V] on a red background")
    page.select_option("#preset", "tiny-z-image")
    expect(page.locator("#trigger")).to_have_value("sks")
    expect(page.locator("#default-caption")).to_have_value("a photo of [V]")
    expect(page.locator("#prompts")).to_have_value("a green [V] on a red background")  # edited: kept
    expect(page.get_by_role("button", name="Use the example images")).to_be_hidden()
    page.select_option("#preset", "shapes")
    expect(page.locator("#trigger")).to_have_value("[V]")
    expect(page.get_by_role("button", name="Use the example images")).to_be_visible()

    page.get_by_role("button", name="Preview the concept first").click()
    preview = page.locator("#preview")
    expect(preview.locator(".badge")).to_have_attribute("data-status", "succeeded", timeout=within_ms(150))
    wait_for_js(page, "document.querySelectorAll('#preview figure img').length > 0")  # the first references'
    expect(preview.locator("figcaption").first).to_contain_text("a green [V] on a red background")


def test_phone_screen_and_keyboard(browser: Any, prod_stack: Stack, api_key: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    ctx = browser.new_context(
        base_url=prod_stack.base_url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
        device_scale_factor=1,
    )  # fmt: skip
    try:
        page = ctx.new_page()
        # File-chooser interception is switched on asynchronously when the first listener is added: add one now, so
        # that the key press below cannot outrun it.
        page.on("filechooser", lambda chooser: None)
        page.goto("/app/")
        # Keyboard only: the key form has focus, Enter submits it.
        expect(page.get_by_label("API key", exact=True)).to_be_focused()
        page.keyboard.type(api_key)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Start a training job")).to_be_visible()
        expect(page.locator("#preset option[value='tiny-z-image']")).to_have_count(1)

        # Tab reaches the drop zone's button (with a visible focus ring), and Enter opens the file chooser.
        for _ in range(12):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "choose-images":
                break
        assert page.evaluate("document.activeElement.id") == "choose-images"
        assert page.eval_on_selector("#choose-images", "e => getComputedStyle(e).outlineStyle") != "none"
        with page.expect_file_chooser() as chooser:
            page.keyboard.press("Enter")
        chooser.value.set_files([str(p) for p in EXAMPLES[:2]])
        expect(page.locator("#file-list .file")).to_have_count(2)
        for path in EXAMPLES[:2]:
            expect(page.locator(f'.file[data-name="{path.name}"]')).to_have_attribute("data-status", "ok")
        expect(page.locator("#estimate-gpu")).to_be_visible()

        page.locator("#steps").focus()
        assert page.eval_on_selector("#steps", "e => getComputedStyle(e).outlineStyle") != "none"
        # Nothing is wider than the screen.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        shoot(page, "new-job-phone.png", tmp_path)
        page.goto("/app/#/jobs")
        expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        ctx.close()


def test_page_is_served_by_the_api_outside_its_schema(prod_stack: Stack) -> None:
    with httpx.Client(base_url=prod_stack.base_url) as client:
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/app/"
        index = client.get("/app/")
        assert index.status_code == 200 and '<script type="module" src="app.js">' in index.text
        for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            asset = client.get(f"/app/{name}")
            assert asset.status_code == 200 and kind in asset.headers["content-type"]
        paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in paths and not [p for p in paths if p.startswith("/app")]


def test_page_files_ship_with_the_package() -> None:
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    files = [p.relative_to(REPO / "api").as_posix() for p in (REPO / "api" / "web").iterdir() if p.is_file()]
    assert {"web/index.html", "web/app.js", "web/style.css"} <= set(files)
    assert [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)] == []
