"""Shared test setup: offline, fp32, two CPU threads, and tiny models built in code (never downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "concept"


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
    from dopsd.cli import main as cli_main

    assert cli_main(["models", "export", "tiny-z-image", str(target)]) == 0
    return target
