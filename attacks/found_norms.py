"""The L2 norms of the unbounded perturbations a minimal-perturbation attack found (DeepFool, CW L2),
gathered over every batch it attacked: their median is such an attack's figure of merit, reported in
`extra()` beside the robust accuracy at the budget."""

from __future__ import annotations

import torch


class FoundNorms:
    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []

    def add(self, norms: torch.Tensor) -> None:
        self._parts.append(norms.detach().cpu())

    def summary(self, median_key: str, count_key: str) -> dict:
        norms = torch.cat(self._parts) if self._parts else torch.zeros(0)
        return {median_key: float(norms.median()) if len(norms) else None, count_key: int(len(norms))}
