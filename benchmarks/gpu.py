"""Every speed row of the full-scale issue in one run: meant for a GPU, runs on the CPU at small sizes.

    python benchmarks/gpu.py --data-dir DIR [--device cuda] [--train-images 10000] [--eval-images 2048]
        [--aa-images 1000] [--epochs 1] [--skip readme,compile]

DIR holds cifar-10-batches-py/ (the full CIFAR-10, unpacked by ../shared/data/cifar10-full/unpack.py, or
cifar10-mini). Rows, each a ratio or rate taken in this run, on ResNet-18 (the paper preset's model;
`--arch resnet20` for a check on a CPU):

1. PGD-AT training (the paper preset's recipe: batch 128, PGD-10 crafted in eval mode, bf16 autocast where
   the device runs it): images/s over `--train-images` and the 50,000-image epoch it implies, first with
   every lever of bench.train on, then with each one off in turn (channels-last weights, training images
   resident on the device, loss read back every SYNC_EVERY steps) and with `--compile` on: a lever is kept
   only where its row is slower.
2. PGD-10 evaluation (fp32, IEEE on a GPU: no TF32), images/s, batch `--eval-batch`.
3. PGD-10 against its limit, 10 x (forward + input-gradient backward), same batch: limit / ours.
4. DeepFool against torchattacks' DeepFool on the same images: time ratio, and whether the same images flip.
5. AutoAttack standard on `--aa-images` test images through the harness against pyautoattack called
   directly: time, and whether every verdict is equal.
6. README's main command (`bench run --defense rift_bn --attacks all`) on the device, cold cache: wall time.

The model attacked in rows 2-5 is the one row 1 trained (`--epochs` over `--train-images`), or
`--checkpoint PATH` (a state dict of a CIFAR-10 ResNet-18 in [0, 1] inputs). Evaluation numbers of a briefly
trained model time the code, they are not robustness results.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and `import attacks` would find
# benchmarks/attacks.py instead of the attack plugins package: the folder is taken off, and timing.py (shared
# by the scripts here) is loaded by its path.
HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import checkpoints, config, data, models, train  # noqa: E402
from bench.api import Context, Defended  # noqa: E402
from bench.params import resolve_params  # noqa: E402
from bench.projected_gradient import pgd  # noqa: E402
from bench.registry import load  # noqa: E402

_spec = importlib.util.spec_from_file_location("timing", HERE / "timing.py")
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)
sync = timing.sync

FULL_EPOCH = 50_000


class _Ctx:  # what an attack's setup reads of a run
    def __init__(self, ds, seed=0):
        self.data, self.seed = ds, seed

    def generator(self, purpose):
        return torch.Generator().manual_seed(len(purpose))


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def training_rows(args, ds, preset, device, precision):
    """Row 1: images/s of the PGD-AT recipe with all levers, then each lever off (or --compile on)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(data=ds, arch=args.arch, device=device, seed=0, preset=preset, cache_dir=tmp,
                      precision=precision, quiet=True)
        objective, spec, _ = checkpoints.recipe_plan("pgd_at", ctx)
    n = min(args.train_images, len(ds.train))
    timed_split = ds.train.subset(torch.arange(n))
    warm_split = ds.train.subset(torch.arange(min(2 * spec.batch_size, n)))
    one_epoch = train.TrainSpec(**{**vars(spec), "epochs": 1, "select": "last"})
    torch.manual_seed(0)
    start = models.build_model(args.arch, ds.spec)
    variants = [("all levers on", {}), ("without channels-last", {"channels_last": False}),
                ("without resident data", {"resident": False}), ("loss read every step", {"sync_every": 1})]
    if "compile" not in args.skip:
        variants.append(("with --compile", {"compile": True}))
    rows, trained = [], None
    for label, change in variants:
        model = copy.deepcopy(start)
        model = train.to_device(model, device) if change.get("channels_last", True) else model.to(device)
        kwargs = dict(device=device, precision=precision, sync_every=change.get("sync_every"),
                      compile=change.get("compile", False), resident_data=change.get("resident", True))
        train.train(model, warm_split, objective, one_epoch, generator=torch.Generator().manual_seed(1), **kwargs)
        _, sec = timed(lambda: train.train(model, timed_split, objective, one_epoch,
                                           generator=torch.Generator().manual_seed(2), **kwargs), device)
        rows.append((label, n / sec))
        if trained is None:
            trained = model
    base = rows[0][1]
    print(f"1. PGD-AT training, {args.arch}, {precision}, batch {spec.batch_size}, PGD-{preset.pgd_steps}, "
          f"{n} images:")
    for label, ips in rows:
        print(f"   {label:<24}{ips:9.1f} images/s  50k epoch {FULL_EPOCH / ips:8.1f} s  "
              f"(speed vs all on: {ips / base:.3f})")
    for _ in range(args.epochs - 1):  # more training for a model worth attacking in rows 2-5
        train.train(trained, ds.train, objective, one_epoch, device=device, precision=precision,
                    generator=torch.Generator().manual_seed(3))
    return trained.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", help="training precision: auto, bf16 or fp32")
    ap.add_argument("--train-images", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1, help="training epochs over --train-images (row 1 times the first)")
    ap.add_argument("--eval-images", type=int, default=2048)
    ap.add_argument("--eval-batch", type=int, default=1024)
    ap.add_argument("--aa-images", type=int, default=1000)
    ap.add_argument("--checkpoint", default=None, help="weights to attack instead of the trained model")
    ap.add_argument("--arch", default="resnet18", help="the model (resnet20 for a quick check on a CPU)")
    ap.add_argument("--skip", default="", help="comma-separated: train,pgd,deepfool,autoattack,readme,compile")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))

    device = torch.device(args.device)
    train.configure_backends(device)
    precision = train.resolve_precision(args.precision, device)
    preset = config.concrete(config.get_preset("paper"), data.DATASETS["cifar10"])
    ds = data.load("cifar10", args.data_dir, n_val=preset.n_val, n_test=None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; {len(ds.train)} training / {len(ds.test)} test images\n", flush=True)

    if args.checkpoint:
        model = train.to_device(models.build_model(args.arch, ds.spec), device)
        checkpoints.load_into(model, checkpoints.load(Path(args.checkpoint), require_digest=False), args.checkpoint,
                              arch=args.arch, dataset="cifar10")
        model.eval()
    elif "train" not in args.skip:
        model = training_rows(args, ds, preset, device, precision)
    else:
        torch.manual_seed(0)
        model = train.to_device(models.build_model(args.arch, ds.spec), device).eval()

    n_eval = min(args.eval_images, len(ds.test))
    x_all, y_all = ds.test.x[:n_eval].to(device), ds.test.y[:n_eval].to(device)
    eps, alpha = preset.eps, preset.alpha
    batch = min(args.eval_batch, n_eval)
    if "pgd" not in args.skip:
        gen = lambda: torch.Generator().manual_seed(0)
        pgd(model, x_all[:batch], y_all[:batch], eps=eps, alpha=alpha, steps=10, generator=gen())  # warm-up
        _, sec = timed(lambda: [pgd(model, x_all[i:i + batch], y_all[i:i + batch], eps=eps, alpha=alpha, steps=10,
                                    generator=gen()) for i in range(0, n_eval, batch)], device)
        print(f"2. PGD-10 evaluation, fp32, batch {batch}: {n_eval / sec:.1f} images/s over {n_eval} images")
        x, y = x_all[:batch], y_all[:batch]

        def limit():
            for _ in range(10):
                xr = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(xr), y), xr)

        ours = lambda: pgd(model, x, y, eps=eps, alpha=alpha, steps=10, generator=gen())
        times = {"limit": [], "ours": []}
        for _ in range(5):  # interleaved, medians
            for key, fn in (("limit", limit), ("ours", ours)):
                times[key].append(timed(fn, device)[1])
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"3. PGD-10 / its limit, batch {batch}: limit {med['limit'] * 1e3:.1f} ms, ours "
              f"{med['ours'] * 1e3:.1f} ms -> limit / ours = {med['limit'] / med['ours']:.3f} (goal >= 0.95)")

    def attack(name, **given):
        cls = load("attack", name)
        atk = cls(**resolve_params(name, cls.PARAMS, given, preset))
        atk.setup(_Ctx(ds), Defended(model))
        return atk

    if "deepfool" not in args.skip:
        import torchattacks

        n = min(1000, n_eval)
        x, y = x_all[:n], y_all[:n]
        ours = attack("deepfool")
        ours.perturb(model, x[:64], y[:64])  # warm-up
        adv_ours, t_ours = timed(lambda: ours.perturb(model, x, y), device)
        ref = torchattacks.DeepFool(model, steps=50, overshoot=0.02)
        adv_ref, t_ref = timed(lambda: ref(x, y), device)
        with torch.no_grad():
            flip_ours, flip_ref = model(adv_ours).argmax(1) != y, model(adv_ref).argmax(1) != y
        same = (flip_ours == flip_ref).float().mean().item()
        print(f"4. DeepFool, {n} images: ours {t_ours:.2f} s, torchattacks {t_ref:.2f} s -> {t_ref / t_ours:.1f}x "
              f"faster (goal >= 20x); flipped {int(flip_ours.sum())} vs {int(flip_ref.sum())}, same verdict on "
              f"{same:.1%} of images")

    if "autoattack" not in args.skip:
        from pyautoattack import AutoAttack as Reference

        n = min(args.aa_images, len(ds.test))
        x, y = ds.test.x[:n].to(device), ds.test.y[:n].to(device)
        ours = attack("autoattack")
        adv_ours, t_ours = timed(lambda: ours.perturb(model, x, y), device)
        ref = Reference(model, norm="Linf", eps=eps, version="standard", seed=ours.seed, device=device)
        ref.verbose = False
        adv_ref, t_ref = timed(lambda: ref.run_standard_evaluation(x, y, batch_size=n)[0], device)
        with torch.no_grad():
            v_ours, v_ref = model(adv_ours).argmax(1) == y, model(adv_ref).argmax(1) == y
        print(f"5. AutoAttack standard, {n} images: ours {t_ours:.1f} s (goal <= 60 s on a GPU), pyautoattack "
              f"{t_ref:.1f} s; robust {int(v_ours.sum())} vs {int(v_ref.sum())}; verdicts equal on "
              f"{(v_ours == v_ref).float().mean().item():.1%} of images")

    if "readme" not in args.skip:
        with tempfile.TemporaryDirectory() as out:
            cmd = ["bench", "run", "--defense", "rift_bn", "--attacks", "all", "--device", args.device, "--out", out,
                   "--quiet"]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            sec = time.perf_counter() - start
        status = "exit 0" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
        print(f"6. README main command on {args.device}, cold cache: {sec:.1f} s ({status})")


if __name__ == "__main__":
    main()
