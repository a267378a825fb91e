"""The norm-shaping slides' tables III and IV from stored norm_shaping runs: a report plugin (entry-point
group bench.reports) for the defense in `defenses/norm_shaping.py`.

Every paper protocol that ran is shown on its own, named by its surrogate (`eval`, `test_batch`,
`init_stats`): which of them, if any, reproduces the slides' non-adaptive numbers is the question.
"""

from __future__ import annotations

from bench.api import Markdown, delta_text, markdown_code, markdown_text

from defenses.norm_shaping import NormShaping

ADAPTIVE = "adaptive"


def _surrogate(rc, protocol: str, configs: list) -> str:
    return rc.surrogate(protocol, configs) or "default"


def _grid(shaped: list, cell) -> list[list]:
    train_ratios = sorted({c.params.get("train_ratio") for c in shaped})
    infer_ratios = sorted({c.params.get("infer_ratio") for c in shaped})
    rows = []
    for tr in train_ratios:
        row = [f"1:{tr}"]
        for ir in infer_ratios:
            cfg = next((c for c in shaped if c.params.get("train_ratio") == tr and c.params.get("infer_ratio") == ir),
                       None)
            row.append(cell(cfg) if cfg is not None else "—")
        rows.append(row)
    return rows


def _empty(rows: list[list]) -> bool:
    """Whether a grid shows nothing: every cell '—' (a cell of pieces carries a number and its mark)."""
    return all(isinstance(text, str) and text.startswith("—") for r in rows for text in r[1:])


def report(rc) -> list[str]:
    """Training x inference ratio grids (table IV) and adaptive vs non-adaptive attacks (table III)."""
    shaped = rc.find("norm_shaping")
    if not shaped:
        return []
    lines = ["## Norm shaping", ""]
    infer_ratios = sorted({c.params.get("infer_ratio") for c in shaped})
    columns = [Markdown("train \\ infer")] + [f"1:{ir}" for ir in infer_ratios]
    threat = next((t for t in rc.threats() if t.startswith("Linf")), None)
    papers = [p for p in rc.protocols(shaped) if p != ADAPTIVE]

    def accuracy(label, protocol):
        def cell(cfg):
            text = rc.accuracy(cfg, label, protocol)[0]
            if label.startswith("worst:") and text != "—":
                return [text, rc.fewer_attacks_mark(cfg, shaped, threat)]
            return text
        return cell

    def gap(label, protocol):
        return lambda cfg: delta_text(cfg.flags(label, protocol), cfg.flags(label, ADAPTIVE))

    grids = [("Clean accuracy", accuracy("clean", ADAPTIVE))]
    if threat:
        grids.append(("Robust accuracy, worst case over adaptive and surrogate attacks",
                      accuracy(f"worst:{threat}", ADAPTIVE)))
        for protocol in papers:
            name = markdown_text(_surrogate(rc, protocol, shaped))
            grids.append((f"PGD-10 accuracy, non-adaptive: attacks on the {name} surrogate",
                          accuracy("pgd10", protocol)))
            grids.append((f"PGD-10, {name} surrogate minus adaptive, in points (paired McNemar test)",
                          gap("pgd10", protocol)))
    for title, cell in grids:
        rows = _grid(shaped, cell)
        if _empty(rows):
            continue
        lines += [f"### {title} (the slides' table IV layout)", "", rc.table(columns, rows), ""]
    return lines + _table_iii(rc, shaped, papers)


def _table_iii(rc, shaped: list, papers: list[str]) -> list[str]:
    base = (rc.find("pgd_at") or [None])[0]
    reference = next((c for c in shaped if c.params.get("train_ratio") == 3 and c.params.get("infer_ratio") == 3),
                     shaped[0])
    cells = [key for r in reference.runs for key in r.cells]
    attacks = list(dict.fromkeys(label for label, protocol in cells if protocol != ADAPTIVE))
    if not attacks:
        return []
    # then the attacks only the adaptive protocol ran (the `shaping` attack), so that the adaptive row shows
    # every adaptive attack, not only the counterparts of the surrogates' attacks
    attacks = list(dict.fromkeys(attacks + [label for label, protocol in cells if protocol == ADAPTIVE]))
    ratios = ", ".join(f"{k}={v}" for k, v in sorted(reference.params.items()) if "ratio" in k)
    rows = []
    if base is not None:
        rows.append([base.defense, "adaptive (no surrogate)", rc.accuracy(base, "clean")[0]] +
                    [rc.accuracy(base, a)[0] for a in attacks])
    ran = [p for p in papers if any(reference.flags(a, p) for a in attacks)]
    for protocol in ran + [ADAPTIVE]:
        kind = "adaptive" if protocol == ADAPTIVE else f"non-adaptive, {_surrogate(rc, protocol, [reference])} surrogate"
        rows.append([f"norm_shaping ({ratios})", kind, rc.accuracy(reference, "clean")[0]] +
                    [rc.accuracy(reference, a, protocol)[0] if reference.flags(a, protocol) else "—" for a in attacks])
    lines = ["### Adaptive vs non-adaptive attacks (the slides' table III layout)", "",
             "Non-adaptive = a paper protocol: the attack differentiates a surrogate and the real batch-dependent "
             "inference is scored on its images; adaptive = gradients through the whole inference batch. The "
             "surrogates:", ""]
    lines += [f"- {markdown_code(name)}: {text}" for name, text in NormShaping.SURROGATES.items()]
    lines += ["", rc.table(["Defense", "Attacks", "Clean"] + attacks, rows), ""]
    for protocol in ran:
        name = markdown_text(_surrogate(rc, protocol, [reference]))
        for label in attacks:
            if reference.flags(label, protocol) and reference.flags(label):
                lines.append(f"- {markdown_text(label)}, {name} surrogate − adaptive = "
                             f"{delta_text(reference.flags(label, protocol), reference.flags(label, ADAPTIVE))}")
    return lines + [""]
