"""A batch-dependent model seen through the evaluator's whole batch, for attack libraries that re-batch
survivors (`composed`, `finish`). Part of the plugin contract's bottom layer: it imports only torch and
the attack primitives."""

from __future__ import annotations

import numpy as np
import torch

from bench.projected_gradient import best_of, better, ce_loss

BUDGET_TOL = 1e-6  # how far outside its budget an adversarial example may lie (float rounding), relative
# to budgets above 1 (an L1 norm sums thousands of float32 terms: its rounding grows with the budget)
NORMS = ("Linf", "L2", "L1")  # the threat models an attack may declare


def perturbation_size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per sample, the `norm` of a batch of perturbations."""
    flat = delta.flatten(1)
    if norm == "Linf":
        return flat.abs().amax(1)
    return flat.norm(dim=1) if norm == "L2" else flat.abs().sum(1)


def inside_budget(size: torch.Tensor, eps: float) -> torch.Tensor:
    """Per sample: is a perturbation of this size within the budget eps (up to float rounding)?"""
    return size <= eps + BUDGET_TOL * max(1.0, eps)


class BatchComposition(torch.nn.Module):
    """A batch-dependent model seen through the evaluator's whole batch.

    Attack libraries (AutoAttack, torchattacks' Square) call the model on subsets of the batch
    (survivors, not-yet-fooled indices). For a batch-dependent defense that attacks -- and scores -- a
    composition the defense never uses. Every call is therefore placed back into the full batch: each
    queried row goes to the position of the batch sample it perturbs (nearest clean image), the other
    positions hold the latest state queried for them (clean at first; AutoAttack ends every stage by
    querying its final adversarial examples), and only the queried rows' logits return.

    It also keeps, per sample, the best point queried inside the threat model (misclassified in its
    composition beats correct, then higher loss): a library that decides "fooled" on its own sub-batches
    returns clean images for samples it wrongly thinks robust, and `finish` recovers them. Queries outside
    (norm, eps) or [0,1] -- FAB's intermediate points, say -- are never kept.
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> None:
        super().__init__()
        self.model = model
        self.anchor = x.detach()
        self.y = y
        self.norm, self.eps = norm, eps
        self.current = x.detach().clone()
        self.anchor_sq = self.anchor.flatten(1).pow(2).sum(1)
        self.best = x.detach().clone()
        self.best_wrong = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.best_loss = torch.full((len(x),), float("-inf"), device=x.device)
        self.sizes: list[int] = []

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """Which batch sample each queried row perturbs: its nearest clean image, or -- when that is
        ambiguous (large budgets) -- the order-preserving assignment of least total distance: every library
        used here passes survivors as x[sorted indices], an increasing subsequence of the batch."""
        flat = x.detach().flatten(1)
        dist = (flat.pow(2).sum(1, keepdim=True) + self.anchor_sq[None] - 2 * flat @ self.anchor.flatten(1).T)
        idx = dist.argmin(1)
        if len(torch.unique(idx)) == len(idx):
            return idx
        return torch.as_tensor(monotone_assignment(dist.clamp_min(0).sqrt().cpu().double().numpy()), device=x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.positions(x)
        full = torch.index_put(self.current, (idx,), x)
        self.current = full.detach().clone()
        self.sizes.append(full.shape[0])
        out = self.model(full)
        rows = out[idx]
        with torch.no_grad():
            wrong, loss = rows.argmax(1) != self.y[idx], ce_loss(rows.detach(), self.y[idx])
            size = perturbation_size(x.detach() - self.anchor[idx], self.norm)
            inside = inside_budget(size, self.eps) & (x.detach().flatten(1).amin(1) >= 0) & \
                (x.detach().flatten(1).amax(1) <= 1)
            take = better(wrong, loss, self.best_wrong[idx], self.best_loss[idx]) & inside
            chosen = idx[take]
            self.best[chosen] = x.detach()[take]
            self.best_wrong[chosen] |= wrong[take]
            self.best_loss[chosen] = loss[take]
        return rows

    def finish(self, x_lib: torch.Tensor) -> torch.Tensor:
        """Per sample, the library's result or the best point queried, judged on full batches."""
        return best_of(self.model, self.y, [x_lib.detach(), self.best])


def monotone_assignment(cost) -> list[int]:
    """Increasing positions p_0 < p_1 < ... (one per row of `cost`, shape m x n, m <= n) minimising the
    summed cost: dynamic programming over (row, position) with a running prefix minimum."""
    m, n = cost.shape
    if m > n:
        raise RuntimeError(f"batch composition: {m} queried rows for a batch of {n}")
    best = np.full((m, n), np.inf)
    back = np.zeros((m, n), dtype=np.int64)
    best[0] = cost[0]
    for i in range(1, m):
        prev = np.concatenate([[np.inf], best[i - 1][:-1]])  # row i-1 must sit strictly left of j
        arg = np.zeros(n, dtype=np.int64)
        run, run_arg = np.inf, 0
        for j in range(n):
            if prev[j] < run:
                run, run_arg = prev[j], j - 1
            arg[j] = run_arg
            best[i, j] = cost[i, j] + run
        back[i] = arg
    out = [int(np.argmin(best[m - 1]))]
    for i in range(m - 1, 0, -1):
        out.append(int(back[i, out[-1]]))
    return out[::-1]


def composed(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_dependent: bool, norm: str = "Linf",
             eps: float = 1.0) -> torch.nn.Module:
    """What to hand an attack library for batch (x, y): the model itself, or for a batch-dependent target
    the model seen through the whole batch (keeping the best query inside (norm, eps))."""
    return BatchComposition(model, x, y, norm, eps) if batch_dependent else model


def finish(wrapped: torch.nn.Module, x_lib: torch.Tensor) -> torch.Tensor:
    """The attack's result: for a batch composition, recover the best queried points."""
    return wrapped.finish(x_lib) if isinstance(wrapped, BatchComposition) else x_lib.detach()
