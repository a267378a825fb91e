"""The norm-shaping slides' tables III and IV from stored norm_shaping runs: a report plugin (entry-point
group bench.reports) for the defense in `defenses/norm_shaping.py`."""

from __future__ import annotations

from bench.api import delta_text


def report(rc) -> list[str]:
    """Training x inference ratio grid (table IV) and adaptive vs non-adaptive attacks (table III)."""
    import pandas as pd

    shaped = rc.find("norm_shaping")
    if not shaped:
        return []
    lines = ["## Norm shaping", ""]
    train_ratios = sorted({c.params.get("train_ratio") for c in shaped})
    infer_ratios = sorted({c.params.get("infer_ratio") for c in shaped})
    threat = next((t for t in rc.threats() if t.startswith("Linf")), None)
    grids = [("clean", "clean", "adaptive", "Clean accuracy")]
    if threat:
        grids.append((f"worst:{threat}", "worst", "adaptive", "Robust accuracy, adaptive attacks (worst case)"))
        grids.append(("pgd10", "pgd10", "paper", "PGD-10 accuracy, non-adaptive (paper protocol: surrogate gradients)"))
    for label, _, protocol, title in grids:
        rows = []
        for tr in train_ratios:
            row = [f"1:{tr}"]
            for ir in infer_ratios:
                cfg = next((c for c in shaped if c.params.get("train_ratio") == tr and c.params.get("infer_ratio") == ir), None)
                text = rc.accuracy(cfg, label, protocol)[0] if cfg is not None else "—"
                if label.startswith("worst:") and text != "—":
                    text += rc.fewer_attacks_mark(cfg, shaped, threat)
                row.append(text)
            rows.append(row)
        if all(cell == "—" for r in rows for cell in r[1:]):
            continue
        frame = pd.DataFrame(rows, columns=["train \\ infer"] + [f"1:{ir}" for ir in infer_ratios])
        lines += [f"### {title} (the slides' table IV layout)", "", frame.to_markdown(index=False, disable_numparse=True), ""]

    base = (rc.find("pgd_at") or [None])[0]
    reference = next((c for c in shaped if c.params.get("train_ratio") == 3 and c.params.get("infer_ratio") == 3), shaped[0])
    attacks = []
    for r in reference.runs:
        for (label, protocol) in r.cells:
            if protocol == "paper" and label not in attacks:
                attacks.append(label)
    if attacks:
        rows = []
        for cfg in [c for c in (base, reference) if c is not None]:
            row = [f"{cfg.defense} ({', '.join(f'{k}={v}' for k, v in sorted(cfg.params.items()) if 'ratio' in k)})",
                   rc.accuracy(cfg, "clean")[0]]
            for label in attacks:
                paper = rc.accuracy(cfg, label, "paper")[0] if cfg.flags(label, "paper") else rc.accuracy(cfg, label)[0]
                row += [paper, rc.accuracy(cfg, label)[0]]
            rows.append(row)
        columns = ["Defense", "Clean"] + [f"{a} {p}" for a in attacks for p in ("non-adaptive", "adaptive")]
        gap = []
        for label in attacks:
            if reference.flags(label, "paper") and reference.flags(label):
                gap.append(f"{label}: paper − adaptive = {_gap_text(rc, reference, label)}")
        lines += ["### Adaptive vs non-adaptive attacks (the slides' table III layout)", "",
                  "Non-adaptive = the paper protocol (gradients of the eval-mode surrogate, scored on the real "
                  "batch-dependent inference); adaptive = gradients through the whole inference batch.", "",
                  pd.DataFrame(rows, columns=columns).to_markdown(index=False, disable_numparse=True), ""]
        lines += [f"- {g}" for g in gap] + [""]
    return lines


def _gap_text(rc, cfg, label: str) -> str:
    return delta_text(cfg.flags(label, "paper"), cfg.flags(label, "adaptive"))
