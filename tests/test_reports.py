"""Sweeps, the papers' tables and figures, and the machine-readable leaderboard formats (smoke scale)."""

from __future__ import annotations

import json
import re

import pytest

from bench.store import Store

SWEEP = """
preset = "smoke"
attacks = ["pgd10", "fgsm", "pgd10[eps=0.05]", "pgd10[eps=0.2]"]
out = "{out}"
set = {{ epochs_pgd_at = 4 }}

[[cells]]
defense = "pgd_at"

[[cells]]
defense = "rift"
grid = {{ k = [1, 2] }}

[[cells]]
defense = "rift_bn"
grid = {{ k = [1, 2] }}

[[cells]]
defense = "rift_bn"
params = {{ mrc_ascent = "normalized" }}

[[cells]]
defense = "pgd_at"
attacks = ["autoattack"]
set = {{ epochs_pgd_at = 4, n_test = 32 }}

[[cells]]
defense = "rift"
params = {{ k = 1 }}
attacks = ["autoattack"]
set = {{ epochs_pgd_at = 4, n_test = 32 }}

# a second seed of the base and of RiFT k = 1, as the full-data sweep runs
[[cells]]
defense = "pgd_at"
seeds = [1]

[[cells]]
defense = "rift"
params = {{ k = 1 }}
seeds = [1]

[[cells]]
defense = "ft_bn"

[[cells]]
defense = "ft_conv"

[[cells]]
defense = "standard"

[[cells]]
defense = "bn_stats"

[[cells]]
defense = "bn_params"
grid = {{ extra = [[], ["logits", "conv1"]] }}
params = {{ epochs = 2 }}

[[cells]]
defense = "norm_shaping"
grid = {{ train_ratio = [1, 3], infer_ratio = [0, 3] }}
params = {{ epochs = 2 }}
attacks = ["pgd10"]
protocols = ["paper", "paper:test_batch", "adaptive"]

[[cells]]
defense = "norm_shaping"
params = {{ epochs = 2, train_ratio = 1, infer_ratio = 0 }}
attacks = ["pgd10", "fgsm"]

[[cells]]
defense = "norm_shaping"
params = {{ epochs = 2, train_ratio = 3, infer_ratio = 3 }}
attacks = ["shaping"]
protocols = ["adaptive"]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory, smoke_cache):
    import shutil

    from bench.cli import main

    root = tmp_path_factory.mktemp("sweep")
    out = root / "results"
    shutil.copytree(smoke_cache / "cache", out / "cache")
    path = root / "grid.toml"
    path.write_text(SWEEP.format(out=out))
    try:
        main(["sweep", str(path), "--quiet"])
    except SystemExit as exc:
        assert exc.code == 0
    return path, out


def test_sweep_expands_the_grid_and_stores_every_run(swept):
    _, out = swept
    runs = Store(out, create=False).runs()
    defenses = sorted(r["defense"] for r in runs)
    assert defenses.count("rift") == 4 and defenses.count("rift_bn") == 3 and defenses.count("norm_shaping") == 4
    assert {r["params"]["k"] for r in runs if r["defense"] == "rift_bn"} == {1, 2}
    ns = [r for r in runs if r["defense"] == "norm_shaping"]
    cells = Store(out, create=False).cells(ns[0]["run_id"])
    assert {c["protocol"] for c in cells if c["attack"] == "pgd10"} == {"paper", "paper:test_batch", "adaptive"}
    # each train ratio's network is one surrogate: its images are crafted at one inference ratio, reused at the other
    reused = [c for c in Store(out, create=False).cells() if c["protocol"].startswith("paper")
              and c["extra"].get("crafted_by")]
    assert len(reused) == 4  # 2 train ratios x 2 surrogates, each crafted at one ratio and reused at the other
    rift = next(r for r in runs if r["defense"] == "rift")
    assert rift["command"].startswith("bench run --defense rift --param k=")


def test_sweep_resumes_and_validates(swept, bench, tmp_path, monkeypatch):
    path, out = swept
    monkeypatch.chdir(tmp_path)  # the bad sweeps below name no --out: their default folder would land here
    before = {(c["run_id"], c["attack"], c["protocol"]): c["created"] for c in Store(out, create=False).cells()}
    res = bench("sweep", path, "--quiet")
    assert res.code == 0
    after = {(c["run_id"], c["attack"], c["protocol"]): c["created"] for c in Store(out, create=False).cells()}
    assert after == before  # nothing recomputed
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "smoke"\n[[cells]]\ndefense = "rift"\ngrid = { k = [1, 9] }\n')
    res = bench("sweep", bad, "--quiet")
    assert res.code == 2 and "must be <= 5" in res.err
    assert not (tmp_path / "results").exists()  # its valid first job was prepared, but nothing was created
    typo = tmp_path / "typo.toml"
    typo.write_text('preset = "smoke"\n[[cells]]\ndefence = "rift"\n')
    res = bench("sweep", typo)
    assert res.code == 2 and "did you mean 'defense'" in res.err
    listed = bench("sweep", path, "--dry-run")
    assert listed.code == 0 and "bench run --defense rift_bn --param k=2" in listed.out


@pytest.fixture(scope="module")
def board(swept, tmp_path_factory):
    from bench.cli import main

    _, out = swept
    dest = tmp_path_factory.mktemp("lb")
    for fmt in ("md", "csv", "json", "latex", "html"):
        try:
            main(["leaderboard", "--out", str(out), "--dest", str(dest), "--format", fmt])
        except SystemExit as exc:
            assert exc.code == 0
    return dest, (dest / "digits-tiny_cnn-smoke.md").read_text()


def test_rift_topk_table_has_base_rift_and_deltas(board):
    _, text = board
    section = text.split("## RiFT top-k", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names[0] == "Base (PGD-AT)"
    for k in ("1", "2"):
        for name in ("RiFT", "Δ RiFT", "RiFT with BN", "Δ RiFT with BN"):
            assert any(r.split("|")[1].strip() == name and r.split("|")[2].strip() == k for r in rows), (name, k)
    delta = next(r for r in rows if r.split("|")[1].strip() == "Δ RiFT")
    assert "(" in delta.split("|")[3]  # a p-value or 'identical'/'ns' with the delta
    # AutoAttack ran on the first 32 images in runs of their own: read from them, paired with the base's
    assert "AutoAttack on the first 32" in section
    table = section.split("Chosen modules", 1)[0].splitlines()
    cells = {(r.split("|")[1].strip(), r.split("|")[2].strip()): [c.strip() for c in r.split("|")[3:-1]]
             for r in table if r.startswith("| ")}
    assert cells[("Base (PGD-AT)", "—")][2] != "—" and "(" in cells[("Δ RiFT", "1")][2]
    assert cells[("RiFT", "2")][2] == "—"  # no AutoAttack run for k = 2: nothing borrowed from another k
    assert ("Δ RiFT with BN, normalized MRC ascent (ours)", "1") in cells
    # two seeds of the base and of RiFT k = 1: mean ± std, the pooled test and each seed's own Δ
    assert "±" in cells[("Base (PGD-AT)", "—")][0] and "±" in cells[("RiFT", "1")][0]
    assert "; seeds " in cells[("Δ RiFT", "1")][0] and "; seeds " not in cells[("Δ RiFT", "2")][0]
    chosen = section.split("Chosen modules", 1)[1].split("\n\n", 2)[1].splitlines()
    seeds = [(r.split("|")[1].strip(), r.split("|")[2].strip(), r.split("|")[3].strip()) for r in chosen[2:]]
    assert ("RiFT", "1", "0") in seeds and ("RiFT", "1", "1") in seeds  # each seed's own modules and α


def test_mrc_ranking_says_which_ascents_reached_their_ball(board):
    _, text = board
    section = text.split("### MRC ranking", 1)[1].split("\n#", 1)[0]
    rows = {tuple(c.strip() for c in r.split("|")[1:3]): [c.strip() for c in r.split("|")[3:-1]]
            for r in section.splitlines() if r.startswith("| ") and "---" not in r}
    assert set(rows) >= {("sgd", "BN"), ("sgd", "Conv/Linear"), ("normalized", "BN"), ("normalized", "Conv/Linear")}
    for kind in ("BN", "Conv/Linear"):
        modules, reached = rows[("normalized", kind)][0], rows[("normalized", kind)][3]
        assert reached == f"{modules} of {modules}"
    assert "BN MRCs lie below every Conv/Linear MRC" in section


def test_norm_shaping_grid_and_adaptive_table(board):
    _, text = board
    assert "### Robust accuracy, worst case over adaptive and surrogate attacks (the slides' table IV layout)" in text
    grid = text.split("### Robust accuracy, worst case over adaptive", 1)[1].split("###", 1)[0]
    header = next(ln for ln in grid.splitlines() if ln.startswith("| train"))
    assert "1:0" in header and "1:3" in header
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in grid.splitlines() if ln.startswith("| 1:")}
    assert set(rows) == {"1:1", "1:3"}
    # only train 1:1 x infer 1:0 also ran fgsm, only train 1:3 x infer 1:3 the adaptive-only `shaping` attack:
    # each cell's worst case is marked with the attacks it lacks
    assert rows["1:1"][0].endswith("† without shaping") and rows["1:1"][1].endswith("† without fgsm, shaping")
    assert rows["1:3"][0].endswith("† without fgsm, shaping") and rows["1:3"][1].endswith("† without fgsm")
    table = text.split("### Adaptive vs non-adaptive attacks", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header[3:] == ["pgd10", "shaping"]  # the surrogates' attacks, then the adaptive-only one
    by_kind = {ln.split("|")[2].strip(): [c.strip() for c in ln.split("|")[4:-1]] for ln in lines
               if ln.startswith("| norm_shaping")}
    assert list(by_kind) == ["non-adaptive, eval surrogate", "non-adaptive, test_batch surrogate", "adaptive"]
    assert by_kind["adaptive"][1] != "—" and by_kind["non-adaptive, eval surrogate"][1] == "—"
    assert "- pgd10, test_batch surrogate − adaptive = " in table and "- `init_stats`: " in table
    assert "### PGD-10 accuracy, non-adaptive: attacks on the test_batch surrogate" in text
    assert "### PGD-10, eval surrogate minus adaptive, in points" in text
    assert "paper protocol, surrogate test_batch (attacks on it)" in text  # its detail table


def test_fragile_and_finetune_sections(board):
    _, text = board
    table = text.split("## Fragile features and BN", 1)[1].split("\n## ", 1)[0]
    assert "| bn_stats " in table and "| bn_params +log +conv1 " in table and "| standard " in table
    assert "## Layer-type fine-tuning" in text and "| ft_bn " in text


def test_figures_exist_are_png_and_embedded(board):
    dest, text = board
    for name in ("mrc", "alpha", "bn-kde", "finetune-curves", "eps-pgd10"):
        path = dest / f"digits-tiny_cnn-smoke-{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({path.name})" in text
        assert path.stat().st_size > 5000
    # the BN-output KDE says in its caption what it shows: measured distances, and why curves coincide
    caption = text.split("](digits-tiny_cnn-smoke-bn-kde.png)", 1)[1].split("\n\n", 2)[1]
    assert caption.startswith("*Two-sample Kolmogorov-Smirnov distance to the base's outputs: RiFT ")


def test_kde_caption_places_each_models_modules_in_network_order():
    """A conv-only RiFT run never ranked the BN layer the figure shows: its chosen conv is placed by the
    network order of the run that did, and fine-tuning figures come from the run, not the preset."""
    from defenses.rift_report import kde_caption

    net = ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.1.conv2", "layer1.2.bn2", "linear"]
    everything = [{"module": m, "order": i} for i, m in enumerate(net)]
    convs = [{"module": m, "order": i} for i, m in enumerate(m for m in net if "bn" not in m)]

    def run(candidates, chosen, alpha, epochs):
        return {"params": {"epochs": epochs}, "config": {"preset": {"ft_epochs": 2, "ft_lr": 0.001}},
                "info": {"candidates": candidates, "chosen": chosen, "alpha": alpha,
                         "finetune": {"history": [{}] * epochs}}}

    samples = {"PGD-AT base": [0.1 * i for i in range(50)], "RiFT": [0.1 * i for i in range(50)],
               "RiFT with BN": [0.1 * i for i in range(50)]}
    before = kde_caption("layer1.2.bn2", samples, {"RiFT": run(convs, ["layer1.1.conv2"], 0.3, 10),
                                                   "RiFT with BN": run(everything, ["layer1.2.bn2"], 1.0, 10)})
    assert "RiFT fine-tuned layer1.1.conv2, before this layer" in before and "after this layer" not in before
    assert "after 10 epochs at learning rate 0.001" in before
    after = kde_caption("layer1.0.bn1", samples, {"RiFT": run(convs, ["layer1.1.conv2"], 0.3, 10),
                                                  "RiFT with BN": run(everything, ["linear"], 1.0, 10)})
    assert "RiFT fine-tuned only modules after this layer (layer1.1.conv2)" in after
    # an α search that kept α = 0 left the base itself: the caption says so, not "too small a change"
    kept = run(everything, ["layer1.2.bn2"], 0.0, 10)
    kept["info"]["admissible_alphas"] = [0.0, 0.1]
    base_itself = kde_caption("layer1.2.bn2", samples, {"RiFT with BN": kept})
    assert "kept α = 0, the base's own weights (α within the PGD-10 tolerance on the selection split: 0.0, 0.1;" \
        in base_itself and "too small a change" not in base_itself


def test_figures_split_many_series_and_name_every_mark(tmp_path, monkeypatch):
    """At most eight series per axes, each with its own colour and marker, and a legend entry for every
    series and every mark."""
    from bench import figures

    drawn = []
    save = figures.save
    monkeypatch.setattr(figures, "save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    series = {f"defense {i}": ([1, 2, 3], [i, i + 1, i + 2]) for i in range(11)}
    path = figures.lines(tmp_path / "many.png", [{"title": "t", "xlabel": "x (unit)", "ylabel": "y (%)",
                                                  "series": series, "marks": {"chosen x=2": 2}}])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = drawn
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["t (1/2)", "t (2/2)"]
    shown = []
    for ax in axes:
        curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("chosen")]
        assert len(curves) <= figures.MAX_SERIES
        assert len({ln.get_color() for ln in curves}) == len(curves) and len({ln.get_marker() for ln in curves}) == len(curves)
        legend = [txt.get_text() for txt in ax.get_legend().get_texts()]
        assert legend == [ln.get_label() for ln in curves] + ["chosen x=2"]
        assert ax.get_xlabel() == "x (unit)" and ax.get_ylabel() == "y (%)"
        shown += legend[:-1]
    assert shown == list(series)


def test_figures_draw_intervals_and_the_marked_bar_with_its_legend_marker(tmp_path, monkeypatch):
    """A series given with its interval gets a band of its colour and the legend says what the shading is;
    a marked bar carries the very marker its legend entry shows."""
    from matplotlib.colors import to_rgba

    from bench import figures

    drawn = []
    save = figures.save
    monkeypatch.setattr(figures, "save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    series = {"banded": ([4, 8, 16], [34.0, 29.0, 18.0], ([30.0, 25.0, 15.0], [38.0, 33.0, 22.0])),
              "plain": ([4, 8, 16], [20.0, 10.0, 1.0])}
    figures.lines(tmp_path / "eps.png", [{"xlabel": "ε", "ylabel": "accuracy (%)", "series": series}])
    (ax,) = drawn[-1].axes
    (band,) = ax.collections
    assert to_rgba(band.get_facecolor()[0], 1) == to_rgba(ax.get_lines()[0].get_color())
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == 15.0 and max(ys) == 38.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["banded", "plain", figures.BAND_LABEL]

    figures.bars(tmp_path / "mrc.png", ["conv1", "bn1", "linear"], [0.3, 0.01, 0.2], ["conv", "bn", "conv"],
                 {"bn1"}, ylabel="MRC", title="t", marked_label="fine-tuned")
    ax = drawn[-1].axes[0]
    (star,) = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert list(star.get_xdata()) == [1] and list(star.get_ydata()) == [0.01]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["conv", "bn", "fine-tuned"]
    assert legend.legend_handles[-1].get_marker() == "*"


def test_csv_and_json_hold_numbers(board):
    """One record per (run, cell): clean, every attack under each protocol, every worst case; numbers, not
    strings; JSON adds RobustBench's model_info fields per configuration."""
    dest, _ = board
    import pandas as pd

    frame = pd.read_csv(dest / "digits-tiny_cnn-smoke.csv")
    assert {"defense", "params", "config", "run_id", "seed", "cell", "protocol", "threat", "eps", "n", "correct",
            "accuracy", "ci_low", "ci_high", "status", "incomplete"} <= set(frame.columns)
    assert frame["accuracy"].dtype.kind == "f" and frame["n"].dtype.kind == "i" and frame["eps"].dtype.kind == "f"
    pgd = frame[(frame["defense"] == "pgd_at") & (frame["n"] == 128) & (frame["seed"] == 0)].set_index(["cell", "protocol"])
    assert {("clean", "adaptive"), ("pgd10", "adaptive"), ("fgsm", "adaptive"), ("pgd10[eps=0.05]", "adaptive"),
            ("worst:Linf eps=0.1", "adaptive"), ("worst:Linf eps=0.05", "adaptive")} <= set(pgd.index)
    row = pgd.loc[("pgd10", "adaptive")]
    assert row["accuracy"] == pytest.approx(100 * row["correct"] / row["n"], abs=1e-3) and row["eps"] == 0.1
    assert row["ci_low"] < row["accuracy"] < row["ci_high"]
    assert pgd.loc[("worst:Linf eps=0.1", "adaptive"), "accuracy"] <= min(
        pgd.loc[("pgd10", "adaptive"), "accuracy"], pgd.loc[("fgsm", "adaptive"), "accuracy"])
    shaped = frame[frame["defense"] == "norm_shaping"]
    assert set(shaped["protocol"]) == {"adaptive", "paper", "paper:test_batch"}

    exported = json.loads((dest / "digits-tiny_cnn-smoke.json").read_text())
    assert len(exported["cells"]) == len(frame)
    cell = next(c for c in exported["cells"] if c["defense"] == "pgd_at" and c["cell"] == "pgd10")
    assert isinstance(cell["accuracy"], float) and isinstance(cell["n"], int) and isinstance(cell["params"], dict)
    pgd, pgd_aa = (next(m for m in exported["models"] if m["name"] == "pgd_at" and m["eps"] == "0.1" and m["n"] == n)
                   for n in (128, 32))  # AutoAttack ran on 32 images in a run of its own
    assert isinstance(pgd_aa["autoattack_acc"], float)
    assert isinstance(pgd["clean_acc"], float) and pgd["architecture"] == "tiny_cnn"
    assert (pgd["threat_model"], pgd["eps"], pgd["number_forward_passes"]) == ("Linf", "0.1", 1)  # RobustBench's forms
    shaping = [m for m in exported["models"] if m["name"] == "norm_shaping"]
    assert shaping and all(m["number_forward_passes"] == 1 + m["params"]["infer_ratio"] for m in shaping)
    assert pgd["dataset"] == "digits" and pgd["autoattack_acc"] is None
    assert set(pgd["attacks"]) >= {"pgd10", "fgsm"}


def test_latex_has_the_main_and_family_tables_with_booktabs_rules(board):
    dest, _ = board
    tex = (dest / "digits-tiny_cnn-smoke.tex").read_text()
    floats = tex.split("\\begin{table}")[1:]
    assert len(floats) >= 6 and all("\\toprule" in f and "\\midrule" in f and "\\bottomrule" in f for f in floats)
    main = floats[0]
    assert "Rank & Defense & Clean & Worst L$\\infty$ $\\varepsilon$=0.1 & $\\Delta$ worst vs pgd\\_at" in main
    rift = next(f for f in floats if "\\caption{RiFT top-k" in f)
    assert "Base (PGD-AT) & --- &" in rift and "$\\Delta$ RiFT with BN & 1 &" in rift
    assert "\\caption{Norm shaping" not in tex  # a heading above subsections is no caption: the grids are
    assert "\\caption{Robust accuracy, worst case over adaptive and surrogate attacks (the slides' table IV layout).}" in tex
    # every table's text is escaped: no bare underscore or percent sign outside a label
    body = "\n".join(ln for ln in tex.splitlines() if not ln.startswith(("\\label", "%")))
    assert not re.search(r"(?<!\\)[_%]", body)
    captions = re.findall(r"\\caption\{(.*)\}", tex)
    assert len(captions) == len(floats) == len(set(captions))  # two tables under one heading: told apart


def test_latex_compiles_with_pdflatex(board, tmp_path):
    """The export is \\input into a paper: pdflatex (Debian's texlive, installed by .ci/run) must typeset it
    without an error or an overfull line."""
    from test_page_escaping import compile_latex

    dest, _ = board
    assert "Overfull" not in compile_latex((dest / "digits-tiny_cnn-smoke.tex").read_text(), tmp_path)


def test_html_page_is_written_with_its_figures_inline(board):
    dest, text = board
    page = (dest / "digits-tiny_cnn-smoke.html").read_text()
    assert page.count("data:image/png;base64,") == text.count("![")  # every figure of the markdown, inlined
    assert 'id="leaderboard"' in page and "RiFT top-k" in page and "Base (PGD-AT)" in page
    assert not list(dest.glob("*.html.tmp")) and not list(dest.glob(".*tmp"))


def test_header_says_how_to_regenerate(board):
    _, text = board
    head = text.split("\n\n", 2)[1]
    assert "Regenerate: `bench leaderboard --out" in head and "code" in text.split("\n")[3]
    assert "preset `smoke`" in text.splitlines()[0] or "Preset `smoke`" in text
    assert "Δ in points against `pgd_at`" in text and "{" not in text.split("| Rank", 1)[0]  # no unformatted field


def test_unknown_format(bench, swept, tmp_path):
    _, out = swept
    res = bench("leaderboard", "--out", out, "--dest", tmp_path, "--format", "xlsx")
    assert res.code == 2 and "format must be one of md, html, latex, csv, json, got 'xlsx'" in res.err


def test_fragile_features_table_marks_a_worst_case_over_fewer_or_missing_attacks(tmp_path):
    """Walter et al.'s table shows robust error from worst cases: one over fewer attacks than another row's
    (†) or missing a requested attack (‡) must say so, as the main table does."""
    import numpy as np

    from bench.api import ReportContext
    from bench.leaderboard import Config, Run
    from defenses.fragile_features_report import report

    def cfg(defense, attacks, missing=()):
        flags = np.ones(8, bool)
        cells = {(a, "adaptive"): {"protocol": "adaptive", "threat": "Linf eps=0.1", "flags": flags.copy()} for a in attacks}
        lacking = [{"attack": a, "protocol": "adaptive", "threat": "Linf eps=0.1", "error": None} for a in missing]
        run = {"run_id": defense, "seed": 0, "batch_dependent": 0, "info": {}}
        return Config(defense, {}, [Run(run, flags.copy(), cells, [], lacking)])

    configs = [cfg("pgd_at", ["pgd10", "fgsm"]), cfg("bn_stats", ["pgd10"]),
               cfg("bn_params", ["pgd10"], missing=["fgsm"])]
    rc = ReportContext(configs=configs, dataset="digits", arch="tiny_cnn", preset="smoke", dest=tmp_path, stem="x")
    lines = "\n".join(report(rc)).splitlines()
    rows = {ln.split("|")[1].strip(): ln.split("|")[3].strip() for ln in lines if ln.startswith("| ")}
    assert rows["pgd_at"] == "0.0"
    assert rows["bn_stats"] == "0.0 † without fgsm"
    assert rows["bn_params"] == "0.0 † without fgsm ‡ incomplete: fgsm missing"


def test_an_attack_never_counts_a_sample_wrong_on_its_clean_image_as_robust(tmp_path):
    """A library attack on a batch-dependent defense can return a misclassified image unchanged that the
    perturbed batch then gets classified right; robust accuracy is at most clean accuracy (δ = 0 is in the
    ball), on the board and in its csv/json records."""
    import numpy as np

    from bench.leaderboard import cell_records, load
    from bench.stats import robust_flags
    from bench.store import Store

    clean = np.array([1, 1, 0, 0, 1, 0], bool)
    attacked = np.array([1, 0, 1, 1, 0, 0], bool)  # right under the attack on two images wrong clean
    assert robust_flags(clean, attacked).tolist() == [True, False, False, False, False, False]
    assert robust_flags(None, attacked) is attacked
    store = Store(tmp_path / "results")
    store.put_run({"run_id": "x" * 12, "defense": "norm_shaping", "params": {}, "preset": "smoke",
                   "dataset": "digits", "arch": "tiny_cnn", "seed": 0, "precision": "fp32", "config": {},
                   "command": "bench run", "code_version": "0", "batch_dependent": 1, "randomized": 0,
                   "has_surrogate": 0, "info": {}, "build_seconds": 0.0})
    for attack, flags in (("clean", clean), ("autoattack", attacked)):
        store.put_cell("x" * 12, attack=attack, protocol="-" if attack == "clean" else "adaptive", name=attack,
                       params={}, norm="Linf", eps=0.1, threat="Linf eps=0.1", flags=flags, seconds=1.0, extra={})
    # checks stored by older code judged the raw verdict (3 of 6 above clean's 3): the board judges them again
    store.put_checks("x" * 12, [("worst_case", "fail", "worst 50.00% > clean 50.00%", "✗ stale")])
    cfg, = load(store)
    assert cfg.flags("autoattack")[0].sum() == 1  # not the attack's raw 3 of 6
    check, = cfg.runs[0].checks  # only the check that ran, judged by today's rules
    assert check["name"] == "worst_case" and check["status"] == "pass" and "stale" not in check["flag"]
    assert "16.67%" in check["detail"], check["detail"]
    records = {(r["cell"], r["protocol"]): r for r in cell_records([cfg])}
    assert records["autoattack", "adaptive"]["correct"] == 1
    assert records["clean", "adaptive"]["correct"] == 3
