"""Fragile features and BN (Walter, Stutz, Schiele, arXiv 2204.12393): how much robustness lives in BN.

- `bn_stats`: a `standard` model whose BN running statistics are re-estimated on PGD examples of the
  current model: each pass crafts examples against the model as it was at the start of the pass and
  replaces the statistics with their cumulative average over that pass. No gradient step.
- `bn_params`: a `standard` model with Conv/Linear frozen; PGD-AT of the BN affine parameters (running
  statistics update as in training).
- `adv_bn_only`: randomly initialised, frozen Conv/Linear; PGD-AT of the BN parameters from scratch.
- `extra=logits,conv1` (the paper's "+log +conv1"): also train the last Linear and/or the first conv.

PGD-AT here is the harness's `pgd_at` recipe (PGD-10 crafted with BN in eval mode, SGD, the preset's
`epochs_pgd_at` and learning rate), keeping the epoch with the best PGD-10 accuracy on validation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from bench.api import (Context, Defended, Defense, PGDAdversarial, Param, accuracy, autocast_factory, bn_modules,
                       derived_seed, pgd, preset_spec, robust_accuracy, train, weight_modules)


EXTRA = Param((), "also train: logits (the last Linear), conv1 (the first conv)", kind=tuple, item=str,
              choices=("logits", "conv1"))


def _extra_parameters(model: nn.Module, extra) -> list[nn.Parameter]:
    weights = weight_modules(model)
    out = []
    if "logits" in extra:
        out += list(next(m for _, m in reversed(weights) if isinstance(m, nn.Linear)).parameters(recurse=False))
    if "conv1" in extra:
        out += list(next(m for _, m in weights if isinstance(m, nn.Conv2d)).parameters(recurse=False))
    return out


class BNStats(Defense):
    """Walter et al.: a standard model with BN statistics re-estimated on its PGD examples (no training)."""

    PARAMS = {"passes": Param(5, "re-estimation passes over the training set", low=1, preset="ft_epochs")}

    def build(self, ctx: Context) -> Defended:
        model = copy.deepcopy(ctx.base("standard")).eval()

        def run() -> dict:
            history = []
            pre = ctx.preset
            gen = ctx.generator("bn_stats:pgd")
            bn_modules(model, self.name or "bn_stats")  # a model without BN has no statistics to re-estimate
            for step in ctx.progress(range(self.params.passes), desc="bn_stats"):
                crafter = copy.deepcopy(model).eval()  # the statistics of the previous pass craft this one's
                for _, m in bn_modules(model):
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the pass
                for x, y in ctx.data.train.batches(pre.batch_size, drop_single=True):
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    x_adv = pgd(crafter, x, y, eps=pre.eps, alpha=pre.alpha, steps=pre.pgd_steps, generator=gen,
                                track_best=False, autocast=autocast_factory(ctx.precision, ctx.device))
                    model.train()
                    with torch.no_grad():
                        model(x_adv)
                    model.eval()
                history.append({"pass": step + 1, "val_clean": accuracy(model, ctx.data.val, ctx.device)})
            for _, m in bn_modules(model):
                m.momentum = 0.1
            return {"history": history}

        info = ctx.cached_model("bn_stats", dict(self.params), model, run)
        return Defended(model=model.eval(), info=info)


class _BNAdversarialTraining(Defense):
    PARAMS = {
        "extra": EXTRA,
        "epochs": Param(110, "PGD-AT epochs", low=1, preset="epochs_pgd_at"),
        "lr": Param(0.1, "learning rate", above=0, preset="lr"),
    }
    start = ""

    def initial(self, ctx: Context) -> nn.Module:
        raise NotImplementedError

    def build(self, ctx: Context) -> Defended:
        p, pre = self.params, ctx.preset
        model = self.initial(ctx)
        trainable = [q for _, m in bn_modules(model, self.name or self.start) for q in m.parameters(recurse=False)]
        trainable += _extra_parameters(model, p.extra)
        autocast = autocast_factory(ctx.precision, ctx.device)
        val_robust = ctx.data.val.subset(slice(0, pre.n_val_robust))

        def evaluate(m):
            return {"val_clean": accuracy(m, ctx.data.val, ctx.device, autocast=autocast),
                    "val_robust": robust_accuracy(m, val_robust, ctx.device, eps=pre.eps, alpha=pre.alpha,
                                                  steps=pre.pgd_steps, autocast=autocast,
                                                  generator=ctx.generator(f"{self.name}:val-pgd"))}

        def run() -> dict:
            spec = preset_spec(pre, epochs=p.epochs, lr=p.lr, select="val_robust")
            objective = PGDAdversarial(pre.eps, pre.alpha, pre.pgd_steps, ctx.generator(f"{self.name}:attack"))
            res = train(model, ctx.data.train, objective, spec, device=ctx.device, precision=ctx.precision,
                        generator=ctx.generator(f"{self.name}:data"), trainable=trainable, evaluate=evaluate,
                        progress=ctx.progress, desc=self.name or self.start)
            return {"history": res.history, "best_epoch": res.best_epoch, "seconds": res.seconds}

        info = ctx.cached_model(self.start, {**dict(p), "start": self.start}, model, run)
        info.update({"start": self.start, "extra": list(p.extra),
                     "trainable_parameters": sum(q.numel() for q in trainable)})
        return Defended(model=model.eval(), info=info)


class BNParams(_BNAdversarialTraining):
    """Walter et al.: PGD-AT of only the BN parameters (and statistics) of a standard model."""

    start = "bn_params"

    def initial(self, ctx: Context) -> nn.Module:
        return copy.deepcopy(ctx.base("standard"))


class AdvBNOnly(_BNAdversarialTraining):
    """Walter et al.: PGD-AT of only the BN parameters on top of random, frozen Conv/Linear weights."""

    start = "adv_bn_only"

    def initial(self, ctx: Context) -> nn.Module:
        torch.manual_seed(derived_seed(ctx.seed, "adv_bn_only", "init"))
        return ctx.build_model()
