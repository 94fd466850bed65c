"""A fully fine-tuned transformer's change to its base, as a LoRA: for each layer the LoRA targets, the best rank-r
approximation of the weight's change (a truncated SVD, Eckart-Young), with alpha = r so the adapter adds exactly
that approximation. What the LoRA cannot hold (the rest of the spectrum, and every changed weight outside the
targets: norms, biases, embeddings) is measured, so a user knows how much of the fine-tune the adapter carries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ExtractedLora:
    """The extracted adapter's tensors (peft's un-prefixed names: `layers.0.attention.to_q.lora_A.weight`), its rank
    and target modules, and how much of the change it holds."""

    state: dict[str, torch.Tensor]
    rank: int
    target_modules: tuple[str, ...]
    layers: int
    relative_error: float  # ||change - LoRA|| / ||change|| over every weight of the transformer
    share_in_targets: float  # ||change in the target layers||^2 / ||change||^2

    def summary(self) -> dict[str, Any]:
        """What `metrics.json` says of the extraction."""
        return {
            "rank": self.rank,
            "layers": self.layers,
            "relative_error": self.relative_error,
            "share_of_change_in_targets": self.share_in_targets,
        }


def _targeted(name: str, targets: Sequence[str]) -> bool:
    """peft's rule: a module is a target when its name is one of `targets` or ends with `.` + one of them."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


@torch.no_grad()
def extract_lora(
    transformer: torch.nn.Module, base: Mapping[str, torch.Tensor], targets: Sequence[str], rank: int
) -> ExtractedLora:
    """The LoRA of rank `rank` (at most each layer's smaller side) that best holds the difference between the
    transformer's weights and `base` (its weights as loaded, by parameter name) on the `targets` linear layers."""
    state: dict[str, torch.Tensor] = {}
    residual = total = in_targets = 0.0
    layers = 0
    covered: set[str] = set()
    for name, module in transformer.named_modules():
        if not (isinstance(module, torch.nn.Linear) and _targeted(name, targets)):
            continue
        key = f"{name}.weight"
        change = module.weight.detach().float() - base[key].float()
        u, s, vh = torch.linalg.svd(change, full_matrices=False)
        r = min(rank, s.numel())
        state[f"{name}.lora_A.weight"] = vh[:r].contiguous()
        state[f"{name}.lora_B.weight"] = (u[:, :r] * s[:r]).contiguous()
        kept, all_ = float((s[:r] ** 2).sum()), float((s**2).sum())
        residual += all_ - kept
        in_targets += all_
        covered.add(key)
        layers += 1
    for name, p in transformer.named_parameters():
        change_sq = float((p.detach().float() - base[name].float()).pow(2).sum())
        total += change_sq
        if name not in covered:
            residual += change_sq
    if not layers:
        raise ValueError(f"no linear layer of the transformer matches the LoRA targets {list(targets)}")
    return ExtractedLora(
        state=state,
        rank=rank,
        target_modules=tuple(targets),
        layers=layers,
        relative_error=(residual / total) ** 0.5 if total else 0.0,
        share_in_targets=in_targets / total if total else 0.0,
    )
