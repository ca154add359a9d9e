"""Progressive rollouts: the state machine and the judgement of a stage. Pure: no I/O.

A rollout moves one challenger's share of traffic up its plan's stages
(default 5, 10, 25, 50, 100 %). At every check the controller hands ``judge``
every unit the current stage served (placed by its hash on the stage's weights, returning units
too), each with its events in the stage; the guardrails (the experiment's
guardrail metrics, and non-inferiority of the primary metric within
``primary_margin`` of the champion's) are mixture-SPRT confidence sequences,
valid however often they are looked at. Each stage is one sequential test, at
``alpha / (stages judged)`` so the whole rollout keeps its false-alarm rate.

- harm (a confidence sequence wholly beyond its margin) in ``rollback_after``
  checks in a row: **roll back** (challenger 0 %, champion 100 %);
- the stage ran ``min_duration_seconds``, it served the challenger to ``min_sample``
  units and every guardrail is shown non-inferior: **advance**
  (the last stage, 100 %, completes the rollout);
- still inconclusive ``max_duration_seconds`` after the stage began (or was
  resumed): **pause** for an operator;
- otherwise hold.

States: running → paused ⇄ running; running/paused → completed | rolled_back | aborted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from abflow.core.config import ExperimentConfig, MetricConfig
from abflow.core.errors import Conflict
from abflow.core.text import json_safe
from bandit_service.report.evidence import EMPTY_UNITS, UnitMoments, guardrail_row, mean_or_none, unit_cell

RUNNING, PAUSED, COMPLETED, ROLLED_BACK, ABORTED = "running", "paused", "completed", "rolled_back", "aborted"
FINAL_STATES = (COMPLETED, ROLLED_BACK, ABORTED)
HOLD, ADVANCE, ROLLBACK, PAUSE = "hold", "advance", "rollback", "pause"


class TransitionRefused(Conflict):
    """An operator asked for a transition the rollout's state does not allow."""


@dataclass(frozen=True)
class RolloutState:
    state: str
    stage: int  # index into the plan's stages
    stage_started_at: datetime  # the stage's data starts here
    deadline_at: datetime  # inconclusive past this: pause
    failed_checks: int = 0  # consecutive checks that found harm


@dataclass(frozen=True)
class Judgement:
    action: str
    reasons: tuple[str, ...]
    figures: dict = field(default_factory=dict)  # the numbers behind the action (JSON-ready)
    failed_checks: int = 0


def start(plan, now: datetime) -> RolloutState:
    return RolloutState(RUNNING, 0, now, now + timedelta(seconds=plan.max_duration_seconds))


def stage_weights(config: ExperimentConfig, state: str, stage: int) -> dict[str, float]:
    """The allocation weights a rollout in ``state`` at ``stage`` serves (every variant named)."""
    plan = config.rollout
    champion = next(v.name for v in config.variants if v.role == "champion")
    weights = {v.name: 0.0 for v in config.variants}
    if state in (ROLLED_BACK, ABORTED):
        share = 0.0
    elif state == COMPLETED:
        share = 1.0
    else:
        share = plan.stages[stage] / 100.0
    weights[plan.challenger] = share
    weights[champion] = 1.0 - share
    return weights


def phase_name(state: str, stage: int, plan) -> str:
    """The allocation's phase label (at most 32 characters)."""
    if state in (RUNNING, PAUSED):
        return f"rollout {plan.stages[stage]:g}%"
    return {COMPLETED: "rollout complete", ROLLED_BACK: "rollback", ABORTED: "rollout aborted"}[state]


def stage_alpha(config: ExperimentConfig) -> float:
    """Each judged stage (every one below 100 %) is its own sequential test: Bonferroni across them."""
    judged = max(1, sum(1 for stage in config.rollout.stages if stage < 100))
    return config.analysis.alpha / judged


def guardrails(config: ExperimentConfig, units: dict[str, UnitMoments], histograms: dict[str, list[int]]) -> list[dict]:
    """Each guardrail metric, and the primary metric's non-inferiority, on one stage's units."""
    plan = config.rollout
    champion = next(v.name for v in config.variants if v.role == "champion")
    alpha = stage_alpha(config)
    periods = [{name: units.get(name, EMPTY_UNITS) for name in (champion, plan.challenger)}]
    rows = [guardrail_row(m, champion, plan.challenger, periods, histograms, alpha)
            for m in config.metrics if m.role == "guardrail"]
    primary = next(m for m in config.metrics if m.role == "primary")
    baseline = mean_or_none(unit_cell(primary, units.get(champion, EMPTY_UNITS)))
    if baseline:
        margin = plan.primary_margin * abs(baseline)
        rows.append({**guardrail_row(MetricConfig(primary.name, "guardrail", margin), champion, plan.challenger,
                                     periods, histograms, alpha), "relative_margin": plan.primary_margin})
    else:
        rows.append({"metric": primary.name, "variant": plan.challenger, "against": champion, "margin": None,
                     "relative_margin": plan.primary_margin,
                     "error": f"{champion} has no {primary.name} yet to set the margin from"})
    return rows


def judge(config: ExperimentConfig, current: RolloutState, now: datetime, units: dict[str, UnitMoments],
          histograms: dict[str, list[int]]) -> Judgement:
    """What a running rollout does at this check, given the units exposed in the stage so far and the
    latency histograms of the stage's requests."""
    plan = config.rollout
    rows = guardrails(config, units, histograms)
    elapsed = (now - current.stage_started_at).total_seconds()
    n_challenger = units.get(plan.challenger, EMPTY_UNITS).n
    figures = {"stage": current.stage, "stage_percent": plan.stages[current.stage], "elapsed_seconds": round(elapsed, 3),
               "units": {name: m.n for name, m in units.items()},
               "invocations": {name: int(m.sums.get("invocations", 0)) for name, m in units.items()},
               "alpha": stage_alpha(config), "guardrails": json_safe(rows)}
    # What the stage really served (units placed by their hash): the challenger's share of its units and invocations.
    total_units, total_invocations = sum(figures["units"].values()), sum(figures["invocations"].values())
    figures["challenger_share_of_units"] = n_challenger / total_units if total_units else None
    figures["challenger_share_of_invocations"] = \
        figures["invocations"].get(plan.challenger, 0) / total_invocations if total_invocations else None
    harmful = [row for row in rows if row.get("harmful")]
    if harmful:
        failed = current.failed_checks + 1
        reasons = tuple(f"{row['metric']}: {plan.challenger} is worse by {row['excess']:+.4g} (always-valid interval "
                        f"{row['low']:+.4g} to {row['high']:+.4g}), beyond the margin {row['margin']:.4g}"
                        for row in harmful)
        action = ROLLBACK if failed >= plan.rollback_after else HOLD
        if action == HOLD:
            reasons += (f"harm found in {failed} of the {plan.rollback_after} checks in a row that roll back",)
        return Judgement(action, reasons, figures, failed)
    waiting = []
    if elapsed < plan.min_duration_seconds:
        waiting.append(f"the stage has run {elapsed:.0f} s of {plan.min_duration_seconds:g} s")
    if n_challenger < plan.min_sample:
        waiting.append(f"{plan.challenger} has {n_challenger} of {plan.min_sample} units served in this stage")
    unshown = [row for row in rows if not row.get("non_inferior")]
    for row in unshown:
        waiting.append(f"{row['metric']}: " + (row["error"] if "error" in row else
                       f"non-inferiority not yet shown (interval up to {row['high']:+.4g}, margin {row['margin']:.4g})"))
    if not waiting:
        target = plan.stages[current.stage + 1] if current.stage + 1 < len(plan.stages) else 100
        units_share, invocations_share = figures["challenger_share_of_units"], figures["challenger_share_of_invocations"]
        served_text = "" if units_share is None else \
            f" ({plan.challenger} served {units_share:.1%} of its units, {invocations_share:.1%} of their invocations)"
        return Judgement(ADVANCE, (f"stage {plan.stages[current.stage]:g}% passed{served_text}: every guardrail within "
                                   f"its margin after {elapsed:.0f} s and {n_challenger} of its units; next {target:g}%",),
                         figures, 0)
    if now >= current.deadline_at:
        return Judgement(PAUSE, ("inconclusive past the stage's deadline: " + "; ".join(waiting),), figures, 0)
    return Judgement(HOLD, tuple(waiting), figures, 0)


def apply(config: ExperimentConfig, current: RolloutState, judgement: Judgement, now: datetime) -> RolloutState:
    """The state after a judgement."""
    plan = config.rollout
    if judgement.action == ROLLBACK:
        return replace(current, state=ROLLED_BACK, failed_checks=judgement.failed_checks)
    if judgement.action == PAUSE:
        return replace(current, state=PAUSED, failed_checks=0)
    if judgement.action == ADVANCE:
        stage = current.stage + 1
        if plan.stages[stage] >= 100:
            return replace(current, state=COMPLETED, stage=stage, stage_started_at=now, failed_checks=0)
        return RolloutState(RUNNING, stage, now, now + timedelta(seconds=plan.max_duration_seconds))
    return replace(current, failed_checks=judgement.failed_checks)


def operate(config: ExperimentConfig, current: RolloutState, action: str, now: datetime) -> RolloutState:
    """An operator's command: pause, resume, promote (straight to 100 %) or abort (back to the champion)."""
    if current.state in FINAL_STATES:
        raise TransitionRefused(f"the rollout is {current.state.replace('_', ' ')}; nothing more can be done to it")
    if action == "pause":
        if current.state == PAUSED:
            raise TransitionRefused("the rollout is already paused")
        return replace(current, state=PAUSED, failed_checks=0)
    if action == "resume":
        if current.state != PAUSED:
            raise TransitionRefused("only a paused rollout can be resumed")
        # The stage's data still counts; its deadline starts again.
        return replace(current, state=RUNNING, failed_checks=0,
                       deadline_at=now + timedelta(seconds=config.rollout.max_duration_seconds))
    if action == "promote":
        return replace(current, state=COMPLETED, stage=len(config.rollout.stages) - 1, stage_started_at=now)
    if action == "abort":
        return replace(current, state=ABORTED)
    raise TransitionRefused(f"unknown action {action!r} (pause, resume, promote, abort)")

