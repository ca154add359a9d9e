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
