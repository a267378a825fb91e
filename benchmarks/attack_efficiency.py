"""How close our PGD-10 is to its physical limit: 10 x (forward + input-gradient backward) on one batch.

    python benchmarks/attack_efficiency.py [--preset mini] [--data-dir DIR] [--batch 256] [--reps 7]

Both are timed in the same process, interleaved, on the same batch and model (eval mode, fp32, as in
evaluation); the medians are compared. efficiency = limit / ours; 1.0 means PGD adds nothing to the
gradient computations it cannot avoid (target >= 0.9). torchattacks' PGD is timed alongside.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench import config, data, models
from bench.projected_gradient import pgd
from bench.train import to_device
from timing import sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--data-dir", default=None, help="CIFAR folder; random images when absent")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    preset = config.get_preset(args.preset)
    spec = data.DATASETS[preset.dataset]
    preset = config.concrete(preset, spec)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = to_device(models.build_model(preset.arch, spec), device).eval()  # as a run builds it
    if args.data_dir:
        ds = data.load(preset.dataset, args.data_dir, n_val=0 if preset.dataset != "digits" else 1)
        x, y = ds.test.x[:args.batch].to(device), ds.test.y[:args.batch].to(device)
    else:
        x = torch.rand(args.batch, spec.channels, spec.size, spec.size, device=device)
        y = torch.randint(0, spec.num_classes, (args.batch,), device=device)
    eps, alpha = preset.eps, preset.eps / 4

    def limit():
        for _ in range(10):
            xr = x.clone().requires_grad_(True)
            loss = F.cross_entropy(model(xr), y)
            torch.autograd.grad(loss, xr)

    def ours():
        pgd(model, x, y, eps=eps, alpha=alpha, steps=10, generator=torch.Generator().manual_seed(0))

    candidates = {"limit: 10 x (fwd + input-grad bwd)": limit, "ours: bench PGD-10 (best iterate)": ours}
    try:
        import torchattacks

        atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=10, random_start=True)
        candidates["torchattacks.PGD (last iterate)"] = lambda: atk(x, y)
    except ImportError:
        pass
    for fn in candidates.values():  # warm-up
        fn()
    times = {name: [] for name in candidates}
    for _ in range(args.reps):
        for name, fn in candidates.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{preset.arch} on {args.batch} images of {preset.dataset} ({device}, fp32, eval mode), "
          f"median of {args.reps} interleaved repetitions")
    for name, t in med.items():
        print(f"  {name:<40} {t * 1000:8.1f} ms   {args.batch / t * 10:8.0f} img-steps/s")
    lim, our = med["limit: 10 x (fwd + input-grad bwd)"], med["ours: bench PGD-10 (best iterate)"]
    print(f"efficiency of our PGD-10 = limit / ours = {lim / our:.3f}  (target >= 0.9; ours / limit = {our / lim:.3f})")
    if "torchattacks.PGD (last iterate)" in med:
        print(f"ours / torchattacks PGD = {our / med['torchattacks.PGD (last iterate)']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
