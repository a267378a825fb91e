"""One training loop for every recipe: base models and every fine-tuning defense.

What varies is data in, not code: an `Objective` turns a batch into a loss (clean, PGD-AT, TRADES,
FGSM-RS, or a plugin's own), `trainable` picks the parameter subset, `frozen_stats` picks the BN layers
whose running statistics must not move, and `select` picks the checkpoint kept.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import data as data_mod
from bench.errors import BenchError
from bench.projected_gradient import kl_loss, pgd
from bench.state import eval_mode

# ----------------------------------------------------------------------------------------------------
# precision


@lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware runs it natively (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), else fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise BenchError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context that runs training forwards at `precision` ("bf16": autocast; else none)."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def configure_backends(device: torch.device) -> None:
    """Process-wide settings for a run on `device`. On a GPU, fp32 stays IEEE fp32: PyTorch's default runs
    fp32 convolutions in TF32 on Ampere and newer (a 10-bit mantissa), which would silently lower the
    precision of every reported attack; training asks for bf16 where it wants it (autocast). cuDNN
    autotuning picks the fastest algorithm per shape, at the same precision."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # pragma: no cover - older torch
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`, its 4-D weights in channels-last order: convolutions run faster on NHWC data on
    the CPU (oneDNN) and on tensor cores, and inputs in the usual NCHW order follow the weights' format
    after the first convolution. The values are the same; only their order in memory changes."""
    return model.to(device=device, memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------
# objectives


class Objective:
    """Turns a training batch into a scalar loss. Returns (loss, logits used for the running accuracy)."""

    name = "objective"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Clean(Objective):
    name = "clean"

    def loss(self, model, x, y, autocast):
        with autocast():
            logits = model(x)
        return F.cross_entropy(logits.float(), y), logits


@dataclass
class PGDAdversarial(Objective):
    """Train only on PGD examples (random start, last iterate).

    Madry PGD-AT crafts them with BN in eval mode; FGSM-RS (Wong et al. 2020) is the same with one step of
    1.25 eps, taken in the model's training mode as in the authors' code (`fgsm_rs`).
    """

    eps: float
    alpha: float
    steps: int = 10
    generator: torch.Generator | None = None
    craft_in_eval: bool = True
    name = "pgd_at"

    def loss(self, model, x, y, autocast):
        with eval_mode(model) if self.craft_in_eval else contextlib.nullcontext():
            x_adv = pgd(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                        generator=self.generator, track_best=False, autocast=autocast)
        with autocast():
            logits = model(x_adv)
        return F.cross_entropy(logits.float(), y), logits


def fgsm_rs(eps: float, generator: torch.Generator | None = None) -> PGDAdversarial:
    """Wong et al. 2020: delta ~ U(-eps, eps), one signed step of 1.25 eps (10/255 at 8/255), projected."""
    return PGDAdversarial(eps, 1.25 * eps, 1, generator, craft_in_eval=False)


@dataclass
class TRADES(Objective):
    """CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL from x + 0.001 N(0,1), BN eval."""

    eps: float
    step: float
    steps: int = 10
    beta: float = 6.0
    generator: torch.Generator | None = None
    name = "trades"

    def loss(self, model, x, y, autocast):
        with eval_mode(model):
            with torch.no_grad(), autocast():
                clean_eval = model(x)
            noise = torch.randn(x.shape, generator=self.generator).to(x.device)
            start = (x + 0.001 * noise).clamp(0, 1)
            x_adv = trades_attack(model, x, start, y, clean_eval, self.eps, self.step, self.steps, autocast)
        # Two forwards, as in the authors' code: one concatenated batch would mix the BN statistics.
        with autocast():
            clean, adv = model(x).float(), model(x_adv).float()
        kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
        return F.cross_entropy(clean, y) + self.beta * kl, clean

    @staticmethod
    def step_for(eps: float) -> float:
        """TRADES's step 0.007 at eps 8/255, scaled with eps for other budgets."""
        return 0.007 * eps / (8 / 255)


def trades_attack(model, x, start, y, clean_logits, eps, step, steps, autocast):
    """TRADES's inner maximisation: signed steps on KL(f(x) || f(x')) from `start` (x + 0.001 N(0,1)),
    projected onto the eps-ball around x and [0,1]."""
    loss = kl_loss(clean_logits)
    x_adv = start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast():
            values = loss(model(x_adv), y)
        grad, = torch.autograd.grad(values.sum(), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


# ----------------------------------------------------------------------------------------------------
# schedules


@dataclass(frozen=True)
class Schedule:
    """The learning-rate multiplier over a training run: cosine, step (x gamma at each milestone, a fraction
    of training), cyclic (triangular, FGSM-RS) or constant."""

    kind: str = "cosine"  # cosine | step | cyclic | constant
    milestones: tuple = (100 / 110, 105 / 110)  # fractions of training, for `step`
    gamma: float = 0.1

    def factor(self, progress: float) -> float:
        """LR multiplier at `progress` in [0, 1) of the whole run."""
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** sum(progress >= m for m in self.milestones)
        if self.kind == "cyclic":  # 0 -> max -> 0, triangular (FGSM-RS)
            return 1 - abs(2 * progress - 1)
        return 1.0


# ----------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainSpec:
    """The optimiser and data settings of one training run: SGD with momentum and weight decay, the LR
    schedule, augmentation (random crop with padding, horizontal flip) and which epoch's weights to keep."""

    epochs: int
    lr: float
    batch_size: int = 128
    schedule: Schedule = field(default_factory=Schedule)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_pad: int = 0
    flip: bool = False
    select: str = "last"  # last | max of a metric returned by `evaluate` (e.g. "val_robust")


def preset_spec(preset, *, epochs: int, lr: float, select: str = "last", schedule: Schedule | None = None,
                batch_size: int | None = None) -> TrainSpec:
    """The spec of a recipe that trains for `epochs` at `lr`, keeping the `select` epoch: the preset's SGD
    (momentum, weight decay) and augmentation (crop, flip), and its batch size and LR schedule unless the
    recipe has its own."""
    return TrainSpec(epochs=epochs, lr=lr, batch_size=preset.batch_size if batch_size is None else batch_size,
                     schedule=Schedule(preset.schedule) if schedule is None else schedule,
                     momentum=preset.momentum, weight_decay=preset.weight_decay, crop_pad=preset.crop_pad,
                     flip=preset.flip, select=select)


def finetune_spec(preset, *, epochs: int, lr: float, batch_size: int = 128, select: str = "last") -> TrainSpec:
    """RiFT step 4's optimiser, shared by every fine-tuning defense: the preset's (SGD momentum 0.9, wd
    5e-4, crop + flip) with lr x0.1 at half of the epochs (the code's MultiStepLR at epochs // 2)."""
    return preset_spec(preset, epochs=epochs, lr=lr, select=select, batch_size=batch_size,
                       schedule=Schedule("step", milestones=(0.5,)))


SYNC_EVERY = 25  # training steps between read-backs of the loss on a GPU


def resident(split: data_mod.Split, device: torch.device) -> data_mod.Split:
    """The training images on the GPU for the whole run when they take at most a quarter of its free memory
    (CIFAR-10: 0.6 GB), so batches and their augmentation never cross the bus; else left on the host."""
    if device.type != "cuda" or split.x.device == device:
        return split
    free, _ = torch.cuda.mem_get_info(device)
    needed = split.x.numel() * split.x.element_size() + split.y.numel() * split.y.element_size()
    return split.to(device) if needed <= free // 4 else split


def _check_finite(loss_sum: torch.Tensor, loss: torch.Tensor, desc: str, epoch: int, first: int, last: int,
                  lr: float) -> None:
    """Stop a diverged run: the epoch's running loss is not finite once any step's loss was not."""
    if math.isfinite(loss_sum.item()):
        return
    what = f"loss {loss.item()} at epoch {epoch}, step {last}" if first == last else \
        f"a non-finite loss at epoch {epoch}, steps {first}-{last}"
    raise BenchError(f"{desc}: training diverged ({what}, lr {lr:.3g}); lower the learning rate or use "
                     f"--precision fp32")


@dataclass
class TrainResult:
    history: list[dict]  # one dict per epoch: loss, train_acc, and whatever `evaluate` returned
    best_epoch: int
    seconds: float


def train(model: nn.Module, train_split: data_mod.Split, objective: Objective, spec: TrainSpec, *,
          device: torch.device, precision: str = "fp32", generator: torch.Generator | None = None,
          trainable: Iterable[nn.Parameter] | None = None, frozen_stats: Iterable[nn.Module] = (),
          evaluate: Callable[[nn.Module], dict] | None = None, progress=None,
          desc: str = "train", sync_every: int | None = None, compile: bool = False,
          resident_data: bool = True) -> TrainResult:
    """Train `trainable` (default: every parameter) of `model` in place; leave it in eval mode with the
    selected epoch's weights loaded.

    `frozen_stats`: BN modules kept in eval mode during training so their running statistics never move.
    `evaluate(model)` runs after each epoch (model in eval mode) and returns metrics for the history;
    `spec.select` names the metric whose maximum picks the kept epoch (ties: the earlier epoch).
    `sync_every`: steps between read-backs of the loss (default: 1 on the CPU, SYNC_EVERY on a GPU).
    `compile`: run the objective's forwards and backwards through `torch.compile(model)` (same weights).
    `resident_data`: keep the training images on a GPU for the run where they fit (`resident`); False leaves
    them on the host, every batch crossing the bus (what benchmarks/gpu.py measures the lever against).
    """
    params = list(model.parameters()) if trainable is None else list(trainable)
    if not params:
        raise BenchError(f"{desc}: no parameters selected for training")
    trainable_ids = {id(p) for p in params}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    frozen_stats = list(frozen_stats)
    opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    autocast = autocast_factory(precision, device)
    train_split = resident(train_split, device) if resident_data else train_split
    forward = torch.compile(model) if compile else model  # shares `model`'s parameters and buffers
    # A GPU runs ahead of Python until a value is read back: read the loss every SYNC_EVERY steps there, every
    # step on the CPU (where reading costs nothing and a divergence is named at its step).
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    steps_per_epoch = max(1, math.ceil(len(train_split) / spec.batch_size))
    total = spec.epochs * steps_per_epoch
    history: list[dict] = []
    best_state, best_epoch, best_value = None, 0, -math.inf
    start = time.perf_counter()
    bar = progress(range(total), desc=desc, total=total) if progress else None
    step = 0
    try:
        for epoch in range(1, spec.epochs + 1):
            model.train()
            for m in frozen_stats:
                m.eval()
            # on the device, in float64 as Python's floats were: no read-back per step
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen, read_at = 0, step
            for x, y in train_split.batches(spec.batch_size, shuffle=True, generator=generator,
                                            drop_single=True):
                x = data_mod.augment(x, spec.crop_pad, spec.flip, generator) if (spec.crop_pad or spec.flip) else x
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                lr = spec.lr * spec.schedule.factor(step / total)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss, logits = objective.loss(forward, x, y, autocast)
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                if (step + 1) % sync_every == 0:
                    _check_finite(loss_sum, loss, desc, epoch, read_at, step, lr)
                    read_at = step + 1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(y)
                step += 1
                if bar is not None:
                    bar.update(1)
                    if step == read_at:
                        bar.set_postfix(epoch=f"{epoch}/{spec.epochs}", loss=f"{loss.item():.3f}", refresh=False)
            if step != read_at:
                _check_finite(loss_sum, loss, desc, epoch, read_at, step - 1, lr)
            record = {"epoch": epoch, "loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
                      "lr": lr}
            model.eval()
            if evaluate is not None:
                record.update(evaluate(model))
            history.append(record)
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "epoch" and isinstance(v, float)})
            value = epoch if spec.select == "last" else record[spec.select]
            if value > best_value:
                best_value, best_epoch = value, epoch
                best_state = copy.deepcopy(model.state_dict()) if spec.select != "last" else None
    finally:
        if bar is not None:
            bar.close()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(history, best_epoch, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------
# evaluation helpers used during training


@torch.no_grad()
def accuracy(model: nn.Module, split: data_mod.Split, device: torch.device, batch_size: int = 256,
             autocast=contextlib.nullcontext) -> float:
    """Clean accuracy of `model` on `split`, as a fraction."""
    correct = 0
    for x, y in split.batches(batch_size):
        with autocast():
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    return correct / max(len(split), 1)


def robust_accuracy(model: nn.Module, split: data_mod.Split, device: torch.device, *, eps: float,
                    alpha: float, steps: int = 10, batch_size: int = 256, generator=None,
                    autocast=None) -> float:
    """PGD accuracy with the model in its current mode (BN eval for a trained model)."""
    correct = 0
    for x, y in split.batches(batch_size):
        x, y = x.to(device), y.to(device)
        x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, generator=generator, autocast=autocast)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == y).sum().item()
    return correct / max(len(split), 1)
