"""The explorer in a real browser (issue 10): JupyterLab on loopback, headless Chromium through Playwright,
run the notebook, generate one counterfactual through the widgets, screenshot to figures/explorer.png."""
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "figures" / "explorer.png"

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed "
                                 "(apt-get install chromium, or scripts/env.sh)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1 at a random free port with a known token, serving a COPY of the explorer
    notebook (so the source notebook never gets outputs), with autosave off and fresh settings."""
    root = tmp_path / "root"
    root.mkdir()
    nb = json.loads((ROOT / "notebooks" / "explorer.ipynb").read_text())
    model = os.environ.get("BMJ_EXPLORER_MODEL")  # default: the shipped demo model
    if model:
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        cell["source"] = "".join(cell["source"]).replace("model = 'demo'", f"model = {model!r}")
    (root / "explorer.ipynb").write_text(json.dumps(nb))
    settings = tmp_path / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    notif = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                         "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"), MPLBACKEND="Agg",
               BMJ_CACHE=os.environ.get("BMJ_CACHE", str(tmp_path / "cache")))
    log = tmp_path / "lab.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.expose_app_in_browser=True"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/api/status?token={token}", proc, log)
        yield base, token, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_explorer_generates_a_counterfactual_in_chromium(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token, log = lab
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            viewport={"width": 1280, "height": 1000})
        page = browser.new_page()
        try:
            page.goto(f"{base}/lab/tree/explorer.ipynb?token={token}", timeout=120_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
            # the notebook's kernel must be up before "Run All" (window.jupyterapp: --LabApp.expose_app_in_browser)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext", timeout=120_000)
            page.evaluate("async () => { const w = window.jupyterapp.shell.currentWidget;"
                          " await w.context.ready; await w.sessionContext.ready; }")
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            go = page.locator(".jupyter-widgets button", has_text="generate")
            select = page.locator(".jp-Dialog button", has_text="Select")
            t0 = time.time()
            while not go.is_visible():  # imports torch/diffusers, loads the prior
                if select.is_visible():  # JupyterLab may ask which kernel to start: the notebook's own
                    select.click()
                assert time.time() - t0 < 300, "the explorer widget did not appear within 300 s"
                page.wait_for_timeout(500)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-html-content')]"
                ".some(e => e.textContent.includes('prior loaded'))", timeout=120_000)
            go.click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-html-content')]"
                ".some(e => e.textContent.startsWith('done:') || e.textContent.includes('Error'))",
                timeout=420_000)
            status = page.locator(".widget-html-content", has_text="done:")
            assert status.count() == 1, page.locator(".widget-html-content").all_inner_texts()
            cf = page.locator("img.bmj-counterfactual")
            # the counterfactual image replaced the 8x8 placeholder: the model's 64 px output (or larger)
            w = cf.evaluate("img => img.complete ? img.naturalWidth : 0")
            assert w >= 32, f"counterfactual image not shown (naturalWidth {w})"
            text = page.locator(".widget-html-content", has_text="What changed").inner_text()
            assert len(text) > 40
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.keyboard.press("Control+b")  # hide the file browser: more room for the app
            page.locator(".jp-NotebookPanel .jp-CodeCell").nth(1).evaluate("e => e.scrollIntoView()")
            page.wait_for_timeout(500)
            page.screenshot(path=str(SCREENSHOT), full_page=False)
            assert SCREENSHOT.stat().st_size > 10_000
        except Exception:
            shot = Path(os.environ.get("BMJ_BROWSER_FAILURE_PNG", tmp_path / "failure.png"))
            page.screenshot(path=str(shot))
            print(f"screenshot of the failure: {shot}; lab log: {log}")
            raise
        finally:
            browser.close()
