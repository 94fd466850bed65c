"""Safe defaults: outside `make run`'s local trial the service is in production mode and refuses to start on
the development signing key; the deployment file restarts what fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


REPO = Path(__file__).resolve().parents[2]


def test_the_service_refuses_to_start_with_a_known_signing_key_unless_told_it_is_a_local_trial(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPSD_")}
    started = subprocess.run(
        [sys.executable, "-m", "dopsd", "serve", "--no-worker", "--port", "0"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode != 0
    assert "DOPSD_SIGNING_KEY must be set in production" in started.stdout + started.stderr
    assert not (tmp_path / "var").exists()  # it stopped before creating anything

    dry = subprocess.run(["make", "-n", "run"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert "DOPSD_ENVIRONMENT=development" in dry.stdout  # `make run` is the local trial and says so


def test_every_long_running_compose_service_restarts_when_it_fails() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        expected = "no" if name == "migrate" else "unless-stopped"  # migrate runs once, before the rest
        assert service.get("restart") == expected, name
