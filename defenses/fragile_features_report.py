"""Walter et al.'s table from stored bn_stats / bn_params / adv_bn_only runs: a report plugin (entry-point
group bench.reports) for the defenses in `defenses/fragile_features.py`."""

from __future__ import annotations


def report(rc) -> list[str]:
    """Test error and robust test error per BN variant, with the standard and PGD-AT references."""
    threats = [t for t in rc.threats() if t.startswith("Linf")]
    variants = [c for name in ("standard", "pgd_at", "bn_stats", "bn_params", "adv_bn_only") for c in rc.find(name)]
    if not any(c.defense in ("bn_stats", "bn_params", "adv_bn_only") for c in variants):
        return []
    rows = []
    for cfg in variants:
        extra = cfg.params.get("extra") or []
        name = cfg.defense + "".join(f" +{'log' if e == 'logits' else e}" for e in extra)
        clean = rc.accuracy(cfg, "clean")[1]
        row = [name, f"{100 * (1 - clean):.1f}" if clean == clean else "—"]
        for t in threats:
            robust = rc.accuracy(cfg, f"worst:{t}")[1]
            # a worst case over fewer attacks than another row's, or missing a requested one, says so
            row.append([f"{100 * (1 - robust):.1f}", rc.fewer_attacks_mark(cfg, variants, t)] if robust == robust
                       else "—")
        rows.append(row)
    columns = ["Variant", "Test error %"] + [f"Robust test error % ({t})" for t in threats]
    return ["## Fragile features and BN (Walter et al.'s table)", "",
            "Error = 100 − accuracy; robust error uses the worst case over the attacks run († without X: over "
            "fewer attacks than another row; ‡: a requested attack is missing or failed). `+log` / `+conv1`: "
            "the last Linear / first conv also trained.", "",
            rc.table(columns, rows), ""]
