"""A third-party plugin package whose plugins raise, used by tests/test_failures.py."""

from __future__ import annotations

import os

import torch

from bench.api import Attack, BenchError, Defended, Defense, Param


class FailingBuild(Defense):
    """Toy defense whose build raises (a missing weights file, say)."""

    def build(self, ctx):
        raise RuntimeError("no weights for this defense\nsecond line of the message")


class FailingModel(Defense):
    """Toy defense whose model raises on every forward (its inference needs a GPU kernel, say)."""

    def build(self, ctx):
        return Defended(model=_Raises().eval())


class _Raises(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("kernel not available")


class ReturnsNothing(Defense):
    """Toy defense whose build forgets to return its Defended."""

    def build(self, ctx):
        return None


class FailingPerturb(Attack):
    """Toy attack that changes the attacked model's weights, then raises on the first batch.

    With BENCH_FAULTY_FIXED set it works (the plugin's next release); with BENCH_FAULTY_INTERRUPT it
    raises KeyboardInterrupt (Ctrl-C during the attack)."""

    PARAMS = {"eps": Param(0.1, "budget", above=0, preset="eps")}

    def perturb(self, model, x, y):
        if os.environ.get("BENCH_FAULTY_FIXED"):  # the plugin's next release: works
            return x.clone()
        if os.environ.get("BENCH_FAULTY_INTERRUPT"):  # the user presses Ctrl-C during this attack
            raise KeyboardInterrupt
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        raise ValueError("perturb exploded")


class FailingSetup(Attack):
    """Toy attack whose setup raises a BenchError (at run time: a plugin failure, not a user error).

    With BENCH_FAULTY_FIXED set it works."""

    PARAMS = {"eps": Param(0.1, "budget", above=0, preset="eps")}

    def setup(self, ctx, defended):
        if not os.environ.get("BENCH_FAULTY_FIXED"):
            raise BenchError("setup needs a surrogate")

    def perturb(self, model, x, y):
        return x.clone()


def failing_report(rc):
    """A report plugin that raises on every leaderboard."""
    raise KeyError("no such table")
