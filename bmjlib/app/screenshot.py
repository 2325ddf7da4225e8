"""The explorer in a real browser: JupyterLab on loopback, headless Chromium through Playwright.

`capture()` serves a copy of notebooks/explorer.ipynb (the source notebook never gets outputs), runs it,
generates one counterfactual through the widgets and saves a screenshot. The browser test
(tests/test_explorer_browser.py) runs it into a temporary folder; the committed screenshot is refreshed with

    python -m bmjlib.app.screenshot figures/explorer.png

Needs Chromium (`apt-get install chromium`, or scripts/env.sh) and Playwright (`pip install -e '.[test]'`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from bmjlib.runtime import resolve

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "notebooks/explorer.ipynb"


class ScreenshotError(RuntimeError):
    """The explorer did not produce a counterfactual in the browser; the message says what was seen."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
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


@contextlib.contextmanager
def jupyter_lab(work: Path, model: str | None = None) -> Iterator[tuple[str, str, Path]]:
    """JupyterLab on 127.0.0.1 at a random free port with a known token, serving a COPY of the explorer
    notebook (with `model` instead of the shipped demo model when given), autosave off, fresh settings,
    everything under `work`. Yields (base url, token, log file)."""
    root = work / "root"
    root.mkdir(parents=True)
    nb = json.loads(resolve(NOTEBOOK).read_text())
    if model:
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        cell["source"] = "".join(cell["source"]).replace("model = 'demo'", f"model = {model!r}")
    (root / "explorer.ipynb").write_text(json.dumps(nb))
    settings = work / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    notif = work / "settings" / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                         "checkForUpdates": False}))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(work / "cfg"), JUPYTER_RUNTIME_DIR=str(work / "rt"),
               JUPYTERLAB_SETTINGS_DIR=str(work / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / "ws"), MPLBACKEND="Agg",
               BMJ_CACHE=os.environ.get("BMJ_CACHE", str(work / "cache")))
    log = work / "lab.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.expose_app_in_browser=True"]
            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
            cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/status?token={token}", proc, log)
        yield base, token, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def capture(out: str | os.PathLike, work: str | os.PathLike, model: str | None = None,
            chromium: str = CHROMIUM, failure_png: str | os.PathLike | None = None) -> dict:
    """Run the explorer notebook in headless Chromium, generate one counterfactual through the widgets and
    write the screenshot to `out`. Returns what the page showed: {"status", "counterfactual_px",
    "interpretation", "bytes"}. On failure a screenshot of the page goes to `failure_png` (default
    work/failure.png) and the error names it and the JupyterLab log."""
    # optional (test extra): only the screenshot needs Playwright
    from playwright.sync_api import sync_playwright

    work, out = Path(work), Path(out)
    with jupyter_lab(work, model) as (base, token, log), sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(work / "chromium-profile"), executable_path=chromium, headless=True,
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
                if time.time() - t0 > 300:
                    raise ScreenshotError("the explorer widget did not appear within 300 s")
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
            if status.count() != 1:
                raise ScreenshotError(f"no counterfactual: {page.locator('.widget-html-content').all_inner_texts()}")
            # the counterfactual image replaced the 8x8 placeholder: naturalWidth is the model's output size
            px = page.locator("img.bmj-counterfactual").evaluate("img => img.complete ? img.naturalWidth : 0")
            text = page.locator(".widget-html-content", has_text="What changed").inner_text()
            page.keyboard.press("Control+b")  # hide the file browser: more room for the app
            page.locator(".jp-NotebookPanel .jp-CodeCell").nth(1).evaluate("e => e.scrollIntoView()")
            page.wait_for_timeout(500)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=False)
            return {"status": status.inner_text(), "counterfactual_px": px, "interpretation": text,
                    "bytes": out.stat().st_size}
        except Exception as e:
            shot = Path(failure_png or work / "failure.png")
            page.screenshot(path=str(shot))
            raise ScreenshotError(f"{type(e).__name__}: {e}\nscreenshot of the failure: {shot}; "
                                  f"JupyterLab log: {log}") from e
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bmjlib.app.screenshot",
                                 description="Screenshot the explorer generating one counterfactual in headless "
                                             "Chromium (refreshes figures/explorer.png).")
    ap.add_argument("out", nargs="?", default="figures/explorer.png")
    ap.add_argument("--model", default=None, help="model name or folder (default: the shipped demo model)")
    ap.add_argument("--chromium", default=CHROMIUM)
    a = ap.parse_args(argv)
    out = resolve(a.out)
    with tempfile.TemporaryDirectory(prefix="bmj-screenshot-") as work:
        seen = capture(out, work, model=a.model, chromium=a.chromium,
                       failure_png=Path(tempfile.gettempdir()) / "bmj-explorer-failure.png")
    print(f"{seen['status']}; counterfactual {seen['counterfactual_px']} px; written {out} ({seen['bytes']:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
