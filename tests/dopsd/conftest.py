"""Fixtures for the tiny-model tests: example images, an exported tiny base pipeline, one trained run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dopsd.cli import main as cli_main


torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> Path:
    """`dopsd train --preset tiny-z-image --steps 30` on the example photos; returns the output folder."""
    out = tmp_path_factory.mktemp("run")
    code = cli_main(
        [
            "train",
            "--preset", "tiny-z-image",
            "--images", str(example_dir),
            "--captions", str(example_dir / "captions.json"),
            "--trigger", "sks",
            "--steps", "30",
            "--out", str(out),
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    return out
