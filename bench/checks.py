"""Sanity checks that decide whether a robustness number could have been fooled (METHODS.md, evaluation
protocol). Each returns a CheckResult (pass / warn / fail / skip, a detail string, and the short flag the
leaderboard prints). Numbered as in the issue:

 1 state_preserved      attacks left parameters, buffers and module modes untouched
 2 budget               every adversarial example inside its (norm, eps) + 1e-6 and [0,1], no NaN
 3 determinism          two forwards of one batch agree; otherwise the defense is randomized
 4 batch_dependence     batch-of-1 vs batch-of-B logits differ -> batch_dependent must be declared
 5 gradient_health      zero / NaN / inf input gradients on more than 1% of samples
 6 large_eps            PGD at eps = min(1, 8 x eps) (64/255 at 8/255) leaves <= 5% accuracy
 7 budget_monotonicity  no attack leaves more accuracy than one it declares itself stronger than
                        (Attack.stronger_than), beyond noise (McNemar p < 0.05)
 8 blackbox_whitebox    no black-box attack beats the best white-box attack of its threat model by more
                        than 0.2 pt (Attack.access)
 9 worst_case           the worst case is at most the minimum over attacks, per threat model
10 protocol_gap         paper-protocol accuracy above the adaptive one beyond noise: overestimated (each
                        paper protocol, i.e. each surrogate, compared on its own and named); below it beyond
                        noise: the adaptive attack is weaker than its transfer from that surrogate

Checks 7 and 8 know no attack by name: they read what each cell's attack declares (bench.api.Attack).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench import registry, state, stats
from bench.config import default_surrogate
from bench.contract import ADAPTIVE, surrogate_of
from bench.evaluator import require_finite
from bench.projected_gradient import pgd
from bench.stats import mcnemar

ORDER = ["state_preserved", "budget", "determinism", "batch_dependence", "gradient_health", "large_eps",
         "budget_monotonicity", "blackbox_whitebox", "worst_case", "protocol_gap"]


UNDECLARED_RANDOMNESS = "⚠ undeclared randomness"


@dataclass
class CheckResult:
    name: str
    status: str  # pass | warn | fail | skip
    detail: str
    flag: str = ""  # what the leaderboard prints when the status is warn/fail
    # determinism only: two forwards differ though the defense does not declare randomized=True, so it is
    # attacked as randomized from then on (EOT attacks, repeated verdicts)
    found_randomness: bool = False

    def row(self) -> tuple[str, str, str, str]:
        return self.name, self.status, self.detail, self.flag

    @classmethod
    def from_row(cls, row: dict) -> CheckResult:
        """A stored check (`row()`'s columns). The checks table has no column of its own for
        `found_randomness`: the determinism check's flag says it."""
        return cls(row["name"], row["status"], row["detail"], row["flag"],
                   found_randomness=row["name"] == "determinism" and row["flag"] == UNDECLARED_RANDOMNESS)


# ----------------------------------------------------------------------------------------------------
# probes of the defended model (3-6), on the first batch
#
# Each probe's logits must be finite, as a cell's must (bench.evaluator): NaN differs from itself, has no
# argmax but class 0 and no gradient, so it would read as randomness, batch dependence, gradient masking and
# a model surviving a huge budget. Such a model fails with NonFiniteLogits, as its clean cell would.


def _logits(model: torch.nn.Module, x: torch.Tensor, check: str) -> torch.Tensor:
    return require_finite(model(x), f"of the first test batch (check {check})", "no check or cell can judge it")


@torch.no_grad()
def determinism(model: torch.nn.Module, x: torch.Tensor, declared: bool) -> CheckResult:
    with state.preserved(model):
        a, b = _logits(model, x, "determinism"), _logits(model, x, "determinism")
    same = torch.equal(a, b)
    gap = float((a - b).abs().max())
    if same and not declared:
        return CheckResult("determinism", "pass", "two forwards of the first batch are identical")
    if same and declared:
        return CheckResult("determinism", "warn", "declared randomized, but two forwards are identical")
    if declared:
        return CheckResult("determinism", "pass", f"randomized as declared (max |logit difference| {gap:.3g})")
    return CheckResult("determinism", "warn", f"two forwards of one batch differ (max |logit difference| "
                       f"{gap:.3g}) but the defense does not declare randomized=True: treated as randomized "
                       f"(EOT attacks, repeated verdicts)", UNDECLARED_RANDOMNESS, found_randomness=True)


@torch.no_grad()
def batch_dependence(model: torch.nn.Module, x: torch.Tensor, declared: bool, randomized: bool,
                     probes: int = 8) -> CheckResult:
    if randomized:
        return CheckResult("batch_dependence", "skip", "randomized defense: batch effects cannot be told apart")
    k = min(probes, len(x))
    with state.preserved(model):
        together = _logits(model, x, "batch_dependence")[:k]
        alone = torch.cat([_logits(model, x[i:i + 1], "batch_dependence") for i in range(k)])
    scale = float(together.abs().max()) + 1.0
    gap = float((together - alone).abs().max())
    flips = int((together.argmax(1) != alone.argmax(1)).sum())
    dependent = gap > 1e-3 * scale
    detail = f"batch of 1 vs batch of {len(x)}: max |logit difference| {gap:.3g}, {flips}/{k} predictions change"
    if dependent and not declared:
        return CheckResult("batch_dependence", "fail", detail + "; the defense does not declare "
                           "batch_dependent=True", "⚠ batch-dependent: adaptive attack required")
    if not dependent and declared:
        return CheckResult("batch_dependence", "warn", detail + "; declared batch-dependent but it is not")
    return CheckResult("batch_dependence", "pass", detail + ("; declared" if declared else ""))


def gradient_health(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> CheckResult:
    """Input gradients of the CW margin (it does not vanish when a confident softmax saturates)."""
    with state.preserved(model):
        xr = x.clone().requires_grad_(True)
        logits = _logits(model, xr, "gradient_health").float()
        real = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        grad, = torch.autograd.grad((other - real).sum(), xr)
    flat = grad.flatten(1)
    bad = (~torch.isfinite(flat)).any(1) | (flat == 0).all(1)
    share = float(bad.float().mean())
    detail = f"{int(bad.sum())}/{len(x)} samples with zero or non-finite input gradients"
    if share > 0.01:
        return CheckResult("gradient_health", "fail", detail + ": gradient masking or a non-differentiable step",
                           "⚠ gradient masking")
    return CheckResult("gradient_health", "pass", detail)


def large_eps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
              generator: torch.Generator | None = None) -> CheckResult:
    big = min(1.0, 8 * eps)
    with state.preserved(model):
        x_adv = pgd(model, x, y, eps=big, alpha=big / 4, steps=20, generator=generator)
        with torch.no_grad():
            acc = float((_logits(model, x_adv, "large_eps").argmax(1) == y).float().mean())
    detail = f"PGD-20 at eps {big:.4g} (8 x eps): {acc:.1%} accuracy on {len(x)} samples"
    if acc > 0.05:
        return CheckResult("large_eps", "fail", detail + " (> 5%: gradient masking or a broken attack path)",
                           "⚠ survives a huge budget")
    return CheckResult("large_eps", "pass", detail)


PROBES = ("determinism", "batch_dependence", "gradient_health", "large_eps")


def probe(defended, x: torch.Tensor, y: torch.Tensor, eps: float, generator=None) -> list[CheckResult]:
    """Checks 3-6 on one batch of the defended model (the adaptive target), in PROBES order."""
    model = defended.model
    out = [determinism(model, x, defended.randomized)]
    randomized = defended.randomized or out[0].found_randomness
    out.append(batch_dependence(model, x, defended.batch_dependent, randomized))
    out.append(gradient_health(model, x, y))
    out.append(large_eps(model, x, y, eps, generator))
    return out


# ----------------------------------------------------------------------------------------------------
# checks over the stored cells (1, 2, 7-10)


def _acc(cell) -> float:
    return cell["correct"] / cell["n"] if cell["n"] else float("nan")


def state_preserved(cells: list[dict]) -> CheckResult:
    bad = [c["attack"] for c in cells if c["extra"].get("state_changed")]
    if bad:
        return CheckResult("state_preserved", "fail", f"the model changed during {', '.join(sorted(set(bad)))} "
                           "(restored before the next attack)", "⚠ attack changed the model")
    return CheckResult("state_preserved", "pass", f"parameters, buffers and modes identical after {len(cells)} cells")


def budget(cells: list[dict]) -> CheckResult:
    bad = [f"{c['attack']} ({c['extra'].get('outside_budget', 0)} outside, {c['extra'].get('nonfinite', 0)} NaN)"
           for c in cells if c["extra"].get("outside_budget", 0) or c["extra"].get("nonfinite", 0)]
    if bad:
        return CheckResult("budget", "fail", "adversarial examples outside the budget or [0,1]: " + "; ".join(bad),
                           "⚠ outside the threat model")
    return CheckResult("budget", "pass", f"every example within its (norm, eps) + 1e-6 (relative above 1) and [0,1] in {len(cells)} cells")


def declarations(by_name: dict[str, dict]) -> dict[str, type]:
    """The attack class of each cell that ran at its attack's default parameters (its label is the
    registered name; declarations describe an attack as registered, not `name[key=value]`), in cell order.
    Cells of attacks no longer installed are left out."""
    out = {}
    for label, cell in by_name.items():
        cls = registry.declared("attack", label) if cell.get("name", label) == label else None
        if cls is not None:
            out[label] = cls
    return out


def budget_monotonicity(by_name: dict[str, dict]) -> CheckResult:
    declared = declarations(by_name)
    pairs = [(weak, strong) for strong, cls in declared.items() for weak in cls.stronger_than
             if weak in declared and by_name[weak]["threat"] == by_name[strong]["threat"]]
    if not pairs:
        wanted = [f"{weak} beside {strong}" for strong, cls in declared.items() for weak in cls.stronger_than]
        return CheckResult("budget_monotonicity", "skip", f"needs {' or '.join(wanted)} in the same run" if wanted
                           else "no attack of this run declares one it must be stronger than")

    def height(name: str, seen: tuple = ()) -> int:  # links of weaker attacks that ran below `name`
        return max((1 + height(w, seen + (name,)) for w, s in pairs if s == name and w not in seen), default=0)

    problems, notes = [], []
    for weak, strong in sorted(pairs, key=lambda p: -height(p[1])):  # the strongest attack's pair first
        test = mcnemar(by_name[weak]["flags"], by_name[strong]["flags"])  # delta = strong - weak
        notes.append(f"{strong} {_acc(by_name[strong]):.1%} vs {weak} {_acc(by_name[weak]):.1%} (p={test.p_value:.3g})")
        if test.delta > 0 and test.significant:
            problems.append(f"{strong} leaves more accuracy than {weak}")
    if problems:
        return CheckResult("budget_monotonicity", "fail", "; ".join(problems + notes),
                           "⚠ stronger attack is weaker: gradient masking?")
    return CheckResult("budget_monotonicity", "pass", "; ".join(notes))


def blackbox_whitebox(by_name: dict[str, dict]) -> CheckResult:
    declared = declarations(by_name)
    black = [n for n, cls in declared.items() if cls.access == "black-box"]
    if not black:
        return CheckResult("blackbox_whitebox", "skip", "no black-box attack run")
    details, beaten = [], False
    for name in black:
        threat = by_name[name]["threat"]
        white = {n: by_name[n] for n, cls in declared.items()
                 if cls.access == "white-box" and by_name[n]["threat"] == threat}
        if not white:
            continue
        best_name = min(white, key=lambda n: _acc(white[n]))
        bb, wb = _acc(by_name[name]), _acc(white[best_name])
        details.append(f"{name} {bb:.2%} vs best white-box {best_name} {wb:.2%}")
        beaten |= bb < wb - 0.002
    if not details:
        return CheckResult("blackbox_whitebox", "skip", "no white-box attack of the same threat model")
    if beaten:
        return CheckResult("blackbox_whitebox", "fail", "; ".join(details) + ": a black-box attack beats the "
                           "gradient attacks (gradient masking, or white-box attacks too weak for this model)",
                           "⚠ black-box beats white-box")
    return CheckResult("blackbox_whitebox", "pass", "; ".join(details))


def worst_case(clean: np.ndarray | None, cells: list[dict]) -> CheckResult:
    """`cells`: one protocol's."""
    threats = list(dict.fromkeys(c["threat"] for c in cells))
    if clean is None or not threats:
        return CheckResult("worst_case", "skip", "no attack cells")
    details, ok = [], True
    for threat in threats:
        flags = stats.worst_case(clean, cells, threat)
        worst, floor = float(flags.mean()), min(_acc(c) for c in cells if c["threat"] == threat)
        ok &= worst <= floor + 1e-12
        details.append(f"{threat}: worst {worst:.2%} <= min {floor:.2%}")
    return CheckResult("worst_case", "pass" if ok else "fail", "; ".join(details))


def protocol_gap(adaptive: dict[str, dict], papers: dict[str, dict[str, dict]], has_surrogate: bool,
                 default_surrogate: str = "") -> CheckResult:
    """`papers`: protocol (paper, paper:NAME) -> that protocol's cells by attack. Every surrogate whose attacks
    leave more accuracy than the same adaptive attack, beyond noise (paired McNemar), is named in the flag."""
    if not has_surrogate:
        return CheckResult("protocol_gap", "skip", "no surrogate: the paper protocol is the adaptive one")
    if not any(n in cells for cells in papers.values() for n in adaptive):
        return CheckResult("protocol_gap", "skip", "run the same attack with --protocol paper (or "
                                                   "paper:SURROGATE) and adaptive")
    over: dict[str, float] = {}  # surrogate -> its largest significant overestimate
    under: dict[str, float] = {}  # surrogate -> the largest margin by which its transfer beat the adaptive attack
    notes = []
    for protocol, cells in papers.items():
        who = surrogate_of(protocol) or default_surrogate or "surrogate"
        for name in [n for n in adaptive if n in cells]:
            test = mcnemar(adaptive[name]["flags"], cells[name]["flags"])  # delta = paper - adaptive
            notes.append(f"{name} on {who}: paper {_acc(cells[name]):.1%} vs adaptive {_acc(adaptive[name]):.1%} "
                         f"(p={test.p_value:.3g})")
            if test.significant:
                side = over if test.delta > 0 else under
                side[who] = max(side.get(who, 0.0), abs(test.delta))
    # The reverse gap: an attack crafted on a surrogate fools more than the same attack differentiating the
    # whole defense, so the adaptive gradients are the weaker ones (as a black-box attack beating a white-box
    # one, check 4). The adaptive worst case counts both attacks' failures (bench.leaderboard).
    flags, what = [], []
    if over:
        flags.append("paper protocol overestimates (" + ", ".join(f"{w} +{100 * g:.0f} pt" for w, g in over.items())
                     + ")")
        what.append("paper protocol overestimated")
    if under:
        flags.append("adaptive attack weaker than its transfer from " + ", ".join(
            f"{w} (−{100 * g:.0f} pt)" for w, g in under.items()))
        what.append("adaptive attack weaker than a transfer")
    if flags:
        return CheckResult("protocol_gap", "warn", "; ".join(what) + ": " + "; ".join(notes), "⚠ " + "; ".join(flags))
    return CheckResult("protocol_gap", "pass", "; ".join(notes))


def from_cells(run: dict, cells: list[dict]) -> list[CheckResult]:
    """Checks 1, 2, 7-10 from a run's stored cells (both protocols)."""
    cells = stats.robust_cells(cells)  # judged on robust accuracy, as the leaderboard shows it
    clean = next((c["flags"] for c in cells if c["attack"] == "clean"), None)
    attack_cells = [c for c in cells if c["attack"] != "clean"]
    adaptive = {c["attack"]: c for c in attack_cells if c["protocol"] == ADAPTIVE}
    papers: dict[str, dict[str, dict]] = {}
    for c in attack_cells:
        if surrogate_of(c["protocol"]) is not None:
            papers.setdefault(c["protocol"], {})[c["attack"]] = c
    return [state_preserved(attack_cells), budget(attack_cells), budget_monotonicity(adaptive),
            blackbox_whitebox(adaptive), worst_case(clean, list(adaptive.values())),
            protocol_gap(adaptive, papers, bool(run.get("has_surrogate")), default_surrogate(run))]
