"""Norm shaping (Zhang & Ma, ICTAI 2022): adversarial training and inference in mixed clean/adversarial
batches, where BN normalises with the batch's statistics.

Training (from scratch, the `pgd_at` budget): each minibatch is split into `train_ratio` + 1 equal parts;
the last part is attacked with PGD that runs through the *whole mixed batch* in train-mode BN (batch
statistics of clean + adversarial, no running-statistics update while crafting), gradients only w.r.t.
the attacked part; then one CE step on the mixed batch. `base_loss=trades` replaces that step by
CE(clean batch) + 6 KL(f(x_a) || f(x'_a)) with the adversarial logits taken inside the mixed batch, and
the attack maximises that KL. The last epoch is kept (decision: selecting on robust accuracy would need
the adaptive batch-dependent attack inside training).

Inference: each chunk of m test samples is concatenated after `infer_ratio` * m clean training samples
(drawn once per run from the run seed), run with BN on batch statistics and no buffer update; only the
test part's logits are returned, so predictions depend on the batch (`batch_dependent=True`).

Surrogates for the paper protocol (`--protocol paper:NAME`), all of the one trained network: `eval`, the
default, is it in eval mode (the population statistics training accumulated: the slides' non-adaptive
attacks on "PNs"); `test_batch` normalises with the attacked test batch's own statistics (what inference at
1:0 computes); `init_stats` is eval mode with the statistics as BN initialises them (mean 0, variance 1), as
in a checkpoint whose training never updated them (a known failure of some training code). None depends on
`infer_ratio`, so a ratio grid crafts each of their cells once (bench.crafted).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.api import (Context, Defended, Defense, Objective, Param, Surrogate, TRADES, batch_statistics, bn_modules,
                       derived_seed, pgd, preset_spec, trades_attack, train)


class NormShapedModel(nn.Module):
    """The inference procedure: [shaping samples ; test chunk] through batch-statistics BN."""

    def __init__(self, net: nn.Module, shaping: torch.Tensor, ratio: int) -> None:
        super().__init__()
        self.net = net
        self.ratio = ratio
        self.register_buffer("shaping", shaping, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context(len(x))
        with batch_statistics(self.net):
            return self.net(torch.cat([context, x]))[len(context):]

    def context(self, m: int) -> torch.Tensor:
        """The ratio * m shaping samples that accompany a chunk of m test samples (cycled if needed)."""
        need = self.ratio * m
        if need == 0:
            return self.shaping[:0]
        reps = -(-need // len(self.shaping))
        pool = self.shaping if reps == 1 else self.shaping.repeat(reps, 1, 1, 1)
        return pool[:need]

    def with_shaping(self, shaping: torch.Tensor) -> "NormShapedModel":
        """The same network with other shaping samples (an attacker who knows the data, not the samples)."""
        return NormShapedModel(self.net, shaping.to(self.shaping.device), self.ratio)


class _MixedForward(nn.Module):
    """f(x_a) = net([clean parts ; x_a]) restricted to the attacked part, BN on batch statistics."""

    def __init__(self, net: nn.Module, clean: torch.Tensor) -> None:
        super().__init__()
        self.net, self.clean = net, clean

    def forward(self, x_attacked: torch.Tensor) -> torch.Tensor:
        with batch_statistics(self.net):
            return self.net(torch.cat([self.clean, x_attacked]))[len(self.clean):]


class NormShapingObjective(Objective):
    name = "norm_shaping"

    def __init__(self, eps: float, alpha: float, steps: int, ratio: int, base_loss: str, generator) -> None:
        self.eps, self.alpha, self.steps, self.ratio = eps, alpha, steps, ratio
        self.base_loss, self.generator = base_loss, generator

    def loss(self, model, x, y, autocast):
        part = len(x) // (self.ratio + 1)
        cut = len(x) - max(part, 1)
        clean, attacked, y_att = x[:cut], x[cut:], y[cut:]
        mixed = _MixedForward(model, clean)
        if self.base_loss == "pgd":
            x_adv = pgd(mixed, attacked, y_att, eps=self.eps, alpha=self.alpha, steps=self.steps,
                        generator=self.generator, track_best=False, autocast=autocast)
            with autocast():
                logits = model(torch.cat([clean, x_adv]))
            return F.cross_entropy(logits.float(), y), logits
        # TRADES variant: KL between the attacked part's clean logits and its logits inside the mixed batch
        with torch.no_grad(), autocast(), batch_statistics(model):
            target = model(x)[cut:].float()
        start = (attacked + 0.001 * torch.randn(attacked.shape, generator=self.generator).to(x.device)).clamp(0, 1)
        x_adv = trades_attack(mixed, attacked, start, y_att, target, self.eps, TRADES.step_for(self.eps),
                              self.steps, autocast)
        with autocast():
            natural = model(x).float()
            adv = model(torch.cat([clean, x_adv])).float()[cut:]
        kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(natural[cut:], 1), reduction="batchmean")
        return F.cross_entropy(natural, y) + 6.0 * kl, natural


class NormShaping(Defense):
    """Norm shaping: AT on mixed clean/adversarial batches; inference with fixed clean shaping samples."""

    PARAMS = {
        "train_ratio": Param(3, "n clean parts per attacked part in training batches", low=0),
        "infer_ratio": Param(3, "shaping samples per test sample at inference (table IV: 0,1,3,9,19,49); an "
                                "inference batch holds eval_batch_size x (1 + ratio) images, and adaptive attacks "
                                "backpropagate through all of them (ResNet-20: about 2 MB each)", low=0),
        "base_loss": Param("pgd", "adversarial loss of training", choices=("pgd", "trades")),
        "epochs": Param(110, "training epochs", low=1, preset="epochs_pgd_at"),
        "lr": Param(0.1, "learning rate", above=0, preset="lr"),
    }
    SURROGATES = {
        "eval": "the network in eval mode: BN normalises with the population statistics of training (the "
                "slides' non-adaptive attacks)",
        "test_batch": "the network normalising with the attacked test batch's own statistics (inference at 1:0)",
        "init_stats": "the network in eval mode with BN statistics as initialised (mean 0, variance 1): a "
                      "checkpoint that never updated them",
    }

    def build(self, ctx: Context) -> Defended:
        p, pre = self.params, ctx.preset
        torch.manual_seed(derived_seed(ctx.seed, "norm_shaping", "init"))
        net = ctx.build_model()
        bn_modules(net, self.name or "norm_shaping")  # it shapes BN's batch statistics: a model needs some

        def run() -> dict:
            spec = preset_spec(pre, epochs=p.epochs, lr=p.lr, select="last")
            objective = NormShapingObjective(pre.eps, pre.alpha, pre.pgd_steps, p.train_ratio, p.base_loss,
                                             ctx.generator("norm_shaping:attack"))
            res = train(net, ctx.data.train, objective, spec, device=ctx.device, precision=ctx.precision,
                        generator=ctx.generator("norm_shaping:data"), progress=ctx.progress, desc="norm_shaping")
            return {"history": res.history, "seconds": res.seconds}

        identity = {"train_ratio": p.train_ratio, "base_loss": p.base_loss, "epochs": p.epochs, "lr": p.lr}
        info = ctx.cached_model("norm_shaping", identity, net, run)
        net.eval()
        pool = p.infer_ratio * pre.eval_batch_size
        gen = ctx.generator("norm_shaping:shaping-samples")
        idx = torch.randperm(len(ctx.data.train), generator=gen)[:pool]
        shaping = ctx.data.train.x[idx].to(ctx.device)
        model = NormShapedModel(net, shaping, p.infer_ratio).eval()
        info.update({"train_ratio": p.train_ratio, "infer_ratio": p.infer_ratio, "shaping_samples": len(idx),
                     "shaping_indices_head": idx[:10].tolist()})
        # each prediction runs the network on the test image and its infer_ratio shaping images: 1 + ratio
        # images' forward computation per test image, as RobustBench counts passes
        never_updated = copy.deepcopy(net).eval()
        for _, bn in bn_modules(never_updated):
            bn.reset_running_stats()
        surrogates = {"test_batch": Surrogate(NormShapedModel(net, shaping[:0], 0).eval(), batch_dependent=True),
                      "init_stats": Surrogate(never_updated)}
        return Defended(model=model, surrogate=net, batch_dependent=True, info=info,
                        forward_passes=1 + p.infer_ratio, surrogates=surrogates)
