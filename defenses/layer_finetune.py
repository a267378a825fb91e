"""Layer-type fine-tuning (the RiFT-with-BN paper's experiment 1): from theta_AT, fine-tune only BN layers,
only Conv/Linear layers, or everything, on clean data with RiFT's fine-tuning optimiser.

`info["curve"]` holds clean and PGD-10 accuracy before fine-tuning (epoch 0) and after every epoch, on
the validation split by default (`curve_split=test` gives the paper's test-set curves) -- the data of the
paper's figures 1 and 2. The kept model is the last epoch (`keep=best_clean`: the best clean epoch on the
curve split, as RiFT does).
"""

from __future__ import annotations

import copy

import torch.nn as nn

from bench.api import (Clean, Context, Defended, Defense, Param, accuracy, bn_modules, finetune_spec,
                       robust_accuracy, train, weight_modules)


class _LayerTypeFT(Defense):
    PARAMS = {
        "epochs": Param(10, "fine-tuning epochs, lr x0.1 at half", low=1, preset="ft_epochs"),
        "lr": Param(1e-3, "learning rate (SGD, momentum 0.9, wd 5e-4)", above=0, preset="ft_lr"),
        "batch_size": Param(128, "batch size", low=2),
        "curve_split": Param("val", "split of the per-epoch clean / PGD-10 curve", choices=("val", "test")),
        "keep": Param("last", "which epoch becomes the defended model", choices=("last", "best_clean")),
    }
    group = ""

    def groups(self, model: nn.Module):
        """(trainable parameters, BN modules whose running statistics stay frozen)."""
        raise NotImplementedError

    def build(self, ctx: Context) -> Defended:
        p = self.params
        model = copy.deepcopy(ctx.base("pgd_at")).eval()
        split = ctx.split(p.curve_split)
        pre = ctx.preset

        def evaluate(m: nn.Module) -> dict:
            return {"clean": accuracy(m, split, ctx.device, pre.eval_batch_size),
                    "pgd10": robust_accuracy(m, split, ctx.device, eps=pre.eps, alpha=pre.alpha, steps=10,
                                             batch_size=pre.eval_batch_size, generator=ctx.generator("ft:curve"))}

        trainable, frozen = self.groups(model)

        def run() -> dict:
            start = {"epoch": 0, **evaluate(model)}
            spec = finetune_spec(pre, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
                                 select="last" if p.keep == "last" else "clean")
            res = train(model, ctx.data.train, Clean(), spec, device=ctx.device, precision=ctx.precision,
                        generator=ctx.generator(f"ft:{self.group}"), trainable=trainable, frozen_stats=frozen,
                        evaluate=evaluate, progress=ctx.progress, desc=f"ft_{self.group}")
            curve = [start] + [{k: h[k] for k in ("epoch", "clean", "pgd10", "loss")} for h in res.history]
            return {"curve": curve, "kept_epoch": res.best_epoch, "seconds": res.seconds}

        identity = {"group": self.group, **{k: v for k, v in p.items()}}
        info = ctx.cached_model(f"ft_{self.group}", identity, model, run)
        info.update({"group": self.group, "curve_split": p.curve_split,
                     "trainable_parameters": sum(q.numel() for q in trainable)})
        return Defended(model=model.eval(), info=info)


class FTBN(_LayerTypeFT):
    """Fine-tune only BN layers (gamma, beta and running statistics) of the PGD-AT model on clean data."""

    group = "bn"

    def groups(self, model):
        return [q for _, m in bn_modules(model, self.name or "ft_bn") for q in m.parameters(recurse=False)], []


class FTConv(_LayerTypeFT):
    """Fine-tune only Conv/Linear layers of the PGD-AT model on clean data (BN frozen, statistics too)."""

    group = "conv"

    def groups(self, model):
        return ([q for _, m in weight_modules(model, self.name or "ft_conv") for q in m.parameters(recurse=False)],
                [m for _, m in bn_modules(model)])


class FTFull(_LayerTypeFT):
    """Fine-tune every layer of the PGD-AT model on clean data."""

    group = "full"

    def groups(self, model):
        return list(model.parameters()), []
