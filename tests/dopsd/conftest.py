"""Fixtures for the tiny-model tests: example images, an exported tiny base pipeline, one trained run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dopsd.cli import main as cli_main


REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "concept"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled example concept (4 images + captions.json)."""
    target = tmp_path_factory.mktemp("concept")
    for f in EXAMPLES.iterdir():
        shutil.copy(f, target / f.name)
    return target


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base pipeline written by `dopsd models export tiny-z-image DIR`."""
    target = tmp_path_factory.mktemp("tiny-z-image")
    assert cli_main(["models", "export", "tiny-z-image", str(target)]) == 0
    return target


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
