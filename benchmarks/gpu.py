"""Every speed row of the full-scale issue in one run: meant for a GPU, runs on the CPU at small sizes.

    python benchmarks/gpu.py --data-dir DIR [--device cuda] [--train-images 10000] [--eval-images 2048]
        [--aa-images 1000] [--epochs 1] [--skip readme,compile]

DIR holds cifar-10-batches-py/ (the full CIFAR-10, unpacked by ../shared/data/cifar10-full/unpack.py, or
cifar10-mini). Rows, each a ratio or rate taken in this run, on ResNet-18 (the paper preset's model;
`--arch resnet20` for a check on a CPU):

1. PGD-AT training (the paper preset's recipe: batch 128, PGD-10 crafted in eval mode, bf16 autocast where
   the device runs it): images/s over `--train-images` and the 50,000-image epoch it implies, first with
   every lever of bench.train on, then with each one off in turn (channels-last weights, training images
   resident on the device, loss read back every SYNC_EVERY steps, cuDNN autotuning on a GPU): a lever is
   kept only where its row is slower.
2. PGD-10 evaluation (fp32, IEEE on a GPU: no TF32), images/s, at each batch size of `--eval-batch`; on a GPU
   also in TF32, which results never use, to show what the IEEE choice costs.
3. PGD-10 against its limit, 10 x (forward + input-gradient backward), same batch: limit / ours.
4. DeepFool against torchattacks' DeepFool on the same images: time ratio, and whether the same images flip.
5. AutoAttack standard on `--aa-images` test images through the harness against pyautoattack called
   directly: time, and whether every verdict is equal.
6. README's main command (`bench run --defense rift_bn --attacks all`) on the device, cold cache: wall time.
7. Row 1 with `--compile` on, last: its compilation may take minutes.

A row that fails prints one line and the others still run, so one call on a device measures what works.

The model attacked in rows 2-5 is the one row 1 trained (`--epochs` over `--train-images`), or
`--checkpoint PATH` (a state dict of a CIFAR-10 ResNet-18 in [0, 1] inputs). Evaluation numbers of a briefly
trained model time the code, they are not robustness results.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
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
from bench.api import Context, Defended, project  # noqa: E402
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


def training_rows(args, ds, preset, device, precision, only_compile=False):
    """Row 1: images/s of the PGD-AT recipe with all levers, then each lever off; row 7 (`only_compile`):
    with --compile on, last because its compilation may take minutes."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(data=ds, arch=args.arch, device=device, seed=0, preset=preset, cache_dir=tmp,
                      precision=precision, quiet=True)
        objective, spec, _ = checkpoints.recipe_plan("pgd_at", ctx)
    n = min(args.train_images, len(ds.train))
    timed_split = ds.train.subset(torch.arange(n))
    one_epoch = train.TrainSpec(**{**vars(spec), "epochs": 1, "select": "last"})
    torch.manual_seed(0)
    start = models.build_model(args.arch, ds.spec)
    variants = [("all levers on", {}), ("without channels-last", {"channels_last": False}),
                ("without resident data", {"resident": False}), ("loss read every step", {"sync_every": 1})]
    if device.type == "cuda":
        variants.append(("without cuDNN autotuning", {"benchmark": False}))
    if only_compile:  # against "all levers on" again, in the same rounds
        variants = [variants[0], ("with --compile", {"compile": True})]
    print(f"{'7' if only_compile else '1'}. PGD-AT training, {args.arch}, {precision}, batch {spec.batch_size}, "
          f"PGD-{preset.pgd_steps}, {n} images, median of {args.rounds} interleaved passes:", flush=True)
    runs = []
    for label, change in variants:
        model = copy.deepcopy(start)
        model = train.to_device(model, device) if change.get("channels_last", True) else model.to(device)
        kwargs = dict(device=device, precision=precision, sync_every=change.get("sync_every"),
                      compile=change.get("compile", False), resident_data=change.get("resident", True))
        runs.append((label, change, model, kwargs, []))

    def one_pass(change, model, kwargs, seed):
        autotune = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = change.get("benchmark", autotune)
        try:
            return timed(lambda: train.train(model, timed_split, objective, one_epoch,
                                             generator=torch.Generator().manual_seed(seed), **kwargs), device)[1]
        finally:
            torch.backends.cudnn.benchmark = autotune

    # Every variant first makes a whole untimed pass (cuDNN autotunes per shape, the last partial batch is
    # another; compilation), then the variants take turns: a single pass each in a fixed order charged the
    # GPU's warming-up to the first one (2026-12-04: "all levers on" 0.87-0.90x of every lever off).
    warm = [one_pass(change, model, kwargs, 1) for _, change, model, kwargs, _ in runs]
    for r in range(args.rounds):
        for _, change, model, kwargs, secs in runs:
            secs.append(one_pass(change, model, kwargs, 2 + r))
    base = None
    for (label, _, _, _, secs), warm_sec in zip(runs, warm):
        sec = statistics.median_high(secs)
        ips = n / sec
        base = base or ips
        print(f"   {label:<26}{ips:9.1f} images/s  50k epoch {FULL_EPOCH / ips:8.1f} s  (speed vs all on: "
              f"{ips / base:.3f}; passes {min(secs):.2f}-{max(secs):.2f} s; warm-up pass {warm_sec:.1f} s)", flush=True)
    if only_compile:
        return None
    trained = runs[0][2]
    more = args.epochs - 1  # more training for a model worth attacking in rows 2-5
    if more > 0:
        _, sec = timed(lambda: [train.train(trained, ds.train, objective, one_epoch, device=device,
                                            precision=precision, generator=torch.Generator().manual_seed(3 + e))
                                for e in range(more)], device)
        print(f"   {more} more epochs over all {len(ds.train)} training images for rows 2-5: {sec:.1f} s", flush=True)
    return trained.eval()


FAILED: list[str] = []


def run_row(label, fn):
    """One row; a row that raises is reported in one line and the rest go on (one device call measures all);
    the script then exits 1."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark row, not a result
        print(f"{label}: FAILED after {time.perf_counter() - start:.1f} s: {type(exc).__name__}: {exc}", flush=True)
        FAILED.append(label)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", help="training precision: auto, bf16 or fp32")
    ap.add_argument("--train-images", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed passes per variant of rows 1 and 7")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs over --train-images (row 1 times the first)")
    ap.add_argument("--eval-images", type=int, default=2048,
                    help="images of rows 2-3; beyond the test set, its images repeat (a rate, not a result)")
    ap.add_argument("--eval-batch", default="256,1024",
                    help="comma-separated batch sizes of row 2 (the paper preset evaluates in 256); row 3 takes the last")
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

    model = None
    if args.checkpoint:
        model = train.to_device(models.build_model(args.arch, ds.spec), device)
        checkpoints.load_into(model, checkpoints.load(Path(args.checkpoint), require_digest=False), args.checkpoint,
                              arch=args.arch, dataset="cifar10")
        model.eval()
    elif "train" not in args.skip:
        model = run_row("1. PGD-AT training", lambda: training_rows(args, ds, preset, device, precision))
    if model is None:
        torch.manual_seed(0)
        model = train.to_device(models.build_model(args.arch, ds.spec), device).eval()

    eps, alpha = preset.eps, preset.alpha
    n_test = min(1000, len(ds.test))
    x, y = ds.test.x[:n_test].to(device), ds.test.y[:n_test].to(device)
    x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, robust = ((model(v).argmax(1) == y).float().mean().item() for v in (x, x_adv))
    print(f"   the attacked model, first {n_test} test images: clean {clean:.1%}, PGD-10 {robust:.1%}\n", flush=True)

    if "pgd" not in args.skip:
        run_row("2-3. PGD-10", lambda: pgd_rows(args, ds, model, device, eps, alpha))

    def attack(name, **given):
        cls = load("attack", name)
        atk = cls(**resolve_params(name, cls.PARAMS, given, preset))
        atk.setup(_Ctx(ds), Defended(model))
        return atk

    if "deepfool" not in args.skip:
        run_row("4. DeepFool", lambda: deepfool_row(ds, model, device, attack))
    if "autoattack" not in args.skip:
        run_row("5. AutoAttack", lambda: autoattack_row(args, ds, model, device, eps, attack))
    if "readme" not in args.skip:
        run_row("6. README main command", lambda: readme_row(args))
    if "compile" not in args.skip and "train" not in args.skip and not args.checkpoint:
        run_row("7. --compile", lambda: training_rows(args, ds, preset, device, precision, only_compile=True))
    if FAILED:
        sys.exit(f"failed rows: {', '.join(FAILED)}")


def pgd_rows(args, ds, model, device, eps, alpha):
    """Rows 2-3: PGD-10 images/s (IEEE fp32, and TF32 for what that choice costs), and PGD-10 vs its limit."""
    reps = -(-args.eval_images // len(ds.test))  # a rate needs full batches, not distinct images
    x_all = ds.test.x.repeat(reps, 1, 1, 1)[:args.eval_images].to(device)
    y_all = ds.test.y.repeat(reps)[:args.eval_images].to(device)
    n_eval = len(y_all)
    gen = lambda: torch.Generator().manual_seed(0)

    def rate(batch):
        pgd(model, x_all[:batch], y_all[:batch], eps=eps, alpha=alpha, steps=10, generator=gen())  # warm-up
        _, sec = timed(lambda: [pgd(model, x_all[i:i + batch], y_all[i:i + batch], eps=eps, alpha=alpha, steps=10,
                                    generator=gen()) for i in range(0, n_eval, batch)], device)
        return n_eval / sec

    for batch in [min(int(b), n_eval) for b in str(args.eval_batch).split(",")]:
        ieee = rate(batch)
        line = f"2. PGD-10 evaluation, fp32 (IEEE), batch {batch}: {ieee:.1f} images/s over {n_eval} images"
        if device.type == "cuda":  # what the IEEE choice costs; reported evaluations never run in TF32
            conv, mm = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
            torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
            try:
                tf32 = rate(batch)
            finally:
                torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, mm
            line += f"; in TF32 (not used for results): {tf32:.1f} images/s ({tf32 / ieee:.2f}x)"
        print(line, flush=True)
    x, y = x_all[:batch], y_all[:batch]

    def limit():
        for _ in range(10):
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xr), y), xr)

    def limit_and_last():  # best-iterate PGD must also judge its last iterate: one more forward
        limit()
        with torch.no_grad():
            model(x)

    ours = lambda: pgd(model, x, y, eps=eps, alpha=alpha, steps=10, generator=gen())
    times = {"limit": [], "last": [], "ours": []}
    for _ in range(5):  # interleaved, medians
        for key, fn in (("limit", limit), ("last", limit_and_last), ("ours", ours)):
            times[key].append(timed(fn, device)[1])
    med = {k: statistics.median_high(v) for k, v in times.items()}
    print(f"3. PGD-10 / its limit, batch {batch}: limit {med['limit'] * 1e3:.1f} ms, ours "
          f"{med['ours'] * 1e3:.1f} ms -> limit / ours = {med['limit'] / med['ours']:.3f} (goal >= 0.95); with the "
          f"last iterate's forward ({med['last'] * 1e3:.1f} ms): {med['last'] / med['ours']:.3f}", flush=True)


def deepfool_row(ds, model, device, attack):
    import torchattacks

    n = min(1000, len(ds.test))
    x, y = ds.test.x[:n].to(device), ds.test.y[:n].to(device)
    ours = attack("deepfool")
    ours.minimal(model, x[:64], y[:64])  # warm-up
    # both unbounded (minimal perturbations), as torchattacks runs it; the budget is applied after
    (adv_ours, flip_ours), t_ours = timed(lambda: ours.minimal(model, x, y), device)
    ref = torchattacks.DeepFool(model, steps=50, overshoot=0.02)
    adv_ref, t_ref = timed(lambda: ref(x, y), device)
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
        flip_ref = model(adv_ref).argmax(1) != y
        eps = ours.params.eps
        within = [(model(project(a, x, eps, "L2")).argmax(1) != y) for a in (adv_ours, adv_ref)]
    same = (flip_ours == flip_ref).float().mean().item()
    print(f"4. DeepFool, {n} images ({clean} classified correctly): ours "
          f"{t_ours:.2f} s, torchattacks {t_ref:.2f} s -> {t_ref / t_ours:.1f}x faster (goal >= 20x); unbounded, "
          f"flipped {int(flip_ours.sum())} vs {int(flip_ref.sum())}, same verdict on {same:.1%} of images; within "
          f"L2 {eps:g}: {int(within[0].sum())} vs {int(within[1].sum())}", flush=True)


def autoattack_row(args, ds, model, device, eps, attack):
    from pyautoattack import AutoAttack as Reference

    n = min(args.aa_images, len(ds.test))
    x, y = ds.test.x[:n].to(device), ds.test.y[:n].to(device)
    ours = attack("autoattack")
    adv_ours, t_ours = timed(lambda: ours.perturb(model, x, y), device)
    ref = Reference(model, norm="Linf", eps=eps, version="standard", seed=ours.seed, device=device)
    ref.verbose = False
    adv_ref, t_ref = timed(lambda: ref.run_standard_evaluation(x, y, batch_size=n)[0], device)
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
        v_ours, v_ref = model(adv_ours).argmax(1) == y, model(adv_ref).argmax(1) == y
    print(f"5. AutoAttack standard, {n} images ({clean} classified correctly, so attacked): ours {t_ours:.1f} s "
          f"(goal <= 60 s on a GPU), pyautoattack {t_ref:.1f} s; robust {int(v_ours.sum())} vs {int(v_ref.sum())}; "
          f"verdicts equal on {(v_ours == v_ref).float().mean().item():.1%} of images", flush=True)


def readme_row(args):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "bench.cli", "run", "--defense", "rift_bn", "--attacks", "all",
               "--device", args.device, "--out", out, "--quiet"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        sec = time.perf_counter() - start
    status = "exit 0" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    print(f"6. README main command on {args.device}, cold cache: {sec:.1f} s ({status})", flush=True)
    print("   " + "\n   ".join(done.stdout.strip().splitlines()[-6:]), flush=True)


if __name__ == "__main__":
    main()
