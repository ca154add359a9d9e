"""`abflow rollout …`: watch a progressive rollout, or take the wheel."""

from __future__ import annotations

import json

import click

from abflow.cli.common import json_option, load_settings
from abflow.core.text import format_table


@click.group()
def rollout() -> None:
    """Progressive rollouts: watch one, or take the wheel.

    An experiment whose config has a `rollout:` section is driven by the
    controller inside `abflow serve` / `abflow refresher`: the challenger's
    share climbs through the stages while the guardrails hold, and falls to 0 %
    when one fails. These commands act on PostgreSQL directly; the controller
    publishes the resulting weights within a second.
    """


def _rollout_command(experiment_id: str, action: str | None, reason: str | None = None, as_json: bool = False) -> None:
    from bandit_service.rollouts import controller
    from storage.db import connect

    settings = load_settings()
    with connect(settings.require_database_url()) as conn:
        if action is None:
            status = controller.status(conn, experiment_id)
        else:
            status = controller.operate(conn, experiment_id, action, "operator", reason)
    if as_json:
        click.echo(json.dumps(status, indent=2, default=str))
        return
    click.echo(render_rollout(status))


def render_rollout(status: dict) -> str:
    stages = " -> ".join(f"{p:g}%" for p in status["stages"])
    lines = [f"rollout of {status['challenger']} in {status['experiment_id']}: {status['state'].upper()}"
             + (f" at stage {status['stage'] + 1}/{len(status['stages'])} ({status['percent']:g}%)"
                if status["stage"] is not None else ""), f"stages: {stages}"]
    if status["weights"]:
        w = status["weights"]
        lines.append(f"weights (version {w['version']}, {w['phase']}): "
                     + ", ".join(f"{k} {v:.1%}" for k, v in w["weights"].items()))
    exposure = status.get("exposure")
    if exposure and exposure["variants"]:
        def share(value: float | None) -> str:
            return "-" if value is None else f"{value:.1%}"

        lines.append(f"this stage served {status['challenger']} to {share(exposure['challenger_share_of_units'])} of its "
                     f"units and {share(exposure['challenger_share_of_invocations'])} of its invocations")
    check = status.get("last_check")
    if check:
        lines.append(f"last check {status['last_check_at']}: {check.get('action')}")
        lines += [f"  - {reason}" for reason in check.get("reasons", [])]
        rows = [{"metric": g["metric"], "margin": g.get("margin"), "excess": g.get("excess"),
                 "interval": "" if "low" not in g else f"[{g['low']:+.4g}, {g['high']:+.4g}]",
                 "status": g.get("status") or g.get("error", "")} for g in check.get("guardrails", [])]
        if rows:
            lines += ["", format_table(rows, ["metric", "margin", "excess", "interval", "status"])]
    if status["transitions"]:
        lines += ["", "transitions:"]
        rows = [{"at": t["at"][:19].replace("T", " "), "actor": t["actor"], "action": t["action"],
                 "state": t["to_state"], "stage": f"{status['stages'][t['to_stage']]:g}%", "reason": t["reason"]}
                for t in status["transitions"]]
        lines.append(format_table(rows, ["at", "actor", "action", "state", "stage", "reason"]))
    return "\n".join(lines)


@rollout.command("status")
@click.argument("experiment_id", metavar="EXPERIMENT")
@json_option("Print the status and transitions as JSON.")
def rollout_status(experiment_id: str, as_json: bool) -> None:
    """State, stage, weights, the newest check's guardrails, and every transition with its reason."""
    _rollout_command(experiment_id, None, as_json=as_json)


def _operator_action(action: str, summary: str) -> None:
    @rollout.command(action, help=summary)
    @click.argument("experiment_id", metavar="EXPERIMENT")
    @click.option("--reason", help="Why; stored with the transition.")
    @json_option("Print the new status as JSON.")
    def command(experiment_id: str, reason: str | None, as_json: bool) -> None:
        _rollout_command(experiment_id, action, reason, as_json)


_operator_action("pause", "Hold the rollout at its stage: the weights stay, no check advances or rolls back.")
_operator_action("resume", "Let a paused rollout run again; its stage's deadline starts again.")
_operator_action("promote", "Skip the remaining stages: the challenger gets 100 %.")
_operator_action("abort", "Stop the rollout and send all traffic back to the champion.")

COMMANDS = (rollout,)
