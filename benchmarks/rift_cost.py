"""What RiFT costs, in PGD-AT epochs of the same model on the same data (mini preset), measured in one run.

    python benchmarks/rift_cost.py --data-dir ../shared/data/cifar10-mini [--results results] [--defense rift_bn]

Uses the cached mini PGD-AT base from the results directory (train it with `bench run --preset mini
--defense pgd_at ...`) and a fresh, temporary cache for everything else, so MRC, fine-tuning and the
alpha search are all computed; then times one PGD-AT epoch (PGD-10 crafting + SGD step, the base recipe)
of a copy of the base on the same training split. Prints each RiFT stage and the total as multiples of
that epoch, and how much of the MRC stage is the fixed adversarial set (crafted once, shared by every
candidate).
"""

from __future__ import annotations

import argparse
import copy
import glob
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench import config, data
from bench.api import Context
from bench.params import resolve_params
from bench.checkpoints import recipe_plan
from bench.registry import load
from bench.train import TrainSpec, resolve_precision, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--results", default="results", help="results directory holding cache/base/")
    ap.add_argument("--defense", default="rift", choices=["rift", "rift_bn"])
    args = ap.parse_args()

    preset = config.concrete(config.get_preset("mini"), data.DATASETS["cifar10"])
    ds = data.load("cifar10", args.data_dir, n_train=preset.n_train, n_val=preset.n_val, n_test=preset.n_test)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    bases = sorted(glob.glob(f"{args.results}/cache/base/cifar10-resnet20-pgd_at-*.pt"))
    if not bases:
        raise SystemExit(f"no cached mini PGD-AT base under {args.results}/cache/base; run bench run --preset mini first")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cache" / "base").mkdir(parents=True)
        for f in glob.glob(f"{args.results}/cache/base/cifar10-resnet20-pgd_at-*"):
            shutil.copy(f, Path(tmp) / "cache" / "base")
        ctx = Context(data=ds, arch=preset.arch, device=device, seed=0, preset=preset, cache_dir=Path(tmp) / "cache",
                      precision=precision, quiet=True)
        cls = load("defense", args.defense)
        defense = cls(**resolve_params(args.defense, cls.PARAMS, {}, preset))
        start = time.perf_counter()
        info = defense.build(ctx).info
        total = time.perf_counter() - start

        base = copy.deepcopy(ctx.base("pgd_at"))
        objective, spec, _ = recipe_plan("pgd_at", ctx)
        one_epoch = TrainSpec(**{**vars(spec), "epochs": 1, "select": "last"})
        epoch = train(base, ds.train, objective, one_epoch, device=device, precision=precision,
                      generator=torch.Generator().manual_seed(0)).seconds

    s = info["seconds"]
    n_cand = len(info["candidates"])
    print(f"{args.defense} on mini (ResNet-20, {len(ds.train)} training images, {defense.params.mrc_samples} MRC samples, "
          f"{n_cand} candidates x {defense.params.mrc_passes} passes), {precision} training, fp32 evaluation")
    print(f"one PGD-AT epoch of the same model and data: {epoch:.1f}s")
    for stage in ("mrc", "finetune", "alpha_search"):
        print(f"  {stage:<13} {s[stage]:7.1f}s = {s[stage] / epoch:5.2f} PGD-AT epochs")
    print(f"  {'total build':<13} {total:7.1f}s = {total / epoch:5.2f} PGD-AT epochs "
          f"(includes loading the base and recording BN outputs)")
    print(f"  MRC per candidate: {s['mrc'] / n_cand:.1f}s; the fixed adversarial set is crafted once for all")


if __name__ == "__main__":
    main()
