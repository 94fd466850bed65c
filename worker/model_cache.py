"""Loaded base models kept in the worker process between jobs of the same preset, so only the first job of a
preset pays for loading the weights."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable

from dopsd.config import DOPSDConfig
from dopsd.models.base import ModelFamily
from dopsd.models.loading import load_family_for
from dopsd.trainer import resolve_device


class ModelCache:
    """An LRU of loaded `ModelFamily`s keyed by everything that shapes the weights."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, ModelFamily] = OrderedDict()

    def get(self, config: DOPSDConfig) -> tuple[ModelFamily, float, bool]:
        """The family for a resolved config, the seconds spent getting it, and whether it was cached."""
        start = time.perf_counter()
        device, dtype = resolve_device(config)
        key = (
            config.preset,
            config.pretrained_model_name_or_path,
            config.teacher_encoder_path,
            str(device),
            str(dtype),
            config.teacher_min_pixels,
            config.teacher_max_pixels,
            config.teacher_context,
        )
        family = self._entries.get(key)
        cached = family is not None
        if family is None:
            family = load_family_for(config, device=device, dtype=dtype)
            if self.capacity > 0:
                self._entries[key] = family
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return family, time.perf_counter() - start, cached
