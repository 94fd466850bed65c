"""D-OPSD: on-policy self-distillation LoRA training for step-distilled diffusion models (arXiv 2605.05204).

`dopsd.config` and `dopsd.presets` import without torch; `train` and friends load it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


__version__ = "0.1.0"

if TYPE_CHECKING:
    from dopsd.callbacks import StepState, TrainerCallback, TrainerControl
    from dopsd.config import DOPSDConfig
    from dopsd.errors import TrainingCancelled
    from dopsd.trainer import TrainingResult, train

_LAZY = {
    "DOPSDConfig": "dopsd.config",
    "StepState": "dopsd.callbacks",
    "TrainerCallback": "dopsd.callbacks",
    "TrainerControl": "dopsd.callbacks",
    "TrainingCancelled": "dopsd.errors",
    "TrainingResult": "dopsd.trainer",
    "train": "dopsd.trainer",
}

__all__ = [
    *_LAZY,
    "__version__",
    "StepState",
    "TrainerCallback",
    "TrainerControl",
    "DOPSDConfig",
    "TrainingCancelled",
    "TrainingResult",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dopsd' has no attribute {name!r}")
