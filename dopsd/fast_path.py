"""The GPU fast path's levers, each kept only where its measured ratio says so (docs/performance.md): torch.compile
of the transformer's repeated blocks (with a count of the graphs it makes), the attention backend, and FP8 matmuls
of the frozen base."""

from __future__ import annotations

from typing import Any

import torch

from dopsd.errors import ModelLoadError
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


FP8_ATTRIBUTE = "_dopsd_fp8_linear"  # set on each converted layer: the plain nn.Linear it stands in for


def fp8_base_layers(transformer: torch.nn.Module, *, emulate: bool) -> int:
    """Runs the frozen base's linear layers in the transformer's blocks with FP8 matmuls (torchao's float8 training,
    dynamic tensorwise scaling): the base's weights take no gradient, so only the activations and the input
    gradients go through FP8, and the LoRA layers (and everything outside the blocks) stay as they are. `emulate`
    computes the FP8 rounding in higher precision (the CPU, the tests); a GPU needs compute capability 8.9 or
    more. Returns the number of layers converted; `restore_linear_layers` undoes it."""
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as exc:
        raise ModelLoadError("fp8_base needs torchao (pip install torchao)") from exc
    config = Float8LinearConfig(emulate=emulate)
    converted = 0
    for name, parent in list(transformer.named_modules()):
        for child_name, child in list(parent.named_children()):
            fqn = f"{name}.{child_name}" if name else child_name
            if not _fp8_candidate(fqn, child):
                continue
            assert isinstance(child, torch.nn.Linear)
            fp8 = Float8Linear.from_float(child, config=config)
            setattr(fp8, FP8_ATTRIBUTE, child)
            setattr(parent, child_name, fp8)
            converted += 1
    return converted


def _fp8_candidate(fqn: str, module: torch.nn.Module) -> bool:
    """A frozen base linear layer inside a block, of sizes FP8 matmuls take (multiples of 16)."""
    return (
        type(module) is torch.nn.Linear
        and "lora_" not in fqn
        and any(part.isdigit() for part in fqn.split("."))  # in a block list (`layers.3.attention.to_q`)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def restore_linear_layers(transformer: torch.nn.Module) -> int:
    """Puts back the plain linear layers `fp8_base_layers` replaced (sharing the same weights all along): a
    worker's cached model leaves an FP8 run as it came. Returns the number restored."""
    restored = 0
    for _, parent in list(transformer.named_modules()):
        for child_name, child in list(parent.named_children()):
            original = getattr(child, FP8_ATTRIBUTE, None)
            if isinstance(original, torch.nn.Linear):
                setattr(parent, child_name, original)
                restored += 1
    return restored
