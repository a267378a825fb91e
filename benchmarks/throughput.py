"""Images per second of PGD-AT training and of PGD-10 evaluation, for one architecture on one device.

    python benchmarks/throughput.py --data-dir ../shared/data/cifar10-mini [--arch resnet18] [--device cuda]
        [--train-images 1024] [--eval-images 512]

The issue-6 comparison: run it once on the CPU and once on a GPU, same arguments, and divide. Both numbers
come from the harness's own code paths: `bench.train.train` with the `pgd_at` base recipe of the `mini`
preset (PGD-10 crafting in train mode + one SGD step per batch, bf16 autocast where the device supports it)
and `bench.projected_gradient.pgd` in fp32 on the eval-mode model, as evaluation runs it. A short untimed
warm-up comes first (cuDNN autotuning, allocator growth), so the timed figures are the steady state.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench import config, data, models
from bench.api import Context
from bench.checkpoints import recipe_plan
from bench.projected_gradient import pgd
from bench.train import TrainSpec, resolve_precision, to_device, train
from timing import sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", help="training precision: auto, bf16 or fp32")
    ap.add_argument("--train-images", type=int, default=1024, help="training images in the timed epoch")
    ap.add_argument("--eval-images", type=int, default=512, help="test images attacked by the timed PGD-10")
    args = ap.parse_args()

    device = torch.device(args.device)
    preset = config.concrete(config.get_preset("mini"), data.DATASETS["cifar10"])
    ds = data.load("cifar10", args.data_dir, n_train=preset.n_train, n_val=preset.n_val, n_test=preset.n_test)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    model = to_device(models.build_model(args.arch, ds.spec), device)  # as a run builds it

    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(data=ds, arch=args.arch, device=device, seed=0, preset=preset, cache_dir=tmp,
                      precision=precision, quiet=True)
        objective, spec, _ = recipe_plan("pgd_at", ctx)
    n_train = min(args.train_images, len(ds.train))
    epoch = TrainSpec(**{**vars(spec), "epochs": 1, "select": "last"})
    warm = ds.train.subset(torch.arange(2 * spec.batch_size))
    timed = ds.train.subset(torch.arange(n_train))
    gen = torch.Generator().manual_seed(0)
    train(model, warm, objective, epoch, device=device, precision=precision, generator=gen)
    sync(device)
    start = time.perf_counter()
    train(model, timed, objective, epoch, device=device, precision=precision, generator=gen)
    sync(device)
    train_ips = n_train / (time.perf_counter() - start)

    model.eval()
    n_eval = min(args.eval_images, len(ds.test))
    batch = preset.eval_batch_size
    x_all, y_all = ds.test.x[:n_eval].to(device), ds.test.y[:n_eval].to(device)

    def attack(x, y):
        return pgd(model, x, y, eps=preset.eps, alpha=preset.alpha, steps=10, generator=torch.Generator().manual_seed(0))

    attack(x_all[:batch], y_all[:batch])  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, n_eval, batch):
        attack(x_all[i:i + batch], y_all[i:i + batch])
    sync(device)
    pgd_ips = n_eval / (time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{args.arch} on cifar10-mini, {name}, torch {torch.__version__}")
    print(f"PGD-AT training ({precision}, batch {spec.batch_size}, PGD-{preset.pgd_steps} + SGD step): "
          f"{train_ips:8.1f} images/s over {n_train} images")
    print(f"PGD-10 evaluation (fp32, batch {batch}):                     {pgd_ips:8.1f} images/s over {n_eval} images")


if __name__ == "__main__":
    main()
