"""The RiFT-with-BN paper's table 1 and figures from stored RiFT / RiFT with BN runs: a report plugin
(entry-point group bench.reports) for the defenses in `defenses/rift.py`."""

from __future__ import annotations

from bench.api import bar_figure, density_figure, embed_figure, line_figure, markdown_text


# The paper's table 1 (the RiFT-with-BN paper; CIFAR-10, ResNet-18, 110 epochs of PGD-AT): what ours is read against.
PAPER = "base 81.45 / 53.75; RiFT k = 1: +1.69 / +0.16; RiFT with BN k = 3: +1.17 / +0.23 (clean / PGD-10)"


def variant(rc, defense: str, k: int, selection: str = "val", ascent: str = "sgd"):
    """The first configuration of `defense` at top-k `k` with that selection split and MRC ascent (runs stored
    before `mrc_ascent` existed used the code's sgd), the one evaluated with PGD-10 where several differ only
    in their test images."""
    hits = [c for c in rc.find(defense, k=k) if not c.params.get("modules")
            and c.params.get("selection", "val") == selection and c.params.get("mrc_ascent", "sgd") == ascent]
    return next((c for c in hits if c.flags("pgd10")), hits[0] if hits else None)


def report(rc) -> list[str]:
    """RiFT vs RiFT with BN for k = 1..5 against the PGD-AT base; MRC bars, alpha curves, BN-output KDE."""
    bases = rc.find("pgd_at")
    rift = {k: variant(rc, "rift", k) for k in range(1, 6)}
    rift_bn = {k: variant(rc, "rift_bn", k) for k in range(1, 6)}
    if not any(rift.values()) and not any(rift_bn.values()):
        return []
    base = next((c for c in bases if c.flags("pgd10")), bases[0] if bases else None)
    # beside the paper's rows: RiFT selecting on the test split (the code), BN MRCs by normalized ascent (ours)
    extra = [(f"{name}, {what}", k, cfg) for name, defense, what, kw in (
        ("RiFT", "rift", "selection on test", dict(selection="test")),
        ("RiFT with BN", "rift_bn", "selection on test", dict(selection="test")),
        ("RiFT with BN", "rift_bn", "normalized MRC ascent (ours)", dict(ascent="normalized")))
        for k in range(1, 6) if (cfg := variant(rc, defense, k, **kw)) is not None]
    everyone = [c for c in [base, *rift.values(), *rift_bn.values(), *(c for _, _, c in extra)] if c is not None]
    aa = next((lab for lab in ("autoattack", "autoattack_rand") if any(rc.evaluated(c, lab) for c in everyone)), None)
    base_aa = rc.evaluated(base, aa) if aa and base is not None else None
    aa_sizes = sorted({len(f) for c in everyone if aa and (e := rc.evaluated(c, aa)) for f in e.flags(aa).values()})
    columns = ["Method", "k", "Normal Acc", "Adv Acc (PGD-10)"] + (["AutoAttack"] if aa else [])

    def values(cfg):
        out = [rc.accuracy(cfg, "clean")[0], rc.accuracy(cfg, "pgd10")[0]]
        return out + ([rc.accuracy(e, aa)[0] if (e := rc.evaluated(cfg, aa)) else "—"] if aa else [])

    def deltas(cfg):
        out = [rc.delta(cfg, base, "clean"), rc.delta(cfg, base, "pgd10")]
        if aa:
            mine = rc.evaluated(cfg, aa)
            out.append(rc.delta(mine, base_aa, aa) if mine and base_aa else "—")
        return out

    rows = []
    if base is not None:
        rows.append(["Base (PGD-AT)", "—", *values(base)])
    listed = [(name, k, cfg) for k in range(1, 6) for name, cfg in (("RiFT", rift[k]), ("RiFT with BN", rift_bn[k]))
              if cfg is not None] + extra
    for name, k, cfg in listed:
        rows.append([name, str(k), *values(cfg)])
        if base is not None:
            rows.append([f"Δ {name}", str(k), *deltas(cfg)])
    sizes = sorted({len(f) for c in everyone for f in c.flags("pgd10").values()})
    lines = ["## RiFT top-k (the RiFT-with-BN paper's table 1 format)", "",
             "Normal and PGD-10 accuracy in % on the test set (95% Wilson interval); Δ rows in points against "
             "the PGD-AT base with the exact McNemar p-value (ns: inside the noise), paired on the seeds both rows "
             "have (a base with several seeds shows mean ± std over all of them). "
             + (f"PGD-10 on the first {', '.join(map(str, sizes))} test images"
                + (f", AutoAttack on the first {', '.join(map(str, aa_sizes))}" if aa_sizes else "") + ". "
                if sizes else "")
             + f"The paper (CIFAR-10, ResNet-18, 110 epochs): {PAPER}.", "",
             rc.table(columns, rows), ""]

    detail = []
    seeded = any(len(cfg.runs) > 1 for _, _, cfg in listed)  # each seed chose its own modules and α
    for name, k, cfg in listed:
        for run in cfg.runs:
            info = run.run["info"]
            chosen = next(r for r in info["alpha_curve"] if r["alpha"] == info["alpha"])
            detail.append([name, str(k)] + ([str(run.run["seed"])] if seeded else [])
                          + [", ".join(info["chosen"]), f"{info['alpha']:.1f}",
                             f"{100 * chosen['clean']:.1f} / {100 * chosen['robust']:.1f}",
                             f"{100 * info['base_selection']['robust']:.1f}", info["selection"]])
    if detail:
        lines += ["Chosen modules (lowest MRC first), the interpolation weight α and the selection-split "
                  "clean / PGD-10 accuracy at that α against the base's robust accuracy there"
                  + (", per seed" if seeded else "") + ":", "",
                  rc.table(["Method", "k"] + (["Seed"] if seeded else [])
                           + ["Fine-tuned modules", "α", "Selection clean / robust", "Base robust", "Split"], detail),
                  ""]
    lines += mrc_ranking(rc, [(a, variant(rc, "rift_bn", 1, ascent=a)) for a in ("sgd", "normalized")])

    source = rift_bn[1] or next((c for c in rift_bn.values() if c), None) or rift[1]
    if source is not None:
        info = source.runs[0].run["info"]
        rows = sorted(info["candidates"], key=lambda r: r["order"])
        path = bar_figure(rc.figure("mrc"), [r["module"] for r in rows], [r["mrc"] for r in rows],
                            ["BN" if r["kind"] == "bn" else "Conv/Linear" for r in rows], set(info["chosen"]),
                            ylabel="MRC (increase of the robust loss)", xlabel="module, in forward order",
                            title=f"Module robust criticality, {source.defense} k={source.params.get('k', 1)}",
                            marked_label="fine-tuned (lowest MRC)")
        lines += ["### Module robust criticality", "",
                  "BN MRCs perturb [γ; β], conv MRCs the weight; γ is not scale-invariant, so the two colours are "
                  "not on one scale.", ""] + embed_figure(path, "MRC per module")
    panels = []
    for name, cfg in (("RiFT", rift[1]), ("RiFT with BN", rift_bn[1])):
        if cfg is None:
            continue
        info = cfg.runs[0].run["info"]
        curve = info["alpha_curve"]
        xs = [r["alpha"] for r in curve]
        panels.append({"title": f"{name} k=1 ({info['selection']} split)",
                       "xlabel": "α (weight of the fine-tuned parameters)", "ylabel": "accuracy (%)",
                       "series": {"clean": (xs, [100 * r["clean"] for r in curve]),
                                  "PGD-10": (xs, [100 * r["robust"] for r in curve])},
                       "marks": {f"chosen α={info['alpha']:.1f}": info["alpha"]}})
    if panels:
        lines += ["### Interpolation α", ""] + embed_figure(line_figure(rc.figure("alpha"), panels), "alpha curves")
    bn_cfg = rift_bn[1]
    if bn_cfg is not None and "bn_outputs" in bn_cfg.runs[0].run["info"]:
        info = bn_cfg.runs[0].run["info"]
        layer = next((r["module"] for r in info["candidates"] if r["kind"] == "bn"), None)
        samples = {"PGD-AT base": info["bn_outputs"]["base"].get(layer, [])}
        if rift[1] is not None and "bn_outputs" in rift[1].runs[0].run["info"]:
            samples["RiFT"] = rift[1].runs[0].run["info"]["bn_outputs"]["final"].get(layer, [])
        samples["RiFT with BN"] = info["bn_outputs"]["final"].get(layer, [])
        samples = {k: v for k, v in samples.items() if v}
        if layer and len(samples) >= 2:
            path = density_figure(rc.figure("bn-kde"), samples, xlabel=f"output of {layer} (after BN's affine map)",
                                     title=f"{layer} (lowest-MRC BN) on each model's own PGD-10 examples")
            models = {"RiFT": rift[1].runs[0].run if rift[1] is not None else None, "RiFT with BN": bn_cfg.runs[0].run}
            lines += ["### BN outputs on adversarial examples (the seed paper's figure 3)", ""] + \
                embed_figure(path, "KDE of BN outputs") + [kde_caption(layer, samples, models), ""]
    return lines


def kde_caption(layer: str, samples: dict[str, list[float]], runs: dict) -> str:
    """What the KDE shows, measured: each fine-tuned model's two-sample KS distance to the base at `layer`,
    and, where the curves coincide, why (which modules each model fine-tuned, and at which α); markdown, the
    module names and the run's settings escaped."""
    from scipy.stats import ks_2samp

    base = samples.get("PGD-AT base")
    # The network order of modules, from a run that ranked `layer` itself: a conv-only RiFT run's candidate
    # list lacks the BN layers, so its own order cannot place the layer.
    orders = [{r["module"]: r["order"] for r in run["info"]["candidates"]} for run in runs.values() if run]
    order = next((o for o in orders if layer in o), {})
    parts, why, differ = [], [], False
    for name, run in runs.items():
        if run is None or name not in samples or base is None:
            continue
        info = run["info"]
        test = ks_2samp(base, samples[name])
        differ |= test.pvalue < 0.05
        parts.append(f"{name} {test.statistic:.3f} (p={test.pvalue:.2g})")
        chosen = info["chosen"]
        modules = ", ".join(markdown_text(m) for m in chosen)
        mix = f"α = {info['alpha']:.1f} of the fine-tuned ones and {1 - info['alpha']:.1f} of the base's"
        placed = [order[m] for m in chosen if m in order]
        if info["alpha"] == 0:
            kept = ", ".join(f"{a:.1f}" for a in info.get("admissible_alphas", [])) or "none"
            why.append(f"{name}'s α search kept α = 0, the base's own weights (α within the PGD-10 tolerance on the "
                       f"selection split: {kept}; none of them raised clean accuracy), so the model is the base")
        elif layer in chosen:
            # the run's own fine-tuning (its params override the preset's ft_epochs / ft_lr)
            preset = (run.get("config") or {}).get("preset", {})
            epochs = len((info.get("finetune") or {}).get("history") or []) or preset.get("ft_epochs", "?")
            lr = (run.get("params") or {}).get("lr", preset.get("ft_lr", "?"))
            why.append(f"{name} fine-tuned this layer, but its γ, β are α = {info['alpha']:.1f} of the fine-tuned "
                       f"values and {1 - info['alpha']:.1f} of the base's after {markdown_text(epochs)} epochs at "
                       f"learning rate {markdown_text(lr)}: too small a change to move its outputs")
        elif chosen and len(placed) == len(chosen) and min(placed) > order[layer]:
            why.append(f"{name} fine-tuned only modules after this layer ({modules}), so up to it the "
                       f"model is the base and its outputs differ only through its own PGD-10 examples")
        elif chosen and len(placed) == len(chosen) and max(placed) < order[layer]:
            why.append(f"{name} fine-tuned {modules}, before this layer, and its weights are {mix}")
        else:
            why.append(f"{name} fine-tuned {modules}, and its weights are {mix}")
    text = f"*Two-sample Kolmogorov-Smirnov distance to the base's outputs: {'; '.join(parts)}.*"
    if parts and not differ:
        text += (f" *The curves coincide (no distance is significant at n = {len(base)}): "
                 + "; ".join(why) + ". The paper's figure 3 compares these distributions to show what fine-tuning "
                 "changed; here it changed nothing measurable at this layer.*")
    return text


def mrc_ranking(rc, tables: list) -> list[str]:
    """Where the BN criticalities fall among the Conv/Linear ones, and whether each ascent reached its ball,
    for each MRC ascent that ran (RiFT with BN, k = 1): a low BN MRC from an ascent stopped inside its ball
    says little about the layer."""
    import statistics

    rows, notes = [], []
    for ascent, cfg in tables:
        if cfg is None:
            continue
        cands = cfg.runs[0].run["info"]["candidates"]  # lowest MRC first
        eps = float(cfg.params.get("mrc_eps", 0.1))
        for is_bn, label in ((True, "BN"), (False, "Conv/Linear")):
            mine = [(rank, r) for rank, r in enumerate(cands, 1) if (r["kind"] == "bn") == is_bn]
            if not mine:
                continue
            mrcs = [r["mrc"] for _, r in mine]
            ratios = [r["max_delta_ratio"] for _, r in mine]
            rows.append([ascent, label, str(len(mine)),
                         f"{min(mrcs):.3g} / {statistics.median(mrcs):.3g} / {max(mrcs):.3g}",
                         f"{min(ratios):.3f} – {max(ratios):.3f}",
                         f"{sum(x >= 0.99 * eps for x in ratios)} of {len(mine)}", str(mine[0][0])])
        bn = [r["mrc"] for r in cands if r["kind"] == "bn"]
        conv = [r["mrc"] for r in cands if r["kind"] != "bn"]
        if bn and conv:
            notes.append(f"- {ascent}: {sum(b < min(conv) for b in bn)} of {len(bn)} BN MRCs lie below every "
                         f"Conv/Linear MRC; the five lowest: "
                         + ", ".join(f"{markdown_text(r['module'])} ({'BN' if r['kind'] == 'bn' else 'conv'})"
                                     for r in cands[:5]))
    if not rows:
        return []
    return ["### MRC ranking: BN against Conv/Linear", "",
            "RiFT with BN, k = 1: each kind's MRCs (min / median / max), how far its ascents moved the weights "
            "(max ‖Δ‖/‖W₀‖; the ball's radius is mrc_eps), how many reached the ball (≥ 0.99 of the radius), "
            "and the rank of its lowest module among all candidates. `sgd` is the code's ascent; `normalized` "
            "(ours, not the papers') steps a quarter of the radius along the gradient so every module can reach "
            "its ball.", "",
            rc.table(["MRC ascent", "Kind", "Modules", "MRC min / median / max", "‖Δ‖/‖W₀‖", "Reached the ball",
                      "Lowest rank"], rows), "", *notes, ""]
