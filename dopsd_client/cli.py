"""`dopsd client ...`: submit a job, watch it, download what it made, from any machine that reaches the API.

    dopsd client submit --images photos/ --trigger sks --steps 1000 --wait --out sks/
    dopsd client preview --images photos/ --trigger sks --prompt "[V] on a beach"
    dopsd client status ID | events ID [--follow] | download ID [--samples] | cancel ID | delete ID | list

The API is `$DOPSD_API_URL` (default http://127.0.0.1:8000), the key `$DOPSD_API_KEY` (or `--api-url`,
`--api-key`). An API error prints as one `error:` line (exit 2); a job that fails under `--wait` prints the API's
message (exit 1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from dopsd_client.api import ADAPTER_NAME, TERMINAL_STATUSES, DOPSDAPIError, DOPSDClient, image_files
from dopsd_client.report import evaluated_summary, report_lines


EXIT_JOB_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _load_spec_fields() -> dict[str, dict[str, Any]]:
    """The job spec's training fields (name, JSON type, choices, help, extra flags): `spec_fields.json`, generated
    from the trainer's declarations (`dopsd.config.write_client_spec_fields`), since the client imports no
    project code."""
    text = resources.files("dopsd_client").joinpath("spec_fields.json").read_text(encoding="utf-8")
    return {f["name"]: f for f in json.loads(text)["fields"]}


SPEC_FIELDS = _load_spec_fields()
# Spec fields whose flags are written out below: required (`--trigger`), a file (`--captions`), or repeatable
# (`--prompt`, `--sample-seed`, `--format`); field -> the flag's destination. Every other spec field gets a
# generated flag (`--steps`, `--learning-rate`/`--lr`, `--teacher-mode` ...) whose destination is its name.
HAND_WRITTEN = {
    "trigger": "trigger",
    "captions": "captions",
    "validation_prompts": "prompt",
    "sample_seeds": "sample_seed",
    "output_formats": "format",
}
SHARED_FIELDS = ("preset", "default_caption")  # the generated flags previews take too; the rest are training's
SERVICE_FLAGS = {"webhook_url": "webhook_url", "init_adapter": "init_adapter"}  # the service's, not the trainer's
FORMATS = tuple(SPEC_FIELDS["output_formats"]["choices"])
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"integer": int, "number": float, "string": str}


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _time(value: str | None) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


# -- the spec a submission sends --------------------------------------------------------------------------------------


def build_spec(ns: argparse.Namespace) -> dict[str, Any]:
    """The job spec of `dopsd client submit`: `--spec FILE` first, then the flags given on the command line."""
    spec: dict[str, Any] = {}
    if ns.spec is not None:
        loaded = json.loads(Path(ns.spec).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{ns.spec}: the spec file must hold a JSON object of job fields")
        spec.update(loaded)
    if ns.captions is not None:
        captions = json.loads(Path(ns.captions).read_text())
        if not isinstance(captions, dict):
            raise ValueError(f"{ns.captions}: captions must be a JSON object: file name -> caption or list")
        spec["captions"] = {name: [c] if isinstance(c, str) else list(c) for name, c in captions.items()}
    dests = {name: HAND_WRITTEN.get(name, name) for name in SPEC_FIELDS if name != "captions"}
    for field, dest in {**dests, **SERVICE_FLAGS}.items():
        value = getattr(ns, dest, None)
        if value is not None:
            spec[field] = value
    return spec


# -- watching a job ---------------------------------------------------------------------------------------------------


class Watcher:
    """Turns a job's events into a progress bar (step/total, loss, ETA) and lines for the rest (samples' URLs)."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.samples: list[str] = []

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _open_bar(self, total: int, initial: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            size = shutil.get_terminal_size((100, 20))
            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                desc="training",
                file=self.stream,
                # A pty that reports a 0x0 size (no real terminal behind it) would hide the bar.
                ncols=min(size.columns, 120),
                nrows=size.lines,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
        elif total != self.bar.total:
            self.bar.total = total

    def close(self) -> None:
        """Closes the progress bar (it stays on screen at its last state)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, event: dict[str, Any]) -> None:
        """Shows one event."""
        kind, data = event.get("type"), event.get("data") or {}
        if not isinstance(data, dict):
            data = {}
        if kind == "queued":
            position = data.get("position")
            self._line("queued" + (f" (position {position})" if position else ""))
        elif kind == "started":
            attempt = data.get("attempt")
            again = f", attempt {attempt}" if isinstance(attempt, int) and attempt > 1 else ""
            self._line(f"started on {data.get('worker', 'a worker')}{again}")
        elif kind == "model_loaded":
            load_s = data.get("load_s")
            how = " (cached)" if data.get("cached") else ""
            self._line(f"model loaded{f' in {load_s:.1f}s' if isinstance(load_s, int | float) else ''}{how}")
        elif kind == "training":
            self._open_bar(int(data.get("total_steps") or 0), int(data.get("start_step") or 0))
        elif kind == "progress":
            self._progress(data)
        elif kind == "checkpoint":
            self._line(f"checkpoint at step {data.get('step')}")
        elif kind == "sample":
            self._sample(data)
        elif kind == "evaluated":
            self._line(evaluated_summary(data))
        elif kind == "requeued":
            self._line("the worker was lost; the job is queued again and resumes from its last checkpoint")
        elif kind == "cancel_requested":
            self._line("cancel requested; stopping within one step")
        elif kind == "warning":  # a stage after training failed; the adapter is there, this part is not
            self._line(f"warning: {data.get('stage', 'a stage')}: {data.get('message', '')}".rstrip(": "))
        elif kind in TERMINAL_STATUSES:
            if kind == "succeeded" and self.bar is not None:
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.close()

    def _progress(self, data: dict[str, Any]) -> None:
        step, total = data.get("step"), data.get("total_steps")
        if not isinstance(step, int) or not isinstance(total, int):
            return
        self._open_bar(total, 0)
        if self.bar is None:
            return
        self.bar.n = step
        postfix = {}
        if isinstance(data.get("loss"), int | float):
            postfix["loss"] = f"{data['loss']:.4g}"
        if isinstance(data.get("eta_s"), int | float):
            postfix["ETA"] = _duration(data["eta_s"])
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()
        if step >= total:
            self.close()  # training is done: what follows (final samples, the result) prints below the bar

    def _sample(self, data: dict[str, Any]) -> None:
        images = data.get("images")
        step = data.get("step")
        final = " (final)" if data.get("final") else ""
        if not isinstance(images, list):  # an API without sample URLs in its events: the count only
            count = f": {images} images" if isinstance(images, int) else ""
            self._line(f"samples at step {step}{final}{count} (dopsd client download ID --samples)")
            return
        self._line(f"samples at step {step}{final}:")
        if data.get("contact_sheet"):
            self._line(f"  contact sheet  {data['contact_sheet']}")
            self.samples.append(str(data["contact_sheet"]))
        for image in images:
            if not isinstance(image, dict) or not image.get("url"):
                continue
            kind = image.get("kind", "")
            if kind == "teacher" and image.get("source"):
                label = f"teacher {image['source']}"  # the training image the teacher was shown
            else:
                label = f"{kind} seed {image.get('seed', '?')}"
            prompt = f" {image['prompt']!r}" if image.get("prompt") else ""
            self._line(f"  {label:14} {image['url']}{prompt}")
            self.samples.append(str(image["url"]))


def _finish(client: DOPSDClient, job: dict[str, Any], ns: argparse.Namespace) -> int:
    """Reports a finished job; downloads its adapter(s) to `--out` when it succeeded."""
    job_id = job["id"]
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        if job["status"] == "canceled":
            _err(f"job {job_id} was canceled")
        else:
            _err(f"job {job_id} failed: {error.get('message') or 'no message'} [{error.get('code', 'failed')}]")
        return EXIT_JOB_FAILED
    took = ""
    if job.get("gpu_seconds") is not None:
        took = f" ({_duration(job['gpu_seconds'])} of GPU time)"
    progress = job.get("progress") or {}
    loss = f", final loss {progress['loss']:.4g}" if isinstance(progress.get("loss"), int | float) else ""
    _out(f"job {job_id} succeeded{took}{loss}")
    _print_report(job)
    if ns.out is not None:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        formats = ns.format or ["diffusers"]
        for fmt in dict.fromkeys(formats):
            path = client.download_adapter(job_id, out / _adapter_file(fmt), format=fmt)
            _out(f"adapter ({fmt}): {path}")
        if ns.samples:
            files = client.download_samples(job_id, out)
            _out(f"samples: {len(files)} files under {out / 'samples'}")
    else:
        _out(f"download: dopsd client download {job_id} --out {ADAPTER_NAME}")
    return 0


def _print_report(job: dict[str, Any]) -> None:
    """The job's evaluation report, if it has one: the two verdicts, then a line per figure."""
    report = job.get("report")
    if isinstance(report, dict):
        for line in report_lines(report):
            _out(line)
        retention = report.get("retention")
        if isinstance(retention, dict):  # a job that continued an earlier one: did it keep it?
            earlier = job.get("config", {}).get("init_adapter")
            _out(f"retention of job {earlier}: {retention.get('verdict')} - {retention.get('summary')}")


def _adapter_file(fmt: str) -> str:
    return ADAPTER_NAME if fmt == "diffusers" else f"pytorch_lora_weights_{fmt}.safetensors"


def _watch(client: DOPSDClient, job_id: str, ns: argparse.Namespace) -> int:
    watcher = Watcher(quiet=ns.quiet)
    try:
        job = client.wait(job_id, on_event=watcher)
    except KeyboardInterrupt:
        watcher.close()
        _err(f"stopped watching; the job goes on (dopsd client status {job_id}, dopsd client cancel {job_id})")
        return EXIT_INTERRUPTED
    finally:
        watcher.close()
    return _finish(client, job, ns)


# -- the commands -----------------------------------------------------------------------------------------------------


def _submit(client: DOPSDClient, ns: argparse.Namespace) -> int:
    spec = build_spec(ns)
    images = image_files(ns.images)
    if ns.dry_run:
        plan = client.submit(images, spec, dry_run=True)
        if ns.json:
            _out(json.dumps(plan, indent=2))
            return 0
        _print_plan(plan)
        return 0
    job = client.submit(images, spec, idempotency_key=ns.idempotency_key)
    if ns.json and not (ns.wait or ns.out):
        _out(json.dumps(job, indent=2))
        return 0
    position = f", position {job['queue_position']}" if job.get("queue_position") else ""
    _out(f"job {job['id']} {job['status']}{position}: {len(job.get('images', []))} images, preset {job['preset']}")
    if not (ns.wait or ns.out):
        _out(f"follow it: dopsd client events {job['id']} --follow")
        return 0
    return _watch(client, job["id"], ns)


def _preview(client: DOPSDClient, ns: argparse.Namespace) -> int:
    preview = client.preview(image_files(ns.images), build_spec(ns))
    _out(f"preview {preview['id']} {preview['status']}: {len(preview.get('images', []))} images")
    watcher = Watcher(quiet=True)
    try:  # the stages as they pass; the images once they are all there
        job = client.wait(preview["id"], on_event=lambda e: None if e.get("type") == "sample" else watcher(e))
    except KeyboardInterrupt:
        _err(f"stopped watching; the preview goes on (dopsd client status {preview['id']})")
        return EXIT_INTERRUPTED
    if job["status"] != "succeeded":
        return _finish(client, job, ns)
    done = client.get_preview(preview["id"])
    if ns.json:
        _out(json.dumps(done, indent=2))
    images = done.get("preview_images") or []
    for n, image in enumerate(images):
        line = f"{image.get('source', '')} seed {image.get('seed')} {image.get('prompt')!r}: {image['url']}"
        if ns.out is not None:
            stem = Path(str(image.get("source") or "image")).stem
            path = client.download_url(image["url"], Path(ns.out) / f"{n:02d}-{stem}-seed{image.get('seed')}.png")
            line = f"{line}\n  -> {path}"
        if not ns.json:
            _out(line)
    return 0


def _adapter_arg(value: str) -> tuple[str, float]:
    """`JOB_ID` or `JOB_ID:SCALE` (scale 1 by default)."""
    job_id, _, scale = value.partition(":")
    try:
        return job_id, float(scale) if scale else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JOB_ID or JOB_ID:SCALE: {value!r}") from None


def _generate(client: DOPSDClient, ns: argparse.Namespace) -> int:
    generation = client.generate(
        ns.prompt, preset=ns.preset, seeds=ns.seed, num_images=ns.num_images, adapters=ns.adapter or (),
        width=ns.width, height=ns.height, steps=ns.steps, guidance_scale=ns.guidance_scale,
    )  # fmt: skip
    if not ns.json:
        _out(f"generation {generation['id']} {generation['status']}")
    try:
        done = client.wait_generation(generation["id"])
    except KeyboardInterrupt:
        _err(f"stopped watching; the generation goes on (GET /v1/generations/{generation['id']})")
        return EXIT_INTERRUPTED
    if ns.json:
        _out(json.dumps(done, indent=2))
    if done["status"] != "succeeded":
        error = done.get("error") or {}
        _err(f"generation {done['id']} {done['status']}: {error.get('code', '')} {error.get('message', '')}".rstrip())
        return EXIT_JOB_FAILED
    for n, image in enumerate(done["images"]):
        line = f"seed {image['seed']} {image['prompt']!r}: {image['url']}"
        if ns.out is not None:
            path = client.download_url(image["url"], Path(ns.out) / f"{n:02d}-seed{image['seed']}.png")
            line = f"{line}\n  -> {path}"
        if not ns.json:
            _out(line)
    return 0


def _print_plan(plan: dict[str, Any]) -> None:
    config = plan.get("config") or {}
    _out("dry run: the API accepted the request and created nothing")
    fields = ("preset", "max_train_steps", "rank", "lora_alpha", "learning_rate", "resolution", "validation_prompts")
    for key in fields:
        if key in config:
            _out(f"  {key:20} {config[key]}")
    images = plan.get("images") or []
    names = ", ".join(f"{i['name']} ({_size(int(i['size']))})" for i in images)
    _out(f"  {'images':20} {names}")
    if plan.get("estimated_gpu_seconds") is not None:
        _out(f"  {'estimated GPU time':20} {_duration(plan['estimated_gpu_seconds'])}")
    if plan.get("queue_position") is not None:
        _out(f"  {'queue position':20} {plan['queue_position']}")


def _status(client: DOPSDClient, ns: argparse.Namespace) -> int:
    job = client.get(ns.job_id)
    if ns.json:
        _out(json.dumps(job, indent=2))
        return 0
    _out(f"job       {job['id']}")
    _out(f"status    {job['status']}" + (" (cancel requested)" if job.get("cancel_requested") else ""))
    _out(f"preset    {job['preset']}, {len(job.get('images', []))} images, attempt {job.get('attempt')}")
    if job.get("queue_position"):
        _out(f"queue     position {job['queue_position']}")
    progress = job.get("progress")
    if progress:
        loss = f", loss {progress['loss']:.4g}" if isinstance(progress.get("loss"), int | float) else ""
        eta = f", ETA {_duration(progress['eta_s'])}" if job["status"] == "running" and progress.get("eta_s") else ""
        _out(f"progress  step {progress['step']}/{progress['total_steps']}{loss}{eta}")
    _out(f"created   {_time(job.get('created_at'))}")
    if job.get("started_at"):
        _out(f"started   {_time(job['started_at'])}")
    if job.get("finished_at"):
        _out(f"finished  {_time(job['finished_at'])}")
    if job.get("gpu_seconds") is not None:
        _out(f"GPU time  {_duration(job['gpu_seconds'])}")
    if job.get("error"):
        _out(f"error     {job['error']['message']} [{job['error']['code']}]")
    _print_report(job)
    return 0 if job["status"] != "failed" else EXIT_JOB_FAILED


def _event_line(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    when = _time(event.get("created_at"))[-8:]
    if event.get("type") == "progress" and isinstance(data, dict):
        loss = f" loss {data['loss']:.4g}" if isinstance(data.get("loss"), int | float) else ""
        eta = f" ETA {_duration(data['eta_s'])}" if data.get("eta_s") is not None else ""
        return f"{when}  progress  step {data.get('step')}/{data.get('total_steps')}{loss}{eta}"
    if event.get("type") == "sample" and isinstance(data, dict) and isinstance(data.get("images"), list):
        final = " (final)" if data.get("final") else ""
        sheet = f", contact sheet {data['contact_sheet']}" if data.get("contact_sheet") else ""
        return f"{when}  sample  step {data.get('step')}{final}: {len(data['images'])} images{sheet}"
    if event.get("type") == "evaluated" and isinstance(data, dict):
        return f"{when}  evaluated  {evaluated_summary(data)}"
    detail = " ".join(f"{k}={json.dumps(v)}" for k, v in data.items()) if isinstance(data, dict) else str(data)
    return f"{when}  {event.get('type')}  {detail}".rstrip()


def _events(client: DOPSDClient, ns: argparse.Namespace) -> int:
    show: Callable[[dict[str, Any]], None] = (
        (lambda e: _out(json.dumps(e))) if ns.json else (lambda e: _out(_event_line(e)))
    )
    if ns.follow:
        try:
            for event in client.stream_events(ns.job_id, after=ns.after):
                show(event)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        return 0
    after = ns.after
    while True:
        page = client.events(ns.job_id, after, limit=500)
        for event in page["data"]:
            show(event)
        if not page["data"]:
            return 0
        after = page["next_after"]


def _download(client: DOPSDClient, ns: argparse.Namespace) -> int:
    out: str = ns.out if ns.out is not None else _adapter_file(ns.format)
    path = client.download_adapter(ns.job_id, out, format=ns.format)
    _out(f"adapter ({ns.format}): {path}")
    if ns.samples:
        folder = path.parent
        files = client.download_samples(ns.job_id, folder)
        _out(f"samples: {len(files)} files under {folder / 'samples'}")
    return 0


def _cancel(client: DOPSDClient, ns: argparse.Namespace) -> int:
    job = client.cancel(ns.job_id)
    note = " (stops within one training step)" if job["status"] == "running" else ""
    _out(f"job {job['id']} {job['status']}{note}")
    return 0


def _delete(client: DOPSDClient, ns: argparse.Namespace) -> int:
    client.delete(ns.job_id)
    _out(f"job {ns.job_id} deleted, with everything stored for it")
    return 0


def _list(client: DOPSDClient, ns: argparse.Namespace) -> int:
    page = client.list(status=ns.status, limit=ns.limit, kind=ns.kind)
    if ns.json:
        _out(json.dumps(page, indent=2))
        return 0
    if not page["data"]:
        _out("no jobs")
        return 0
    _out(f"{'id':36}  {'status':9}  {'preset':16}  {'progress':9}  created")
    for job in page["data"]:
        progress = job.get("progress")
        steps = f"{progress['step']}/{progress['total_steps']}" if progress else "-"
        _out(f"{job['id']:36}  {job['status']:9}  {job['preset']:16}  {steps:9}  {_time(job.get('created_at'))}")
    if page.get("next_cursor"):
        _out(f"(more: --limit {min(ns.limit * 2, 100)})")
    return 0


def _usage(client: DOPSDClient, ns: argparse.Namespace) -> int:
    usage = client.usage()
    if ns.json:
        _out(json.dumps(usage, indent=2))
        return 0
    stored, quota = _size(usage["stored_bytes"]), usage.get("quota_bytes")
    _out(f"stored:      {stored} of {_size(quota)}" if quota else f"stored:      {stored} (no quota)")
    _out(f"gpu seconds: {usage['gpu_seconds']:.1f}")
    kinds = (("jobs", usage["jobs"]), ("previews", usage["previews"]), ("generations", usage.get("generations", {})))
    for label, counts in kinds:
        listed = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
        _out(f"{label + ':':12} {listed}")
    return 0


COMMANDS: dict[str, Callable[[DOPSDClient, argparse.Namespace], int]] = {
    "submit": _submit,
    "preview": _preview,
    "generate": _generate,
    "status": _status,
    "events": _events,
    "download": _download,
    "cancel": _cancel,
    "delete": _delete,
    "list": _list,
    "usage": _usage,
}


def run(ns: argparse.Namespace) -> int:
    """Runs one `dopsd client` command; API errors become one `error:` line and exit code 2."""
    try:
        with DOPSDClient(ns.api_url, ns.api_key) as client:
            return COMMANDS[ns.client_command](client, ns)
    except DOPSDAPIError as exc:
        _err(f"error: {exc}")
        return EXIT_ERROR
    except (OSError, ValueError) as exc:
        _err(f"error: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


def _add_spec_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """A flag per job spec field in `names` (`--learning-rate`, and its extra forms: `--lr`), typed and with the
    choices and help of the field's declaration."""
    for name in names:
        field = SPEC_FIELDS[name]
        kwargs: dict[str, Any] = {"dest": name, "help": field["help"]}
        if field.get("choices"):
            kwargs["choices"] = field["choices"]
        else:
            kwargs["type"] = _FLAG_TYPES[field["type"]]
        parser.add_argument(f"--{name.replace('_', '-')}", *field["aliases"], **kwargs)


def _training_fields() -> list[str]:
    """The spec fields with a generated flag on `submit` only."""
    scalar = [n for n, f in SPEC_FIELDS.items() if f["type"] in _FLAG_TYPES]
    return [n for n in scalar if n not in HAND_WRITTEN and n not in SHARED_FIELDS]


def _add_input_flags(parser: argparse.ArgumentParser) -> None:
    """The images, the concept and the sampling flags that jobs and previews share."""
    parser.add_argument("--images", nargs="+", required=True, type=Path, help="image files, or folders of them")
    parser.add_argument("--trigger", required=True, help="the word that names the concept (replaces [V])")
    _add_spec_flags(parser, SHARED_FIELDS)
    parser.add_argument("--captions", type=Path, help="JSON file: image file name -> caption or list of captions")
    parser.add_argument(
        "--prompt", action="append", metavar="PROMPT", help="a validation prompt for the samples (repeatable)"
    )
    parser.add_argument("--sample-seed", type=int, action="append", help="a seed of the samples (repeatable)")
    parser.add_argument("--spec", type=Path, help="JSON file of job spec fields (the flags override it)")


def register(sub: Any) -> None:
    """Adds `dopsd client ...` to the `dopsd` parser (entry point group `dopsd.commands`)."""
    client = sub.add_parser(
        "client",
        help="use a dopsd API: submit jobs, watch them, download adapters",
        description="A client of the dopsd API ($DOPSD_API_URL, key $DOPSD_API_KEY).",
    )
    client.add_argument("--api-url", help="the API's base URL (default: $DOPSD_API_URL or http://127.0.0.1:8000)")
    client.add_argument("--api-key", help="the API key (default: $DOPSD_API_KEY)")
    commands = client.add_subparsers(dest="client_command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="submit a training job (optionally wait and download)")
    _add_input_flags(submit)
    _add_spec_flags(submit, _training_fields())
    submit.add_argument(
        "--format", action="append", choices=FORMATS, help="adapter format(s) to produce and download (repeatable)"
    )
    submit.add_argument("--webhook-url", help="the API calls this URL when the job ends")
    submit.add_argument(
        "--init-adapter",
        metavar="JOB_ID",
        help="continue training from the adapter of this succeeded job (same preset)",
    )
    submit.add_argument("--idempotency-key", help="repeat the command with the same key: the same job, not a new one")
    submit.add_argument("--dry-run", action="store_true", help="validate and show the resolved config; create nothing")
    submit.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    submit.add_argument("--out", type=Path, help="folder for the adapter once the job succeeded (implies --wait)")
    submit.add_argument("--samples", action="store_true", help="with --out: also download the sample images")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")
    submit.add_argument("--json", action="store_true", help="print the API's JSON")

    preview = commands.add_parser(
        "preview", help="render the concept zero-shot with the base model (no training), print the images' URLs"
    )
    _add_input_flags(preview)
    preview.add_argument("--out", type=Path, help="folder to download the preview images into")
    preview.add_argument("--json", action="store_true", help="print the API's JSON")

    generate = commands.add_parser(
        "generate", help="make images with the base model and your adapters; print (or download) them"
    )
    generate.add_argument("--preset", default="tiny-z-image", help="the base model (default tiny-z-image)")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    generate.add_argument("--seed", type=int, action="append", help="a seed (repeat; one image per seed and prompt)")
    generate.add_argument("--num-images", type=int, help="images per prompt with random seeds (without --seed)")
    generate.add_argument(
        "--adapter", type=_adapter_arg, action="append", metavar="JOB_ID[:SCALE]",
        help="a succeeded training job's adapter at a scale (default 1); repeat to combine",
    )  # fmt: skip
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--steps", type=int, help="denoising steps (default: the preset's native few)")
    generate.add_argument("--guidance-scale", type=float)
    generate.add_argument("--out", type=Path, help="folder to download the images into")
    generate.add_argument("--json", action="store_true", help="print the API's JSON")

    status = commands.add_parser("status", help="a job's status, progress and error")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="print the API's JSON")

    events = commands.add_parser("events", help="a job's events; --follow streams them live")
    events.add_argument("job_id")
    events.add_argument("--follow", "-f", action="store_true", help="stream new events until the job ends")
    events.add_argument("--after", type=int, default=0, help="only events after this event id")
    events.add_argument("--json", action="store_true", help="one JSON object per line")

    download = commands.add_parser("download", help="download a succeeded job's adapter (and samples)")
    download.add_argument("job_id")
    download.add_argument("--format", choices=FORMATS, default="diffusers")
    download.add_argument("--out", help=f"a file, or a folder (existing, or ending in /) (default ./{ADAPTER_NAME})")
    download.add_argument("--samples", action="store_true", help="also the sample images, under samples/ beside it")

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")

    delete = commands.add_parser("delete", help="cancel a job if needed and delete everything stored for it")
    delete.add_argument("job_id")

    listing = commands.add_parser("list", help="your jobs, newest first")
    listing.add_argument(
        "--status", choices=("queued", "running", "succeeded", "failed", "canceled"), help="only jobs in this state"
    )
    listing.add_argument("--kind", choices=("training", "preview"), help="training jobs (default) or previews")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true", help="print the API's JSON")

    usage = commands.add_parser("usage", help="what your key stores and has used (GPU-seconds), and its limits")
    usage.add_argument("--json", action="store_true", help="print the API's JSON")

    client.set_defaults(func=run)
