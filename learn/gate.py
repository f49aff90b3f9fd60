"""The promotion gate: a pure function of score reports, thresholds and whether the held-out set is trusted.

    from learn.gate import decide
    d = decide(champion_report, candidate_report, min_f1_gain=0.01, max_em_drop=0.0)
    d = decide(champ, cand, min_f1_gain=0.01, max_em_drop=0.0, regression=(champ_reg, cand_reg),
               max_regression_drop=0.02, heldout_trusted=False, heldout_why="split from the log")
    d.promote, d.reasons, d.deltas, d.to_dict()

Both reports must come from the same held-out set scored in the same run (DESIGN.md,
"Learning loop"): the candidate is promoted when its F1 beats the champion's by at least
`min_f1_gain` and its EM is at most `max_em_drop` below the champion's. With a regression set
(`learn.regression_file`, scored the same way), its F1 may fall at most `max_regression_drop` below
the champion's there. A held-out set the operator does not control (split from a log any caller can
shape) never promotes, whatever the scores: `heldout_why` says why it is not trusted. Reports are
`learn.evaluate.EvalReport` objects or their dicts (keys em, f1, n_turns). The decision, with every
score set, is what the registry stores with the version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Scores are means of floats: 0.57 - 0.56 is 0.00999..., which must still pass a 0.01 gain.
_EPS = 1e-9


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    deltas: dict[str, float] = field(default_factory=dict)
    champion: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    regression: dict[str, Any] | None = None
    heldout: dict[str, Any] = field(default_factory=lambda: {"trusted": True, "why": ""})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scores(report: Any, role: str) -> dict[str, Any]:
    raw = report if isinstance(report, dict) else report.to_dict() if hasattr(report, "to_dict") else vars(report)
    missing = [k for k in ("em", "f1", "n_turns") if k not in raw]
    if missing:
        raise ValueError(f"{role} report lacks {', '.join(missing)}: pass an EvalReport or its to_dict()")
    return {k: raw[k] for k in ("model", "em", "f1", "n_turns", "per_source") if k in raw}


def decide(champion: Any, candidate: Any, *, min_f1_gain: float, max_em_drop: float, regression: tuple[Any, Any] | None = None,
           max_regression_drop: float = 0.0, heldout_trusted: bool = True, heldout_why: str = "") -> GateDecision:
    """Promote or not, with one reason per check (passed or failed) in plain words."""
    champ, cand = _scores(champion, "champion"), _scores(candidate, "candidate")
    f1_gain = cand["f1"] - champ["f1"]
    em_drop = champ["em"] - cand["em"]
    deltas = {"f1": f1_gain, "em": cand["em"] - champ["em"]}
    thresholds = {"min_f1_gain": min_f1_gain, "max_em_drop": max_em_drop}
    reasons: list[str] = []
    ok = True

    if not heldout_trusted:
        ok = False
        reasons.append(f"not promoted: the held-out set is not operator-controlled ({heldout_why}); set learn.heldout_file, "
                       "or have the snapshot's held-out conversations come from trusted keys")
    if cand["n_turns"] == 0:
        ok = False
        reasons.append("the candidate was scored on no turns: the held-out set is empty")
    if champ["n_turns"] != cand["n_turns"]:
        ok = False
        reasons.append(
            f"champion and candidate were scored on different sets ({champ['n_turns']} vs {cand['n_turns']} turns); "
            "score both on the same held-out set in the same run"
        )

    if f1_gain + _EPS >= min_f1_gain:
        reasons.append(f"F1 {champ['f1']:.4f} -> {cand['f1']:.4f} ({f1_gain:+.4f}) meets the required gain {min_f1_gain:+.4f}")
    else:
        ok = False
        reasons.append(f"F1 {champ['f1']:.4f} -> {cand['f1']:.4f} ({f1_gain:+.4f}) is short of the required gain {min_f1_gain:+.4f}")

    if em_drop <= max_em_drop + _EPS:
        reasons.append(f"EM {champ['em']:.4f} -> {cand['em']:.4f} ({-em_drop:+.4f}) is within the allowed drop {max_em_drop:.4f}")
    else:
        ok = False
        reasons.append(f"EM {champ['em']:.4f} -> {cand['em']:.4f} ({-em_drop:+.4f}) falls more than the allowed {max_em_drop:.4f}")

    scored_regression = None
    if regression is not None:
        reg_champ, reg_cand = _scores(regression[0], "champion regression"), _scores(regression[1], "candidate regression")
        scored_regression = {"champion": reg_champ, "candidate": reg_cand}
        thresholds["max_regression_drop"] = max_regression_drop
        deltas["regression_f1"] = reg_cand["f1"] - reg_champ["f1"]
        drop = reg_champ["f1"] - reg_cand["f1"]
        line = f"regression set F1 {reg_champ['f1']:.4f} -> {reg_cand['f1']:.4f} ({-drop:+.4f})"
        if reg_champ["n_turns"] != reg_cand["n_turns"] or reg_cand["n_turns"] == 0:
            ok = False
            reasons.append(f"{line}: not scored on the same, non-empty regression set ({reg_champ['n_turns']} vs {reg_cand['n_turns']} turns)")
        elif drop <= max_regression_drop + _EPS:
            reasons.append(f"{line} is within the allowed drop {max_regression_drop:.4f}")
        else:
            ok = False
            reasons.append(f"{line} falls more than the allowed {max_regression_drop:.4f}: the candidate forgot what the champion knew")

    return GateDecision(promote=ok, reasons=reasons, deltas=deltas, champion=champ, candidate=cand, thresholds=thresholds,
                        regression=scored_regression, heldout={"trusted": heldout_trusted, "why": heldout_why})
