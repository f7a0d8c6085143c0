"""Cheap-fidelity screening: full recovery only for candidates that could reach the front.

Recovery is most of a trial's time (fine-tuning or distillation); the score right after pruning, with BN
recalibration only (no optimizer step), costs one evaluation. A candidate is *screened out*, not trained, when a
trial that was fully trained is at least as fast on every profile and had a cheap score at least ``margin`` higher:
if cheap scores rank candidates as full scores do, the candidate would end up dominated. Whether they do is measured
on every run: each trained trial records its cheap score beside its full one, and the rank agreement (Kendall's
tau-b over those pairs) is checked before every decision. Until ``min_pairs`` trained trials exist nothing is
screened (calibration), and when tau falls below ``min_tau`` screening stops for the rest of the run (fallback:
every candidate is trained). Screened trials are recorded with state ``screened``, their cheap score and the trial
that ruled them out; they never enter the front.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import optuna

DEFAULT_MARGIN = 0.01  # in the objective's units: 1 pp of accuracy, 0.01 of cosine / agreement / exp(-kl)
MIN_PAIRS = 6
MIN_TAU = 0.5


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Kendall's tau-b of two paired sequences (ties handled as in scipy.stats.kendalltau); None when undefined
    (fewer than two pairs, or either sequence constant)."""
    n = len(x)
    if n != len(y) or n < 2:
        return None
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


@dataclass
class Trained:
    """A fully trained trial as the screen sees it."""
    number: int
    cheap: float
    full: float
    latency_ms: Dict[str, float]


def trained_trials(study: optuna.Study, objective_name: str) -> List[Trained]:
    """Completed, trained trials that recorded a cheap score (the dense trial is one: its cheap score is the
    untouched model's)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        m = t.user_attrs.get("metrics", {})
        cheap, full = t.user_attrs.get("cheap_score"), m.get(objective_name)
        if cheap is None or full is None or t.user_attrs.get("screened"):
            continue
        lat = {k.split(":", 1)[1]: v for k, v in m.items() if k.startswith("latency_ms:") and v is not None}
        out.append(Trained(t.number, float(cheap), float(full), lat))
    return out


def agreement(trained: Sequence[Trained]) -> Tuple[Optional[float], int]:
    """(Kendall tau of cheap vs full scores, number of pairs)."""
    return kendall_tau([t.cheap for t in trained], [t.full for t in trained]), len(trained)


class FidelityScreen:
    """The decision, made against the study as it stands (so several workers share what they learn)."""

    def __init__(self, study: optuna.Study, objective_name: str, margin: float = DEFAULT_MARGIN,
                 min_pairs: int = MIN_PAIRS, min_tau: float = MIN_TAU):
        self.study, self.objective_name = study, objective_name
        self.margin, self.min_pairs, self.min_tau = margin, min_pairs, min_tau

    def reason(self, cheap: float, latency_ms: Dict[str, float]) -> Optional[str]:
        """Why a candidate with this cheap score and latency should not be trained; None to train it."""
        trained = trained_trials(self.study, self.objective_name)
        tau, pairs = agreement(trained)
        if pairs < self.min_pairs:
            return None  # still calibrating
        if tau is None or tau < self.min_tau:
            return None  # cheap scores do not rank like full ones on this run: train everything
        for t in sorted(trained, key=lambda t: -t.cheap):
            faster = all(t.latency_ms.get(p, float("inf")) <= ms for p, ms in latency_ms.items())
            if faster and t.cheap >= cheap + self.margin:
                return (f"screened: cheap {self.objective_name} {cheap:.4f} is {t.cheap - cheap:.4f} below trial "
                        f"{t.number}'s ({t.cheap:.4f}), which is as fast or faster on every profile and scored "
                        f"{t.full:.4f} fully trained (cheap/full rank agreement tau {tau:.2f} over {pairs} trials)")
        return None


def summary(study: optuna.Study, objective_name: str, min_tau: float = MIN_TAU) -> Dict[str, object]:
    """What the run's screening did: tau over the trained trials, how many were screened, whether it fell back."""
    trained = trained_trials(study, objective_name)
    tau, pairs = agreement(trained)
    screened = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("cheap_screened"))
    return {"kendall_tau": tau, "pairs": pairs, "screened": screened,
            "fell_back": pairs >= MIN_PAIRS and (tau is None or tau < min_tau)}
