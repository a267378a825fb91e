"""benchmarks/gpu.py, the one script a session with a GPU runs, runs here too (at toy sizes, on the CPU)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_the_gpu_benchmark_prints_its_attack_rows_and_autoattack_agrees_with_pyautoattack(cifar10_dir):
    # training and README rows left out (minutes on a CPU); the attack rows on a random ResNet-20
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--data-dir", str(cifar10_dir), "--device", "cpu",
         "--arch", "resnet20", "--skip", "train,readme", "--eval-images", "32", "--eval-batch", "32",
         "--aa-images", "16"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split(".")[0]: line for line in done.stdout.splitlines() if line[:2] in ("2.", "3.", "4.", "5.")}
    assert set(rows) == {"2", "3", "4", "5"}, done.stdout
    assert "limit / ours = " in rows["3"] and "same verdict on" in rows["4"]
    # the harness's AutoAttack is pyautoattack's, image for image
    assert "verdicts equal on 100.0% of images" in rows["5"], rows["5"]
