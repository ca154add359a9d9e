"""The pages abflow serves, in a real headless Chromium with no network but the loopback."""

from __future__ import annotations

import threading

import uvicorn
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from abflow.local.stack import free_port
from bandit_service.api import create_app
from producers.publisher import ensure_topics
from tests.browser import chromium
from tests.conftest import wait_until


def serve(settings):
    """The API behind a real uvicorn on a free port, in a thread; returns (base URL, stop)."""
    ensure_topics(settings.kafka_bootstrap, settings.topics, settings.partitions)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, message="uvicorn started")

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


def test_docs_and_redoc_render_offline(settings):
    """/docs and /redoc used to load Swagger UI, ReDoc and fonts from a CDN: blank where abflow often
    runs. Their scripts now come from the installed package; the browser reaches nothing else."""
    base, stop = serve(settings)
    try:
        with chromium() as browser:
            browser.get(f"{base}/docs")
            WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
            assert "abflow" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
            # The operations are listed from /openapi.json, e.g. the assignment.
            WebDriverWait(browser, 20).until(lambda b: "/experiments/{experiment_id}/assign" in b.page_source)
            scripts = [s.get_attribute("src") for s in browser.find_elements(By.TAG_NAME, "script") if s.get_attribute("src")]
            assert scripts and all(src.startswith(base) for src in scripts), scripts

            browser.get(f"{base}/redoc")
            WebDriverWait(browser, 30).until(lambda b: "/experiments/{experiment_id}/assign" in b.page_source)
            assert browser.find_elements(By.CSS_SELECTOR, "h1") and "abflow" in browser.find_element(By.CSS_SELECTOR, "h1").text
            links = [s.get_attribute("href") for s in browser.find_elements(By.TAG_NAME, "link") if s.get_attribute("href")]
            assert all(href.startswith(base) for href in links), links
    finally:
        stop()


def demo_like_report(series_minutes: dict[str, int]) -> dict:
    """A report of the demo's config (every default metric: the widest tables), with the series the
    cumulative-reward plot draws: ``series_minutes`` buckets of data per variant."""
    from datetime import datetime, timedelta, timezone
    from importlib import resources

    import numpy as np

    from abflow.core.config import load_config_text
    from abflow.core.windowing import LATENCY_BUCKETS, latency_bucket
    from bandit_service.report.build import ReportInput, build_report
    from bandit_service.report.evidence import UnitMoments

    config = load_config_text(resources.files("abflow.examples").joinpath("demo-experiment.yaml").read_text(), "demo")
    rng = np.random.default_rng(3)
    units, sums, histograms = {}, {}, {}
    for name, rate in zip([v.name for v in config.variants], (0.045, 0.052)):
        converted, errors = rng.random(5_000) < rate, rng.random(5_000) < 0.01
        units[name] = UnitMoments.of_units({"invocations": np.ones(5_000), "conversions": converted,
                                            "reward": converted, "errors": errors}, config.metrics)
        sums[name] = {"invocations": 5_000, "conversions": int(converted.sum()), "reward_sum": float(converted.sum()),
                      "reward_sq_sum": float(converted.sum()), "errors": int(errors.sum())}
        histograms[name] = [0] * LATENCY_BUCKETS
        for ms in 40 * np.exp(rng.normal(0, 0.5, 2_000)):
            histograms[name][latency_bucket(float(ms))] += 1
    start = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)
    series = [(start + timedelta(minutes=m), name, 100, 5, 5.0) for name, minutes in series_minutes.items()
              for m in range(minutes)]
    return build_report(ReportInput(config, "running", periods={0: sums}, allocations=[], histograms=histograms,
                                    units={0: units}, exposures={(0, n): m.n for n, m in units.items()},
                                    series=sorted(series)))


def test_the_html_report_fits_a_1400_pixel_window_and_plots_a_variant_with_one_minute(tmp_path):
    """The report's tables ran off the page at 1,400 px (four columns cut off), the cumulative-reward
    plot drew nothing for a variant with a single minute of data, and one minute of data in all gave
    a time axis from 2025 to 2029."""
    from bandit_service.report.render import cumulative_reward_lines, render_html

    report = demo_like_report({"Champion": 5, "Challenger": 1})
    lines, (first, last) = cumulative_reward_lines(report["series"], ["Champion", "Challenger"])
    assert len(lines["Challenger"][0]) >= 2 and lines["Challenger"][1][-1] == 5.0  # drawn, flat
    assert lines["Champion"][1][-1] == 25.0 and lines["Champion"][0][-1] == lines["Challenger"][0][-1] == last
    one_minute = render_html(demo_like_report({"Champion": 1, "Challenger": 1}))
    plot = one_minute[one_minute.index("Cumulative reward"):]
    plot = plot[:plot.index("</figure>")]
    assert "2025" not in plot and "2029" not in plot and "10:0" in plot  # minutes of that morning, not years

    page = tmp_path / "report.html"
    page.write_text(render_html(report))
    with chromium(width=1400, height=1000) as browser:
        browser.get(page.as_uri())
        overflow = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " Array.from(document.querySelectorAll('div.table')).map(d => [d.scrollWidth, d.clientWidth])]")
        page_width, window_width, tables = overflow
        assert page_width <= window_width, overflow
        assert tables and all(scroll <= client for scroll, client in tables), tables  # every column in view
        figures = browser.execute_script("return Array.from(document.querySelectorAll('figure svg')).length")
        assert figures >= 3
