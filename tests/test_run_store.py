"""The pipeline end to end: base cache, resume after SIGKILL, skipped cells, checkpoints, leaderboard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bench import checkpoints
from bench.store import Store
from conftest import PLUGINS, REPO, file_digest, make_distribution


def _cells(out):
    store = Store(out, create=False)
    try:
        return {(c["attack"], c["protocol"]): c for c in store.cells()}, store.runs()
    finally:
        store.close()


def _probe_times(out) -> dict[str, float]:
    from bench.checks import PROBES

    store = Store(out, create=False)
    try:
        (run,) = store.runs()
        times = {c["name"]: c["created"] for c in store.checks(run["run_id"]) if c["name"] in PROBES}
    finally:
        store.close()
    assert set(times) == set(PROBES)
    return times


def test_run_stores_per_sample_flags_and_worst_case(bench, out_dir):
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "pgd10,fgsm", "--out", out_dir,
                "--quiet")
    assert res.code == 0, res.err
    cells, (run,) = _cells(out_dir)
    clean, pgd, fgsm = cells[("clean", "-")], cells[("pgd10", "adaptive")], cells[("fgsm", "adaptive")]
    assert clean["n"] == pgd["n"] == 128 and clean["flags"].dtype == bool
    assert clean["correct"] == int(clean["flags"].sum())
    assert pgd["correct"] < clean["correct"]  # the attack does something to a PGD-AT model
    assert pgd["threat"] == fgsm["threat"] == "Linf eps=0.1" and pgd["eps"] == pytest.approx(0.1)
    assert pgd["extra"]["outside_budget"] == 0 and not pgd["extra"]["state_changed"]
    assert pgd["extra"]["max_linf"] <= 0.1 + 1e-6
    worst = clean["flags"] & pgd["flags"] & fgsm["flags"]
    line = next(ln for ln in res.out.splitlines() if ln.startswith("worst case"))
    assert f"{100 * worst.mean():.2f}".rstrip("0").rstrip(".") in line
    assert run["defense"] == "pgd_at" and run["precision"] in ("bf16", "fp32") and run["seed"] == 0
    assert run["command"].startswith("bench run --preset smoke --defense pgd_at")


def test_rerun_skips_finished_cells_and_adds_new_ones(bench, out_dir):
    args = ["run", "--preset", "smoke", "--defense", "pgd_at", "--out", out_dir]
    assert bench(*args, "--attacks", "fgsm", "--quiet").code == 0
    first, _ = _cells(out_dir)
    probed = _probe_times(out_dir)
    res = bench(*args, "--attacks", "fgsm,pgd10")
    assert res.code == 0
    assert "2 of 3 cells already finished, skipped" in res.err
    assert _probe_times(out_dir) == probed  # the model-level probes are not taken again on resume
    second, _ = _cells(out_dir)
    for key in first:  # finished cells untouched: same timestamp, same flags
        assert second[key]["created"] == first[key]["created"]
    assert ("pgd10", "adaptive") in second
    res = bench(*args, "--attacks", "fgsm,pgd10")
    assert "3 of 3 cells already finished" in res.err


def test_base_model_is_cached_with_digest_and_reused(bench, out_dir):
    files = sorted((out_dir / "cache" / "base").glob("*-pgd_at-*.pt"))
    assert len(files) == 1
    ckpt = files[0]
    sidecar = ckpt.with_name(ckpt.name + ".sha256")
    assert sidecar.read_text().strip() == checkpoints.file_sha256(ckpt)
    mtime = ckpt.stat().st_mtime_ns
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--out", out_dir)
    assert res.code == 0 and "cache hit" in res.err and "training" not in res.err
    assert ckpt.stat().st_mtime_ns == mtime
    # fewer test images evaluated: the base never saw the test split, so the same one serves
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--set", "n_test=32",
                "--out", out_dir)
    assert res.code == 0 and "cache hit" in res.err and "training" not in res.err
    # another seed is another base model
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--seed", "1",
                "--out", out_dir, "--quiet")
    assert res.code == 0 and len(list((out_dir / "cache" / "base").glob("*-pgd_at-*.pt"))) == 2


def test_corrupt_cached_base_is_reported(bench, out_dir):
    (ckpt,) = (out_dir / "cache" / "base").glob("*-pgd_at-*.pt")
    ckpt.write_bytes(ckpt.read_bytes()[:-10] + b"0123456789")
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--out", out_dir, "--quiet")
    assert res.code == 2 and "is corrupt: its sha256 differs" in res.err


def test_base_checkpoint_option_replaces_training(bench, out_dir, tmp_path):
    (ckpt,) = (out_dir / "cache" / "base").glob("*-standard-*.pt")
    mine = tmp_path / "mine.pt"
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], mine)  # a bare state dict, no sidecar
    res = bench("run", "--preset", "smoke", "--defense", "pgd_at", "--attacks", "fgsm", "--base-checkpoint", mine,
                "--out", out_dir / "other", "--quiet")
    assert res.code == 0, res.err
    cells, (run,) = _cells(out_dir / "other")
    assert run["config"]["base_checkpoints"][0][0] == "pgd_at"
    ref = bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "fgsm", "--out", out_dir, "--quiet")
    assert ref.code == 0
    ref_cells, _ = _cells(out_dir)
    # the "pgd_at" defense evaluated the standard weights we handed it: identical verdicts
    assert np.array_equal(cells[("clean", "-")]["flags"], ref_cells[("clean", "-")]["flags"])
    assert not (out_dir / "other" / "cache" / "base").exists()  # nothing was trained


def test_sigkill_mid_attack_loses_no_finished_cell(tmp_path, out_dir):
    site = make_distribution(PLUGINS / "toy_plugin", tmp_path / "site")
    marker = tmp_path / "blocked"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "bench.cli", "run", "--preset", "smoke", "--defense", "pgd_at", "--attacks",
           "pgd10,toy_block,fgsm", "--out", str(out_dir), "--quiet"]
    proc = subprocess.Popen(cmd, env={**env, "BENCH_TOY_BLOCK": str(marker)}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the blocking attack never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-attack: toy_block is running, pgd10 is committed
    proc.wait(timeout=30)
    db_digest = file_digest(out_dir / "results.sqlite")
    killed, _ = _cells(out_dir)
    assert set(killed) == {("clean", "-"), ("pgd10", "adaptive")}

    done = subprocess.run(cmd[:-1], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 of 4 cells already finished, skipped" in done.stderr
    resumed, _ = _cells(out_dir)
    assert set(resumed) == {("clean", "-"), ("pgd10", "adaptive"), ("toy_block", "adaptive"), ("fgsm", "adaptive")}
    for key in killed:  # not redone: same commit time and flags
        assert resumed[key]["created"] == killed[key]["created"]
        assert np.array_equal(resumed[key]["flags"], killed[key]["flags"])
    assert file_digest(out_dir / "results.sqlite") != db_digest


def test_leaderboard_has_rows_deltas_hash_and_command(bench, out_dir, tmp_path):
    for defense in ("pgd_at", "standard"):
        assert bench("run", "--preset", "smoke", "--defense", defense, "--attacks", "pgd10,fgsm", "--out",
                     out_dir, "--quiet").code == 0
    res = bench("leaderboard", "--out", out_dir, "--dest", tmp_path / "lb")
    assert res.code == 0
    path = tmp_path / "lb" / "digits-tiny_cnn-smoke.md"
    assert res.out.strip() == str(path)
    text = path.read_text()
    _, runs = _cells(out_dir)
    main = text.split("| Rank", 1)[1].split("\n\n", 1)[0]  # the main table, not the detail tables below
    lines = [ln for ln in ("| Rank" + main).splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    col = {name: i for i, name in enumerate(header)}
    assert header == ["Rank", "Defense", "Clean", "Worst L∞ ε=0.1", "Δ worst vs pgd_at", "AutoAttack", "Flags",
                      "n, seeds", "Run"]
    rows = {r[col["Defense"]]: r for r in ([c.strip() for c in ln.split("|")[1:-1]] for ln in lines[2:])}
    assert set(rows) == {"pgd_at", "standard"}
    from bench.stats import mcnemar, wilson

    by_defense = {r["defense"]: r for r in runs}
    flags = {}
    for name, row in rows.items():
        run = by_defense[name]
        cells = {c["attack"]: c for c in Store(out_dir, create=False).cells(run["run_id"])}
        flags[name] = cells
        k = cells["clean"]["correct"]
        low, high = wilson(k, 128)
        assert row[col["Clean"]] == f"{100 * k / 128:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
        assert row[col["Run"]] == f"[{run['run_id'][:10]}](#run-{run['run_id'][:10]})"
        assert row[col["n, seeds"]] == "128, seed 0"
        # the row's command, where its Run column links
        assert f'<a id="run-{run["run_id"][:10]}"></a>`{run["run_id"][:10]}` {name}: `{run["command"]}`' in text
    assert rows["pgd_at"][col["Δ worst vs pgd_at"]] == "+0.0 (identical)"
    worst = {name: cells["clean"]["flags"] & cells["pgd10"]["flags"] & cells["fgsm"]["flags"] for name, cells in flags.items()}
    test = mcnemar(worst["pgd_at"], worst["standard"])
    assert rows["standard"][col["Δ worst vs pgd_at"]].startswith(f"{100 * test.delta:+.1f} (")
    assert f"{test.p_value:.2g}" in rows["standard"][col["Δ worst vs pgd_at"]] or "ns" in rows["standard"][col["Δ worst vs pgd_at"]]
    # sorted by worst-case robust accuracy: PGD-AT above the undefended model, and ranked 1; the undefended
    # model, significantly below it, ranks 2
    assert text.index("| pgd_at") < text.index("| standard")
    assert rows["pgd_at"][col["Rank"]] == "1" and (rows["standard"][col["Rank"]] == "2") == test.significant
    # every attack is in the threat model's detail table
    detail = text.split("### L∞ ε=0.1, adaptive attacks", 1)[1].split("\n\n", 2)[1]
    assert detail.splitlines()[0].split("|")[1:4] == [" Defense   ", " pgd10             ", " fgsm              "]
    assert "## Sanity checks" in text and "## Reproduce" in text

    # more attacks on one row: the other row's worst case is over fewer attacks, and says which; `shaping`
    # (plain PGD + APGD against a defense that is not batch-dependent) is not counted missing
    assert bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "cw_inf,shaping", "--out",
                 out_dir, "--quiet").code == 0
    assert bench("leaderboard", "--out", out_dir, "--dest", tmp_path / "lb").code == 0
    text = path.read_text()
    main = "| Rank" + text.split("| Rank", 1)[1].split("\n\n", 1)[0]
    lines = [[c.strip() for c in ln.split("|")[1:-1]] for ln in main.splitlines()]
    col = {name: i for i, name in enumerate(lines[0])}
    rows = {r[col["Defense"]]: r for r in lines[2:]}
    assert rows["pgd_at"][col["Worst L∞ ε=0.1"]].endswith(" †") and "† without cw_inf" in rows["pgd_at"][col["Flags"]]
    assert "shaping" not in rows["pgd_at"][col["Flags"]]
    assert "†" not in rows["standard"][col["Worst L∞ ε=0.1"]] + rows["standard"][col["Flags"]]
    detail = text.split("### L∞ ε=0.1, adaptive attacks", 1)[1].split("\n\n", 2)[1]
    header = [c.strip() for c in detail.splitlines()[0].split("|")[1:-1]]
    assert {"cw_inf", "shaping"} <= set(header)
    pgd_at = next([c.strip() for c in ln.split("|")[1:-1]] for ln in detail.splitlines() if ln.startswith("| pgd_at"))
    assert pgd_at[header.index("Worst")].endswith("† without cw_inf")


def test_rerun_from_caches_keeps_the_build_time_of_the_run_that_computed_it(tmp_path):
    store = Store(tmp_path, create=True)
    row = {"run_id": "r1", "defense": "rift", "params": {"k": 1}, "preset": "smoke", "dataset": "digits",
           "arch": "tiny_cnn", "seed": 0, "precision": "fp32", "config": {}, "command": "bench run",
           "code_version": "x", "batch_dependent": 0, "randomized": 0, "has_surrogate": 0, "info": {"a": 1}}
    try:
        store.put_run({**row, "build_seconds": 120.0})
        store.put_run({**row, "info": {"a": 2}, "build_seconds": 0.5})  # rebuilt from caches
        (run,) = store.runs()
        assert run["build_seconds"] == 120.0 and run["info"] == {"a": 2}
    finally:
        store.close()
