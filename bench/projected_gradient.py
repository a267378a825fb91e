"""Projected gradient descent, shared by adversarial training, validation and the PGD-family attacks.

One loop serves every use: L-inf or L2 (L1 attacks use pyautoattack's APGD), CE / CW-margin / any per-sample loss, restarts, and best-iterate
tracking. Each step costs exactly one forward and one input-gradient backward; the best iterate is read
off the logits that the step computes anyway, so tracking adds only one forward for the last iterate.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-sample loss


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy, in fp32 whatever the logits' precision."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def cw_loss(kappa: float = 50.0) -> Loss:
    """CW margin loss as used by AT papers' CW-inf: -max(z_y - max_{j!=y} z_j + kappa, 0)."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        real = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        return -torch.clamp(real - other + kappa, min=0.0)

    return loss


def kl_loss(clean_logits: torch.Tensor) -> Loss:
    """KL(f(x) || f(x')) per sample, TRADES's inner maximisation."""
    target = F.softmax(clean_logits.float(), dim=1)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="none").sum(1)

    return loss


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the (norm, eps) ball around x, then onto [0,1]. L1 is scaled back radially, which is not
    the Euclidean projection (that needs pyautoattack's L1_projection) but keeps a point of the box inside
    both: what pulls a library's result back onto its budget."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "L2":
        delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
    else:
        size = delta.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))
        delta = delta * (eps / size).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "Linf":
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
        return (x + eps * noise).clamp(0.0, 1.0)
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    radius = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype).to(x.device)
    direction = direction / _per_sample_norm(direction)
    return project(x + direction * eps * radius.view(-1, *([1] * (x.dim() - 1))), x, eps, norm)


def better(wrong: torch.Tensor, loss: torch.Tensor, best_wrong: torch.Tensor, best_loss: torch.Tensor) -> torch.Tensor:
    """Per sample: is the new candidate better than the best so far? Misclassified beats correct, then
    higher loss."""
    return (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))


@torch.no_grad()
def best_of(model: torch.nn.Module, y: torch.Tensor, candidates: list[torch.Tensor],
            loss: Loss = ce_loss) -> torch.Tensor:
    """Per sample, the candidate batch entry the model gets wrong (else with the higher loss), each
    candidate judged by one forward of its full batch (the composition a batch-dependent defense sees)."""
    best = candidates[0]
    logits = model(best)
    best_wrong, best_loss = logits.argmax(1) != y, loss(logits, y)
    for cand in candidates[1:]:
        logits = model(cand)
        wrong, values = logits.argmax(1) != y, loss(logits, y)
        take = better(wrong, values, best_wrong, best_loss)
        best = torch.where(take.view(-1, *([1] * (cand.dim() - 1))), cand, best)
        best_wrong, best_loss = best_wrong | wrong, torch.where(take, values, best_loss)
    return best


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
        steps: int, norm: str = "Linf", loss: Loss = ce_loss, restarts: int = 1, rand_init: bool = True,
        generator: torch.Generator | None = None, track_best: bool = True, eot: int = 1,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Maximise `loss` within the (norm, eps) ball intersected with [0,1].

    With `track_best` the returned batch holds, per sample, the best iterate over all steps and restarts
    (misclassified beats correct, then higher loss); without it, the last iterate of the last restart
    (what Madry-style training uses). `eot` > 1 averages the gradient over that many forward passes
    (expectation over transformation, for randomized defenses).
    """
    x = x.detach()
    autocast = autocast or contextlib.nullcontext
    best = x.clone()
    best_wrong = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    best_loss = torch.full((len(x),), float("-inf"), device=x.device)

    def keep(candidate, logits, values):
        nonlocal best, best_wrong, best_loss
        wrong = logits.argmax(1) != y
        take = better(wrong, values, best_wrong, best_loss)
        best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), candidate, best)
        best_wrong = best_wrong | wrong
        best_loss = torch.where(take, values, best_loss)

    x_adv = x
    for _ in range(restarts):
        x_adv = random_start(x, eps, norm, generator) if rand_init else x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            grad = torch.zeros_like(x_adv)
            for draw in range(eot):
                with autocast():
                    out = model(x_adv)
                draw_values = loss(out, y)
                grad += torch.autograd.grad(draw_values.sum(), x_adv)[0]
                if draw == 0:
                    logits, values = out, draw_values
            x_adv = x_adv.detach()
            if track_best:
                keep(x_adv, logits.detach(), values.detach())
            if norm == "Linf":
                x_adv = x_adv + alpha * grad.sign()
            else:
                x_adv = x_adv + alpha * grad / _per_sample_norm(grad)
            x_adv = project(x_adv, x, eps, norm)
        if track_best:
            with torch.no_grad(), autocast():
                logits = model(x_adv)
            keep(x_adv, logits, loss(logits, y))
    return best if track_best else x_adv.detach()
