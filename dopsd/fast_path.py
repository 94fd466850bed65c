"""The GPU fast path's levers, each kept only where its measured ratio says so (docs/performance.md): torch.compile
of the transformer's repeated blocks, with a count of the graphs it makes, and the attention backend."""

from __future__ import annotations

from typing import Any

from dopsd.full_weights import full_weights_of
from dopsd.models.base import ModelFamily


COMPILE_RECOMPILE_LIMIT = 64  # compiled variants per block kind: adapters x grad mode x block kind, with room


def compile_blocks(family: ModelFamily, backend: str) -> None:
    """torch.compile of the repeated blocks of every transformer the roll-out runs (diffusers'
    `compile_repeated_blocks`: one compiled block reused by every block of its kind; dynamic shapes, so the buckets
    and the refiners' sequence lengths share one graph instead of one each). Each adapter, grad mode and block kind
    compiles once, in the first step; the limit of compiled variants per block is raised past what they need (from
    torch's 8, which Z-Image's variants exceed with static shapes), so none falls back to eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    full = full_weights_of(family.transformer)
    modules = [family.transformer] if full is None else [m for m in (full.student, full.teacher) if m is not None]
    for module in modules:
        module.compile_repeated_blocks(backend=backend, dynamic=True)  # type: ignore[operator]


class CompiledGraphs:
    """Counts the graphs torch.compile makes during training steps: all in the first step (every adapter and grad
    mode the roll-out uses), none after it, is the claim `metrics.json` checks."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.first_step = 0
        self.later_steps = 0
        self._before = 0

    @staticmethod
    def _graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def start(self) -> None:
        """Before a training step's roll-outs."""
        if self.enabled:
            self._before = self._graphs()

    def end(self, first: bool) -> None:
        """After the step's optimizer and EMA update; `first`: the first step this process trained."""
        if self.enabled:
            made = self._graphs() - self._before
            if first:
                self.first_step += made
            else:
                self.later_steps += made

    def summary(self, backend: str) -> dict[str, Any] | None:
        """What `metrics.json` says of compilation (None: not compiled)."""
        if not self.enabled:
            return None
        return {"backend": backend, "graphs_first_step": self.first_step, "graphs_later_steps": self.later_steps}


def set_attention_backend(family: ModelFamily, backend: str) -> None:
    """Runs the transformer's attention through one of diffusers' attention backends (`native`: torch's
    scaled_dot_product_attention; `flash`, `_native_cudnn`, `sage`, ... where installed and the card has them)."""
    family.transformer.set_attention_backend(backend)
