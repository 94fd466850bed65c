"""Shared test setup: offline, fp32, two CPU threads, and tiny models built in code (never downloaded)."""

from __future__ import annotations

import os


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
