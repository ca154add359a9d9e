"""The report for people: a terminal text and a self-contained HTML page (inline SVG plots, no
scripts, no links), both from the data ``bandit_service.report.build_report`` returns."""

from __future__ import annotations

import html
import io
from datetime import datetime, timedelta

from abflow.core.text import format_table


def _pct(value, digits: int = 2) -> str:
    return "" if value is None else f"{value * 100:.{digits}f} %"


def _num(value, spec: str = ".4g") -> str:
    return "" if value is None else format(value, spec)


def _interval(low, high, unit: str = "", signed: bool = False) -> str:
    """``unit`` "%" or "pt" shows rates (fractions) in percent or percentage points."""
    if low is None or high is None:
        return ""
    if unit:
        fmt = (lambda v: f"{v * 100:+.2f}") if signed else (lambda v: f"{v * 100:.2f}")
        return f"[{fmt(low)}, {fmt(high)}] {unit}"
    return f"[{low:+.4g}, {high:+.4g}]" if signed else f"[{low:.4g}, {high:.4g}]"


def _is_rate(metric: str) -> bool:
    return metric.endswith("_rate") or metric == "converted_units"


def variant_rows(report: dict) -> list[dict]:
    level = int(round((1 - report["experiment"]["analysis"]["alpha"]) * 100))
    rows = [{
        "variant": v["variant"], "role": v["role"], "weight": _pct(v["weight"], 1),
        "units": f"{v['units']:,}", "converted": _pct(v["converted_share"]),
        f"{level} % interval": _interval(v["converted_share_low"], v["converted_share_high"], "%"),
        "multiple exp.": f"{v['multiple_exposures']:,}",
        "invocations": f"{v['invocations']:,}", "conversions": f"{v['conversions']:,}",
        "conv/inv": _pct(v["conversion_rate"]),
        "reward/inv": _num(v["reward_per_invocation"]), "error rate": _pct(v["error_rate"]),
        "p95 ms": _num(v["latency_p95_ms"], "g"), "p99 ms": _num(v["latency_p99_ms"], "g"),
    } for v in report["variants"]]
    if report["experiment"]["allocation_periods"] > 1:
        # Pooled shares over-weight the periods a variant got more units in; show the fair one beside.
        for row, v in zip(rows, report["variants"]):
            row["period-weighted converted"] = _pct(v["converted_share_adjusted"])
    return rows


def comparison_rows(report: dict, role: str) -> list[dict]:
    rows = []
    for c in report["comparisons"]:
        if c["role"] != role:
            continue
        if "error" in c:
            rows.append({"metric": c["metric"], "variant": c["variant"], "difference": c["error"]})
            continue
        pct = _is_rate(c["metric"])
        rows.append({
            "metric": c["metric"], "variant": c["variant"],
            "champion": _pct(c["champion_mean"]) if pct else _num(c["champion_mean"]),
            "challenger": _pct(c["challenger_mean"]) if pct else _num(c["challenger_mean"]),
            "difference": (f"{c['difference'] * 100:+.2f} pt" if pct else f"{c['difference']:+.4g}"),
            "interval": _interval(c.get("low"), c.get("high"), "pt" if pct else "", signed=True),
            "lift": "" if c.get("lift") is None else f"{c['lift'] * 100:+.1f} %",
            "lift interval": _interval(c.get("lift_low"), c.get("lift_high"), "%", signed=True),
            "p": _num(c.get("p_value"), ".3g"), "p adj": _num(c.get("p_value_adjusted"), ".3g"),
            "always-valid p adj": _num(c.get("always_valid_p_adjusted"), ".3g"),
            "always-valid interval": _interval(c.get("always_valid_low"), c.get("always_valid_high"),
                                               "pt" if pct else "", signed=True),
            "test": c.get("test", ""),
        })
    return rows


def guardrail_rows(report: dict) -> list[dict]:
    rows = []
    for g in report["guardrails"]:
        if "error" in g:
            rows.append({"metric": g["metric"], "variant": g["variant"], "status": g["error"]})
            continue
        rows.append({"metric": g["metric"], "variant": g["variant"], "margin": f"{g['margin'] * 100:.2f} pt",
                     "excess": f"{g['excess'] * 100:+.2f} pt",
                     "always-valid interval": _interval(g["low"], g["high"], "pt", signed=True),
                     "status": g["status"], "detail": g["detail"]})
    return rows


def bayesian_rows(report: dict) -> list[dict]:
    return [{"variant": b["variant"], "mean": _pct(b["mean"]), "credible interval": _interval(b["low"], b["high"], "%"),
             "P(best)": _pct(b["p_best"], 1), "P(beats champion)": _pct(b.get("p_beats_champion"), 1),
             "loss if switching": _pct(b.get("expected_loss_switching"), 3),
             "loss if keeping": _pct(b.get("expected_loss_keeping_champion"), 3)}
            for b in report["bayesian"]["variants"]]


def _paired_errors(paired: dict | None) -> dict:
    if paired is None:
        return {}
    return {"failed alone (shadow / served)": f"{paired['shadow_only']:,} / {paired['served_only']:,}",
            "shadow − served errors": f"{paired['difference'] * 100:+.2f} "
                                      + _interval(paired["low"], paired["high"], "pt", signed=True),
            "McNemar p": _num(paired["p_value"], ".3g")}


def shadow_rows(report: dict) -> list[dict]:
    rows = []
    for s in report["shadows"]:
        shadow, served = s["shadow"], s["served"]
        rows.append({"shadow": s["variant"], "beside": s["served_variant"], "requests": f"{s['requests']:,}",
                     "agreement": _pct(s.get("agreement")) if s["compared"] else "-",
                     "interval": _interval(s.get("agreement_low"), s.get("agreement_high"), "%") if s["compared"] else "-",
                     "errors (shadow / served)": f"{_pct(shadow['error_rate'])} / {_pct(served['error_rate'])}",
                     **_paired_errors(s.get("errors_paired")),
                     "p95 ms (shadow / served)": f"{_num(shadow['latency_p95_ms'])} / {_num(served['latency_p95_ms'])}",
                     "mean ms (shadow / served)": f"{_num(shadow['latency_mean_ms'])} / {_num(served['latency_mean_ms'])}"})
    return rows


def srm_text(report: dict) -> str:
    srm = report["sample_ratio"]
    if not srm["checked"]:
        return f"not checked: {srm['reason']}"
    verdict = "MISMATCH" if srm["mismatch"] else "ok"
    return (f"{verdict} (chi-square {srm['statistic']:.3g}, p = {srm['p_value']:.3g}, alarm below {srm['threshold']:g}; "
            f"{srm['source']})")


def attribution_text(report: dict) -> str:
    """Events not counted as they claimed (storage.units), in one line."""
    found = report.get("attribution") or {}
    hours = found.get("window_seconds", 0) / 3600
    events = ", ".join(f"{e['variant']} {e['reason'].replace('_', ' ')} {e['count']:,}" for e in found.get("events", []))
    return f"window {hours:g} h; " + (events or "every event counted for its unit's exposure")


def _columns(rows: list[dict]) -> list[str]:
    """The fullest row's keys first (rows with an error have fewer), then any others."""
    fullest = max(rows, key=len)
    return list(dict.fromkeys(list(fullest) + [key for row in rows for key in row]))


def _table(rows: list[dict]) -> str:
    return format_table(rows, _columns(rows)) if rows else "(none)"


def render_text(report: dict) -> str:
    e, d = report["experiment"], report["decision"]
    analysis = e["analysis"]
    verdict = d["verdict"].upper() + (f": {d['variant']}" if d["variant"] else "")
    lines = [f"experiment {e['experiment_id']}  ({e['strategy']}, {e['status']}; champion {e['champion']})", "",
             f"DECISION  {verdict}"]
    lines += [f"  - {reason}" for reason in d["reasons"]]
    min_sample = f"{analysis['min_sample']:,}" if analysis["min_sample"] else "unknown yet"
    lines += ["", f"alpha {analysis['alpha']:g}, power {analysis['power']:g}, MDE {analysis['mde']:.0%} relative, "
              f"minimum sample {min_sample} per variant, {analysis['correction']} correction, "
              f"{e['allocation_periods']} allocation period(s)", ""]
    lines += ["VARIANTS", _table(variant_rows(report)), ""]
    for role in ("primary", "secondary"):
        rows = comparison_rows(report, role)
        if rows:
            lines += [f"{role.upper()} METRIC{'S' if role == 'secondary' else ''} (challenger − champion)", _table(rows), ""]
    lines += ["GUARDRAILS (excess: how much worse the challenger is)", _table(guardrail_rows(report)), ""]
    lines += [f"SAMPLE RATIO  {srm_text(report)}", "", f"ATTRIBUTION  {attribution_text(report)}", ""]
    bayes = report["bayesian"]
    lines += [f"BAYESIAN (units that converted, {bayes['prior']} prior, {bayes['counts']})", _table(bayesian_rows(report))]
    if report["shadows"]:
        lines += ["", "SHADOWS (called on the same requests, never served)", _table(shadow_rows(report))]
    if report["notes"]:
        lines += ["", "NOTES"] + [f"  - {note}" for note in report["notes"]]
    return "\n".join(lines)


# -- HTML ---------------------------------------------------------------------------------------

def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


MIN_TIME_SPAN = timedelta(minutes=2)  # the narrowest time axis a plot gets


def cumulative_reward_lines(series: list[dict], names: list[str]) -> tuple[dict, tuple[datetime, datetime]]:
    """Each variant's cumulative reward as a step line of at least two points, drawn to the end of the
    last bucket (a variant with one bucket of data is a flat line, not nothing), and the time span
    they cover (at least ``MIN_TIME_SPAN``, so that one bucket of data does not give a degenerate axis)."""
    times = sorted({datetime.fromisoformat(s["time"]) for s in series})
    steps = [b - a for a, b in zip(times, times[1:])]
    end = times[-1] + (min(steps) if steps else timedelta(minutes=1))
    end = max(end, times[0] + MIN_TIME_SPAN)
    lines = {}
    for name in names:
        points = sorted((datetime.fromisoformat(s["time"]), s["reward_sum"]) for s in series if s["variant"] == name)
        if points:
            xs = [t for t, _ in points] + [end]
            total, ys = 0.0, []
            for _, reward in points:
                total += reward
                ys.append(total)
            lines[name] = (xs, ys + [total])
    return lines, (times[0], end)


def _time_axis(ax) -> None:
    from matplotlib import dates

    locator = dates.AutoDateLocator(minticks=3, maxticks=7)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))


def _plots(report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt
    from scipy import stats

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    plots = {}
    names = [v["variant"] for v in report["variants"]]

    rated = [v for v in report["variants"] if v["converted_share"] is not None]
    if rated:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(rated)))
        for y, v in enumerate(rated):
            rate = v["converted_share"] * 100
            ax.errorbar(rate, y, xerr=[[rate - v["converted_share_low"] * 100], [v["converted_share_high"] * 100 - rate]],
                        fmt="o", capsize=4, color=f"C{names.index(v['variant'])}")
        ax.set_yticks(range(len(rated)), [v["variant"] for v in rated])
        ax.set_ylim(-0.6, len(rated) - 0.4)
        ax.set_xlabel("exposed units that converted (%), with the Wilson interval")
        plots["Units that converted, per variant"] = _svg(fig)
        plt.close(fig)

    series = report["series"]
    if series:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        lines, span = cumulative_reward_lines(series, names)
        for i, name in enumerate(names):
            if name in lines:
                ax.step(*lines[name], where="post", label=name, color=f"C{i}")
        ax.set_xlim(*span)
        _time_axis(ax)
        ax.set_ylabel("cumulative reward")
        ax.legend(frameon=False)
        plots["Cumulative reward"] = _svg(fig)
        plt.close(fig)

    posteriors = report["bayesian"]["variants"]
    if posteriors:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        low = min(stats.beta.ppf(0.0005, p["alpha"], p["beta"]) for p in posteriors)
        high = max(stats.beta.ppf(0.9995, p["alpha"], p["beta"]) for p in posteriors)
        x = np.linspace(low, high, 400)
        for i, p in enumerate(posteriors):
            ax.plot(x * 100, stats.beta.pdf(x, p["alpha"], p["beta"]), label=p["variant"], color=f"C{i}")
        ax.set_xlabel("exposed units that converted (%)")
        ax.set_yticks([])
        ax.legend(frameon=False)
        plots["Posterior densities (Beta-Binomial)"] = _svg(fig)
        plt.close(fig)

    history = report["weights_history"]
    if history:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        times = [datetime.fromisoformat(h["computed_at"]) for h in history]
        weights = [h["weights"] for h in history]
        if series:
            # From the first data on the initial weights (before the first version) to the last data.
            first, last = (datetime.fromisoformat(series[i]["time"]) for i in (0, -1))
            if first < times[0]:
                times.insert(0, first)
                weights.insert(0, {v["variant"]: v["initial_weight"] for v in report["variants"]})
            if last > times[-1]:
                times.append(last)
                weights.append(weights[-1])
        if times[-1] - times[0] < MIN_TIME_SPAN:  # a step needs a span to be seen
            times.append(times[0] + MIN_TIME_SPAN)
            weights.append(weights[-1])
        for i, name in enumerate(names):
            ax.step(times, [w.get(name, 0.0) for w in weights], where="post", label=name, color=f"C{i}")
        ax.set_xlim(times[0], times[-1])
        _time_axis(ax)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("allocation weight")
        ax.legend(frameon=False)
        plots["Weights over time"] = _svg(fig)
        plt.close(fig)
    return plots


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(value) -> str:
        text = str(value if value is not None else "")
        # Long prose (a test's name, an error, a detail) wraps; figures stay on one line.
        return f"<td class='text'>{html.escape(text)}</td>" if len(text) > 24 else f"<td>{html.escape(text)}</td>"

    body = "".join("<tr>" + "".join(cell(row.get(c, "")) for c in columns) + "</tr>" for row in rows)
    # In a box of its own: a table wider than the page scrolls inside it instead of running off the page.
    return f"<div class='table'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 90em; color: #222; padding: 0 1em; }
.table { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { padding: 0.25em 0.5em; border-bottom: 1px solid #ddd; text-align: right; }
th { vertical-align: bottom; } td { white-space: nowrap; } td.text { white-space: normal; min-width: 12em; }
th:first-child, td:first-child { text-align: left; }
.verdict { font-size: 1.4em; font-weight: 600; padding: 0.4em 0.8em; border-radius: 6px; display: inline-block; }
.ship { background: #d8f3dc; } .do-not-ship { background: #f1f1f1; } .keep-running { background: #fff3bf; }
.stop-for-harm { background: #ffc9c9; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(28em, 1fr)); gap: 1em; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 0.3em; } svg { max-width: 100%; height: auto; }
"""


def render_html(report: dict) -> str:
    e, d = report["experiment"], report["decision"]
    title = f"abflow report: {e['experiment_id']}"
    verdict = d["verdict"].upper() + (f": {d['variant']}" if d["variant"] else "")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(e['strategy'])}, {html.escape(e['status'])}; champion {html.escape(e['champion'])}; "
             f"{e['allocation_periods']} allocation period(s)</p>",
             f"<div class='verdict {d['verdict'].replace(' ', '-')}'>{html.escape(verdict)}</div>",
             "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in d["reasons"]) + "</ul>",
             "<h2>Variants</h2>", _html_table(variant_rows(report))]
    for role in ("primary", "secondary"):
        rows = comparison_rows(report, role)
        if rows:
            parts += [f"<h2>{role.capitalize()} metric{'s' if role == 'secondary' else ''}</h2>", _html_table(rows)]
    parts += ["<h2>Guardrails</h2>", _html_table(guardrail_rows(report)),
              "<h2>Sample ratio</h2>", f"<p>{html.escape(srm_text(report))}</p>",
              "<h2>Attribution</h2>", f"<p>{html.escape(attribution_text(report))}</p>",
              "<h2>Bayesian view</h2>", _html_table(bayesian_rows(report))]
    if report["shadows"]:
        parts += ["<h2>Shadows</h2><p>Called on the same requests, never served.</p>", _html_table(shadow_rows(report))]
    parts += ["<h2>Plots</h2><div class='plots'>"]
    parts += [f"<figure><figcaption>{html.escape(name)}</figcaption>{svg}</figure>" for name, svg in _plots(report).items()]
    parts.append("</div>")
    if report["notes"]:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in report["notes"]] + ["</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)
