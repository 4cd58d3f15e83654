"""The MLflow UI in a real browser: `mlflow server` on loopback over a store with a finished run, read by headless Chromium."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest

from cifarflow.cli import main
from conftest import REPO, serving

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
SCREENSHOTS = Path(os.environ.get("CIFARFLOW_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_BROWSER and not os.environ.get("CIFARFLOW_REQUIRE_BROWSER"),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through its own chromedriver (no browser download), as root-safe flags allow."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for_text(driver, text: str, name: str, timeout: float = 60) -> str:
    """Wait until ``text`` is in the page's visible text; saves ``<name>.png``; returns the text."""
    deadline = time.monotonic() + timeout
    while True:
        body = driver.find_element("tag name", "body").text
        if text in body or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    assert text in body, f"'{text}' not on the {name} page (screenshot {SCREENSHOTS / f'{name}.png'}):\n{body[:2000]}"
    return body


def wait_until(driver, condition: str, what: str, timeout: float = 60) -> None:
    """Wait until the JavaScript expression ``condition`` is true in the page."""
    deadline = time.monotonic() + timeout
    while not driver.execute_script(f"return {condition}"):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_mlflow_ui_shows_the_run_its_metrics_charts_and_artifacts(train_data, browser, tmp_path, capsys):
    main(["train", "cnn_small", "--data", str(train_data), "--epochs", "2", "--set", "width=0.125",
          "--set", "dense_units=16", "--set", "batch_size=16", "--set", "warmup_epochs=0", "--quiet"])
    capsys.readouterr()
    run = mlflow.search_runs(experiment_names=["cifarflow/cnn_small"], output_format="list")[0]
    exp, run_id, name = run.info.experiment_id, run.info.run_id, run.info.run_name
    assert run.info.status == "FINISHED" and name.startswith("cnn_small-epochs2-")

    with serving(["server", "--backend-store-uri", mlflow.get_tracking_uri(), "--workers", "1"],
                 tmp_path / "server.log", "/health") as base:
        ml = "workflowType=machine_learning"  # the UI's "Model training" view (GenAI is its default)
        browser.get(f"{base}/#/experiments/{exp}/runs?{ml}")
        wait_for_text(browser, name, "experiment_runs")

        browser.get(f"{base}/#/experiments/{exp}/runs?{ml}&compareRunsMode=CHART")  # the chart view
        wait_for_text(browser, "Model metrics", "experiment_charts_all")
        browser.find_element("css selector", "input[placeholder='Search metric charts']").send_keys("accuracy")
        charts = wait_for_text(browser, "train_accuracy", "experiment_charts")
        assert "val_accuracy" in charts and "train_loss" not in charts
        wait_until(browser, "document.querySelectorAll('.js-plotly-plot').length >= 2", "the accuracy charts to draw")
        browser.save_screenshot(str(SCREENSHOTS / "experiment_charts.png"))

        browser.get(f"{base}/#/experiments/{exp}/runs/{run_id}?{ml}")
        overview = wait_for_text(browser, "test_accuracy", "run_overview")
        assert name in overview and repr(run.data.metrics["test_accuracy"]) in overview

        browser.get(f"{base}/#/experiments/{exp}/runs/{run_id}/artifacts?{ml}")
        wait_for_text(browser, "confusion_matrix.png", "run_artifacts")
        browser.find_element("xpath", "//*[text()='confusion_matrix.png']").click()
        # the preview fetches the file and shows it as a blob: image
        wait_until(browser, "[...document.images].some(i => i.src.startsWith('blob:') && i.naturalWidth >= 300)",
                   "confusion_matrix.png to open as an image")
        browser.save_screenshot(str(SCREENSHOTS / "run_artifact_image.png"))
    assert {p.name for p in SCREENSHOTS.glob("*.png")} >= {"experiment_runs.png", "experiment_charts_all.png", "experiment_charts.png",
                                                          "run_overview.png", "run_artifacts.png",
                                                          "run_artifact_image.png"}
