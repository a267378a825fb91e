"""What the timing scripts in benchmarks/ share."""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
