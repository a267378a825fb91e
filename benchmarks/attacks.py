"""Attack throughput on the mini preset, measured in one run.

    python benchmarks/attacks.py --data-dir ../shared/data/cifar10-mini [--results results] [--n 256]

Uses the cached mini PGD-AT base model from the results directory (train it with
`bench run --preset mini --defense pgd_at ...`); falls back to random weights with a warning.
Prints images/s per attack, our DeepFool against torchattacks' DeepFool on the same images (target: at
least 20x faster), our PGD-10 against torchattacks' PGD (target: at most 1.05x its time), and
AutoAttack's time per robust sample.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and `import attacks` would find this file
# instead of the attack plugins package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from bench import checkpoints, config, data, models  # noqa: E402
from bench.api import Defended  # noqa: E402
from bench.params import resolve_params  # noqa: E402
from bench.registry import load  # noqa: E402
from bench.train import to_device  # noqa: E402

ATTACKS = ["fgsm", "pgd10", "cw_inf", "pgd50", "deepfool", "cw_l2", "shaping", "square", "autoattack"]


class Ctx:
    def __init__(self, ds, seed=0):
        self.data, self.seed = ds, seed

    def generator(self, purpose):
        return torch.Generator().manual_seed(len(purpose))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--results", default="results", help="results directory holding cache/base/")
    ap.add_argument("--n", type=int, default=256, help="test images per attack")
    ap.add_argument("--skip", default="", help="comma-separated attacks to leave out")
    args = ap.parse_args()

    preset = config.concrete(config.get_preset("mini"), data.DATASETS["cifar10"])
    ds = data.load("cifar10", args.data_dir, n_val=preset.n_val, n_test=args.n)
    model = to_device(models.build_model(preset.arch, ds.spec), torch.device("cpu"))  # as a run builds it
    found = sorted(glob.glob(f"{args.results}/cache/base/cifar10-resnet20-pgd_at-*.pt"))
    if found:
        checkpoints.load_into(model, checkpoints.load(found[0], require_digest=True), found[0], arch="resnet20",
                              dataset="cifar10")
        print(f"model: {found[0]}")
    else:
        print("WARNING: no cached mini PGD-AT base found; random weights (attacks will look too easy)")
    model.eval()
    x, y = ds.test.x, ds.test.y
    n = len(x)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    print(f"resnet20, {n} CIFAR-10 test images, cpu fp32, clean accuracy {clean:.1%}\n")
    print(f"{'attack':<12}{'seconds':>10}{'images/s':>10}{'robust acc':>12}")
    seconds = {}
    skip = set(filter(None, args.skip.split(",")))
    for name in ATTACKS:
        if name in skip:
            continue
        cls = load("attack", name)
        attack = cls(**resolve_params(name, cls.PARAMS, {}, preset))
        attack.setup(Ctx(ds), Defended(model))
        x_adv, sec = timed(lambda: torch.cat([attack.perturb(model, x[i:i + 256], y[i:i + 256])
                                              for i in range(0, n, 256)]))
        with torch.no_grad():
            acc = (model(x_adv).argmax(1) == y).float()
        seconds[name] = (sec, acc)
        print(f"{name:<12}{sec:>10.1f}{n / sec:>10.1f}{acc.mean().item():>12.1%}")

    import torchattacks

    def median_time(fn, reps=3):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            _, sec = timed(fn)
            times.append(sec)
        return sorted(times)[len(times) // 2]

    def ours(name):
        cls = load("attack", name)
        attack = cls(**resolve_params(name, cls.PARAMS, {}, preset))
        attack.setup(Ctx(ds), Defended(model))
        return lambda: attack.perturb(model, x, y)

    print()
    if "pgd10" in seconds:  # interleaved repetitions after a warm-up: the per-attack table above is one cold pass
        ref = torchattacks.PGD(model, eps=preset.eps, alpha=preset.alpha, steps=10, random_start=True)
        t_ours, t_ref = median_time(ours("pgd10")), median_time(lambda: ref(x, y))
        print(f"PGD-10 (median of 3 after a warm-up): ours {t_ours:.2f}s, torchattacks {t_ref:.2f}s -> "
              f"ours / torchattacks = {t_ours / t_ref:.3f} (target <= 1.05)")
    if "deepfool" in seconds:
        ref = torchattacks.DeepFool(model, steps=50, overshoot=0.02)
        t_ours, t_ref = median_time(ours("deepfool")), median_time(lambda: ref(x, y), reps=1)
        print(f"DeepFool (same {n} images): ours {t_ours:.2f}s, torchattacks {t_ref:.1f}s -> ours is "
              f"{t_ref / t_ours:.1f}x faster (target >= 20x)")
    if "autoattack" in seconds:
        sec, acc = seconds["autoattack"]
        robust = int(acc.sum())
        print(f"AutoAttack: {sec:.1f}s for {n} images, {robust} robust -> {sec / max(robust, 1):.2f}s per robust "
              f"sample, {sec / n:.2f}s per image")


if __name__ == "__main__":
    main()
