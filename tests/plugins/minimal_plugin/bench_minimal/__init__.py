"""A minimal defense and two minimal attacks, written from the README's plugin section alone."""

import torch

from bench.api import Attack, Context, Defended, Defense


class MinimalDefense(Defense):
    """Minimal defense: the PGD-AT base model with its logits divided by a temperature."""

    def __init__(self, temperature: float = 2.0):
        self.temperature = temperature

    def build(self, ctx: Context) -> Defended:
        base = ctx.base("pgd_at")
        return Defended(model=Tempered(base, self.temperature).eval(), info={"temperature": self.temperature})


class Tempered(torch.nn.Module):
    def __init__(self, net, temperature):
        super().__init__()
        self.net, self.temperature = net, temperature

    def forward(self, x):
        return self.net(x) / self.temperature


def loss_gradient(model, x, y):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), x)
    return grad


class MinimalAttack(Attack):
    """Minimal L2 attack: one normalised gradient step of length eps (times overshoot)."""

    norm = "L2"

    def __init__(self, eps: float = 0.5, overshoot: float = 1.0, **kw):
        super().__init__(**kw)
        self.eps = eps
        self.overshoot = overshoot  # > 1 leaves the budget: the evaluator must notice

    def perturb(self, model, x, y):
        grad = loss_gradient(model, x, y)
        step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + self.overshoot * self.eps * step).clamp(0, 1).detach()


class MinimalSign(Attack):
    """Minimal L-inf attack: one signed gradient step of size eps (FGSM)."""

    norm = "Linf"
    eps = 0.05

    def perturb(self, model, x, y):
        return (x + self.eps * loss_gradient(model, x, y).sign()).clamp(0, 1).detach()
