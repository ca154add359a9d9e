"""The decision: ship, do not ship, keep running, or stop for harm, with the reasons spelled out.

Every input is always valid (mixture-SPRT p-values and confidence sequences),
so the decision may be asked for at every look. The rules, in order:

1. **Stop for harm** when a challenger's guardrail metric is worse than the
   champion's by more than its margin (the whole confidence sequence beyond
   the margin). Harm does not wait for the minimum sample.
2. **Do not ship** when the sample-ratio check failed: the assignment or the
   logging is broken and no comparison can be trusted.
3. **Ship** the best challenger whose primary metric is significantly better
   (corrected across challengers), once it and the champion have the minimum
   sample and every guardrail is shown non-inferior. A winner that misses one
   of these keeps the test running.
4. **Do not ship** when no challenger can still be better by the minimum
   detectable effect: each is significantly worse, or its confidence
   sequence lies below the MDE.
5. Otherwise **keep running**.

Differences are oriented so that positive is better for the primary metric,
and positive is worse for guardrails ("excess").
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHIP, DO_NOT_SHIP, KEEP_RUNNING, STOP_FOR_HARM = "ship", "do not ship", "keep running", "stop for harm"


@dataclass(frozen=True)
class GuardrailEvidence:
    metric: str
    margin: float
    excess: float  # how much worse the challenger is (positive: worse)
    low: float  # always-valid confidence sequence of the excess
    high: float

    @property
    def harmful(self) -> bool:
        return self.low > self.margin

    @property
    def non_inferior(self) -> bool:
        return self.high < self.margin


@dataclass(frozen=True)
class ChallengerEvidence:
    name: str
    n: int
    improvement: float  # primary metric, challenger − champion, positive is better
    low: float  # always-valid confidence sequence of the improvement
    high: float
    p_value: float  # always valid, corrected across challengers
    guardrails: tuple[GuardrailEvidence, ...] = ()


@dataclass(frozen=True)
class Decision:
    verdict: str
    variant: str | None  # the challenger to ship, or the harmful one
    reasons: tuple[str, ...] = field(default_factory=tuple)


def decide(champion: str, champion_n: int, challengers: list[ChallengerEvidence], alpha: float,
           min_sample: int | None, mde: float | None, srm_mismatch: bool = False, metric: str = "primary") -> Decision:
    """``min_sample`` per variant (None: unknown yet); ``mde``: the absolute improvement worth shipping."""
    for c in challengers:
        harms = [g for g in c.guardrails if g.harmful]
        if harms:
            return Decision(STOP_FOR_HARM, c.name, tuple(
                f"{c.name}: {g.metric} is worse than {champion} by {g.excess:+.4g} "
                f"(always-valid interval {g.low:+.4g} to {g.high:+.4g}), beyond the margin {g.margin:g}"
                for g in harms))
    if srm_mismatch:
        return Decision(DO_NOT_SHIP, None, ("sample-ratio mismatch: the assignment or the event logging is broken; "
                                            "fix it before trusting any result",))
    winners = sorted((c for c in challengers if c.p_value < alpha and c.improvement > 0),
                     key=lambda c: c.improvement, reverse=True)
    if winners:
        best = winners[0]
        win = (f"{best.name} beats {champion} on {metric} by {best.improvement:+.4g} "
               f"(always-valid interval {best.low:+.4g} to {best.high:+.4g}, corrected p = {best.p_value:.3g})")
        waiting = []
        if min_sample is None:
            waiting.append("the minimum sample is not known yet (the champion has no conversions)")
        else:
            for name, n in ((champion, champion_n), (best.name, best.n)):
                if n < min_sample:
                    waiting.append(f"{name} has {n:,} of the {min_sample:,} exposed units the power analysis asks for")
        unproven = [g for g in best.guardrails if not g.non_inferior]
        waiting += [f"guardrail {g.metric} not yet shown within its margin {g.margin:g} (interval up to {g.high:+.4g})"
                    for g in unproven]
        if waiting:
            return Decision(KEEP_RUNNING, best.name, (win,) + tuple(waiting))
        return Decision(SHIP, best.name, (win, "every guardrail is within its margin",
                                          f"both have at least the minimum sample of {min_sample:,}"))
    hopeless = []
    for c in challengers:
        if c.p_value < alpha and c.improvement < 0:
            hopeless.append(f"{c.name} is worse than {champion} on {metric} by {c.improvement:+.4g} "
                            f"(corrected p = {c.p_value:.3g})")
        elif mde is not None and c.high < mde:
            hopeless.append(f"{c.name} cannot beat {champion} by the MDE {mde:.4g}: "
                            f"the always-valid interval ends at {c.high:+.4g}")
    if challengers and len(hopeless) == len(challengers):
        return Decision(DO_NOT_SHIP, None, tuple(hopeless))
    reasons = [f"no challenger differs significantly from {champion} on {metric} yet"]
    if min_sample is not None:
        smallest = min([champion_n] + [c.n for c in challengers])
        reasons.append(f"the smallest variant has {smallest:,} of the {min_sample:,} exposed units the power analysis asks for")
    return Decision(KEEP_RUNNING, None, tuple(reasons))
