"""`dopsd client generate` as people run it: the installed command against the real stack."""

from __future__ import annotations

import uuid
from pathlib import Path

from PIL import Image

from tests.client.test_client_cli import assert_one_readable_error, dopsd_client
from tests.conftest import Stack


def test_generate_prints_and_downloads_one_image_per_prompt_and_seed(
    prod_stack: Stack, api_key: str, tmp_path: Path
) -> None:
    out = tmp_path / "images"
    result = dopsd_client(
        prod_stack, api_key,
        "generate", "--prompt", "a red cube", "--prompt", "a blue ball", "--seed", "1", "--seed", "2",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("seed ")]
    assert [line.split(" ")[1] for line in lines] == ["1", "2", "1", "2"], result.stdout
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00-seed1.png", "01-seed2.png", "02-seed1.png", "03-seed2.png"]
    assert Image.open(files[0]).size == (64, 64)


def test_generate_with_another_keys_adapter_is_one_readable_error(prod_stack: Stack, api_key: str) -> None:
    result = dopsd_client(prod_stack, api_key, "generate", "--prompt", "x", "--adapter", f"{uuid.uuid4()}:0.8")
    assert result.returncode == 2
    assert_one_readable_error(result, "not found")
