"""The RiFT-with-BN paper's figures 1 and 2 from stored ft_bn / ft_conv / ft_full runs: a report plugin
(entry-point group bench.reports) for the defenses in `defenses/layer_finetune.py`."""

from __future__ import annotations

from bench.api import embed_figure, line_figure


def report(rc) -> list[str]:
    """Clean and PGD-10 accuracy per fine-tuning epoch for ft_bn / ft_conv / ft_full."""
    found = {g: (rc.find(f"ft_{g}") or [None])[0] for g in ("bn", "conv", "full")}
    found = {g: c for g, c in found.items() if c is not None}
    if not found:
        return []
    clean, robust, rows = {}, {}, []
    for group, cfg in found.items():
        info = cfg.runs[0].run["info"]
        curve = info["curve"]
        xs = [c["epoch"] for c in curve]
        clean[f"ft_{group}"] = (xs, [100 * c["clean"] for c in curve])
        robust[f"ft_{group}"] = (xs, [100 * c["pgd10"] for c in curve])
        rows.append([f"ft_{group}", info["trainable_parameters"], f"{100 * curve[0]['clean']:.1f} → {100 * curve[-1]['clean']:.1f}",
                     f"{100 * curve[0]['pgd10']:.1f} → {100 * curve[-1]['pgd10']:.1f}",
                     rc.accuracy(cfg, "clean")[0], rc.accuracy(cfg, "pgd10")[0]])
    split = next(iter(found.values())).runs[0].run["info"]["curve_split"]
    path = line_figure(rc.figure("finetune-curves"), [
        {"title": f"clean accuracy ({split} split)", "xlabel": "fine-tuning epoch", "ylabel": "accuracy (%)",
         "series": clean},
        {"title": f"PGD-10 accuracy ({split} split)", "xlabel": "fine-tuning epoch", "ylabel": "accuracy (%)",
         "series": robust}])
    table = rc.table(["Defense", "Trained parameters", f"Clean ({split}) epoch 0 → last",
                      f"PGD-10 ({split}) epoch 0 → last", "Clean (test)", "PGD-10 (test)"], rows)
    return ["## Layer-type fine-tuning from the PGD-AT model (the seed paper's figures 1-2)", "",
            table, ""] + embed_figure(path, "fine-tuning curves")
