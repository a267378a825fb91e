"""Runs attacks against a defended model and turns them into per-sample correctness flags.

Batch semantics are the defense's: batches of the configured size in a fixed order, and each adversarial
batch is scored with one forward pass of `Defended.model` (the composition the attack optimised in the
adaptive protocol). Under a paper protocol the attack differentiates a surrogate instead
(`Defended.attacked_under`), and the verdict is still `Defended.model`'s; images crafted on a surrogate
before (bench.crafted) are only scored again.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bench import state
from bench.composition import BUDGET_TOL, inside_budget, perturbation_size
from bench.contract import Attack, Defended
from bench.crafted import Crafted
from bench.data import Split

@dataclass
class CellResult:
    flags: np.ndarray  # per-sample: correct after the attack
    seconds: float
    extra: dict = field(default_factory=dict)
    adversarial: torch.Tensor | None = None  # the attacked images, on the CPU, when asked to keep them
    attack_extra: dict = field(default_factory=dict)  # the attack's own figures (Attack.extra()), in `extra` too

    @property
    def accuracy(self) -> float:
        return float(self.flags.mean()) if self.flags.size else float("nan")


RANDOMIZED_REPEATS = 10


class NonFiniteLogits(RuntimeError):
    """The defended model answered with NaN or infinite logits: its argmax (class 0 for NaN) is no prediction,
    so the cell fails rather than score it."""


def require_finite(logits: torch.Tensor, where: str = "of a batch", so: str = "the cell is not scored"
                   ) -> torch.Tensor:
    """`logits` (one row per image), or NonFiniteLogits naming how many rows hold NaN or inf, `where` they came
    from and what follows (`so`). The cells and the checks (bench.checks) judge a model's answers alike."""
    finite = torch.isfinite(logits).flatten(1).all(1)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteLogits(f"the defended model returned non-finite logits (NaN or inf) for {bad} of "
                              f"{len(logits)} images {where}; its predictions would mean nothing, so {so}")
    return logits


def _predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return require_finite(model(x)).argmax(1)


@torch.no_grad()
def verdict(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """Per-sample correctness from full-batch forwards: (repeats, batch). A randomized defense is asked
    `repeats` times; its flag is the majority, and the spread of the repeats is reported. Non-finite logits
    raise NonFiniteLogits."""
    return torch.stack([_predictions(model, x) == y for _ in range(repeats)])


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


def perturbation_norms(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample, the perturbation's size in every norm (stored with each cell, whatever its own norm)."""
    return {norm: perturbation_size(delta, norm) for norm in ("Linf", "L2", "L1")}


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
                device: torch.device, protocol: str = "adaptive", progress=None, desc: str = "",
                keep: bool = False, reuse: Crafted | None = None) -> CellResult:
    """Attack every batch of `split` and score it; record budget and state violations in `extra`. With
    `keep`, the adversarial images come back too (CellResult.adversarial). With `reuse`, the images an
    earlier run crafted on the same surrogate are scored instead of attacking again."""
    target = defended.attacked_under(protocol).model
    watched = [defended.model] + ([target] if target is not defended.model else [])
    before = [state.digest(m) for m in watched]
    snapshots = [(copy.deepcopy(m.state_dict()), state.modes(m)) for m in watched]
    start = time.perf_counter()
    votes, sizes, kept = [], [], []
    repeats = RANDOMIZED_REPEATS if defended.randomized else 1
    outside = nonfinite = 0
    batches = split.batches(batch_size)
    if progress:
        batches = progress(batches, desc=desc or attack.name, total=-(-len(split) // batch_size))
    offset = 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if reuse is None:
                x_adv = attack.perturb(target, x, y).detach()
            else:
                x_adv = reuse.x_adv[offset:offset + len(x)].to(device)
                offset += len(x)
            if x_adv.shape != x.shape:
                raise RuntimeError(f"attack {attack.name} returned shape {tuple(x_adv.shape)} for {tuple(x.shape)}")
            nonfinite += int((~torch.isfinite(x_adv)).flatten(1).any(1).sum())
            norms = perturbation_norms(x_adv - x)
            out_of_box = (x_adv < -BUDGET_TOL).flatten(1).any(1) | (x_adv > 1 + BUDGET_TOL).flatten(1).any(1)
            outside += int((~inside_budget(norms[attack.norm], attack.eps) | out_of_box).sum())
            sizes.append({k: v.cpu() for k, v in norms.items()})
            votes.append(verdict(defended.model, x_adv, y, repeats))
            if keep:
                kept.append(x_adv.cpu())
    except BaseException:  # an attack that raises mid-way must not leave the model changed for the next cells
        _restore(watched, before, snapshots)
        raise
    seconds = time.perf_counter() - start
    changed = _restore(watched, before, snapshots)
    linf_all, l2_all, l1_all = (torch.cat([s[norm] for s in sizes]) if sizes else torch.zeros(0)
                                for norm in ("Linf", "L2", "L1"))
    extra = {
        "state_changed": bool(changed) or bool(reuse is not None and reuse.state_changed),
        "outside_budget": outside,
        "nonfinite": nonfinite,
        "max_linf": float(linf_all.max()) if len(linf_all) else 0.0,
        "max_l2": float(l2_all.max()) if len(l2_all) else 0.0,
        "median_l2": float(l2_all.median()) if len(l2_all) else 0.0,
        "max_l1": float(l1_all.max()) if len(l1_all) else 0.0,
    }
    own = attack.extra() if reuse is None else reuse.extra
    extra.update(own)
    if reuse is not None:
        extra["crafted_by"] = {"run": reuse.run_id[:10], "seconds": reuse.seconds}
    flags, spread = _combine(votes)
    extra.update(spread)
    return CellResult(flags, seconds, extra, torch.cat(kept) if keep and kept else None, own)
