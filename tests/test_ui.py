"""The Dagster UI in a real browser: dagster-webserver on 127.0.0.1 over a temporary instance with two
materialized seeds, driven by headless Chromium through Playwright. Screenshots go to tests/artifacts/ui/."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "tests" / "artifacts" / "ui"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ASSETS = ["training_configs", "weights_map", "raw_corpus", "expanded_corpus", "tokenized_cache"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("ui_home")
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    env["DAGSTER_HOME"] = str(home)
    done = subprocess.run(
        [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--seed", "0", "--seed", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("dagster-webserver did not come up within 90 s")
                time.sleep(0.5)
        yield url
    finally:
        # The webserver ignores SIGTERM: kill its whole process group (it and its code server).
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(webserver):
    playwright = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(f"{webserver}/overview")
            skip = page.get_by_role("button", name="Skip")  # first-visit community dialog
            try:
                skip.first.click(timeout=5_000)
            except playwright.TimeoutError:
                pass
            yield page
        finally:
            browser.close()


def test_asset_graph_shows_the_five_assets(page, webserver):
    page.goto(f"{webserver}/locations/dlm_pipeline/asset-groups/corpus/lineage")
    for asset in ASSETS:
        page.get_by_text(asset, exact=True).first.wait_for()
    page.get_by_text("2 partitions").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "asset_graph.png"))


def test_partitions_page_lists_both_seeds(page, webserver):
    page.goto(f"{webserver}/assets/expanded_corpus?view=partitions")
    page.get_by_text("Materialized (2)").first.wait_for()
    body = page.inner_text("body")
    assert "Missing (0)" in body and "Failed (0)" in body
    page.screenshot(path=str(ARTIFACTS / "partitions.png"))


def test_partition_metadata_shows_the_weight_distribution(page, webserver):
    page.goto(f"{webserver}/assets/expanded_corpus?view=overview&partition=1")
    page.get_by_text("weight_distribution").first.wait_for()
    body = page.inner_text("body")
    for key in ("expected_vs_realized", "rows_in", "rows_out", "config_fingerprint", "fingerprint"):
        assert key in body
    page.screenshot(path=str(ARTIFACTS / "partition_metadata.png"), full_page=True)


def test_corpus_checks_page_lists_the_sensor_running_and_the_schedule(page, webserver):
    page.goto(f"{webserver}/automation")
    page.get_by_text("config_change_sensor").first.wait_for()
    page.get_by_text("nightly_all_seeds").first.wait_for()
    page.wait_for_timeout(2_000)  # let the status toggles load before the picture
    page.screenshot(path=str(ARTIFACTS / "automation.png"))
