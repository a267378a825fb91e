"""Runs attacks against a defended model and turns them into per-sample correctness flags.

Batch semantics are the defense's: batches of the configured size in a fixed order, and each adversarial
batch is scored with one forward pass of `Defended.model` (the composition the attack optimised in the
adaptive protocol). Under the paper protocol the attack differentiates `Defended.surrogate` instead, and
the verdict is still `Defended.model`'s.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bench import state
from bench.api import Attack, Defended
from bench.data import Split

BUDGET_TOL = 1e-6


@dataclass
class CellResult:
    flags: np.ndarray  # per-sample: correct after the attack
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.flags.mean()) if self.flags.size else float("nan")


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
            from bench.projected_gradient import better, ce_loss

            wrong, loss = rows.argmax(1) != self.y[idx], ce_loss(rows.detach(), self.y[idx])
            delta = (x.detach() - self.anchor[idx]).flatten(1)
            size = delta.abs().amax(1) if self.norm == "Linf" else delta.norm(dim=1)
            inside = (size <= self.eps + BUDGET_TOL) & (x.detach().flatten(1).amin(1) >= 0) & \
                (x.detach().flatten(1).amax(1) <= 1)
            take = better(wrong, loss, self.best_wrong[idx], self.best_loss[idx]) & inside
            chosen = idx[take]
            self.best[chosen] = x.detach()[take]
            self.best_wrong[chosen] |= wrong[take]
            self.best_loss[chosen] = loss[take]
        return rows

    def finish(self, x_lib: torch.Tensor) -> torch.Tensor:
        """Per sample, the library's result or the best point queried, judged on full batches."""
        from bench.projected_gradient import best_of

        return best_of(self.model, self.y, [x_lib.detach(), self.best])


def monotone_assignment(cost) -> list[int]:
    """Increasing positions p_0 < p_1 < ... (one per row of `cost`, shape m x n, m <= n) minimising the
    summed cost: dynamic programming over (row, position) with a running prefix minimum."""
    import numpy as np

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


RANDOMIZED_REPEATS = 10


@torch.no_grad()
def verdict(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """Per-sample correctness from full-batch forwards: (repeats, batch). A randomized defense is asked
    `repeats` times; its flag is the majority, and the spread of the repeats is reported."""
    return torch.stack([model(x).argmax(1) == y for _ in range(repeats)])


def _combine(per_repeat: list[torch.Tensor]) -> tuple[np.ndarray, dict]:
    votes = torch.cat(per_repeat, dim=1).float()  # (repeats, n)
    flags = (votes.mean(0) > 0.5).cpu().numpy()
    if votes.shape[0] == 1:
        return flags, {}
    accs = votes.mean(1)
    return flags, {"repeats": int(votes.shape[0]), "acc_mean": float(accs.mean()), "acc_std": float(accs.std())}


def clean_cell(defended: Defended, split: Split, batch_size: int, device: torch.device,
               progress=None) -> CellResult:
    start = time.perf_counter()
    repeats = RANDOMIZED_REPEATS if defended.randomized else 1
    votes = []
    batches = split.batches(batch_size)
    if progress:
        batches = progress(batches, desc="clean", total=-(-len(split) // batch_size))
    for x, y in batches:
        votes.append(verdict(defended.model, x.to(device), y.to(device), repeats))
    flags, extra = _combine(votes)
    return CellResult(flags, time.perf_counter() - start, extra)


def perturbation_norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = delta.flatten(1)
    return flat.abs().amax(1), flat.norm(dim=1)


def _restore(watched: list, before: list, snapshots: list) -> list:
    """Undo any change an attack made to the watched models (so one misbehaving attack cannot poison the
    cells after it); returns the models that had changed."""
    changed = [m for m, d in zip(watched, before) if state.digest(m) != d]
    for m, (sd, saved_modes) in zip(watched, snapshots):
        if m in changed:
            m.load_state_dict(sd)
            state.restore_modes(m, saved_modes)
    return changed


def attack_cell(attack: Attack, defended: Defended, split: Split, *, batch_size: int,
                device: torch.device, protocol: str = "adaptive", progress=None, desc: str = "") -> CellResult:
    """Attack every batch of `split` and score it; record budget and state violations in `extra`."""
    target = defended.surrogate if (protocol == "paper" and defended.surrogate is not None) else defended.model
    watched = [defended.model] + ([target] if target is not defended.model else [])
    before = [state.digest(m) for m in watched]
    snapshots = [(copy.deepcopy(m.state_dict()), state.modes(m)) for m in watched]
    start = time.perf_counter()
    votes, linf, l2 = [], [], []
    repeats = RANDOMIZED_REPEATS if defended.randomized else 1
    outside = nonfinite = 0
    batches = split.batches(batch_size)
    if progress:
        batches = progress(batches, desc=desc or attack.name, total=-(-len(split) // batch_size))
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            x_adv = attack.perturb(target, x, y).detach()
            if x_adv.shape != x.shape:
                raise RuntimeError(f"attack {attack.name} returned shape {tuple(x_adv.shape)} for {tuple(x.shape)}")
            nonfinite += int((~torch.isfinite(x_adv)).flatten(1).any(1).sum())
            n_inf, n_2 = perturbation_norms(x_adv - x)
            size = n_inf if attack.norm == "Linf" else n_2
            out_of_box = (x_adv < -BUDGET_TOL).flatten(1).any(1) | (x_adv > 1 + BUDGET_TOL).flatten(1).any(1)
            outside += int(((size > attack.eps + BUDGET_TOL) | out_of_box).sum())
            linf.append(n_inf.cpu())
            l2.append(n_2.cpu())
            votes.append(verdict(defended.model, x_adv, y, repeats))
    except BaseException:  # an attack that raises mid-way must not leave the model changed for the next cells
        _restore(watched, before, snapshots)
        raise
    seconds = time.perf_counter() - start
    changed = _restore(watched, before, snapshots)
    linf_all, l2_all = torch.cat(linf), torch.cat(l2)
    extra = {
        "state_changed": bool(changed),
        "outside_budget": outside,
        "nonfinite": nonfinite,
        "max_linf": float(linf_all.max()) if len(linf_all) else 0.0,
        "max_l2": float(l2_all.max()) if len(l2_all) else 0.0,
        "median_l2": float(l2_all.median()) if len(l2_all) else 0.0,
    }
    extra.update(attack.extra())
    flags, spread = _combine(votes)
    extra.update(spread)
    return CellResult(flags, seconds, extra)
