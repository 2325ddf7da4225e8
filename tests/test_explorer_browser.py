"""The explorer in a real browser: JupyterLab on loopback, headless Chromium through Playwright, run the
notebook, generate one counterfactual through the widgets, screenshot into the test's temporary folder
(bmjlib.app.screenshot.capture; `python -m bmjlib.app.screenshot figures/explorer.png` refreshes the
committed screenshot with the same code)."""
import os
from pathlib import Path

import pytest

from bmjlib.app.screenshot import CHROMIUM, capture

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed "
                                 "(apt-get install chromium, or scripts/env.sh)")]


def test_explorer_generates_a_counterfactual_in_chromium(tmp_path):
    pytest.importorskip("playwright")  # the test extra: pip install -e '.[test]'
    out = tmp_path / "explorer.png"
    seen = capture(out, tmp_path / "work", model=os.environ.get("BMJ_EXPLORER_MODEL"),  # default: the demo model
                   failure_png=os.environ.get("BMJ_BROWSER_FAILURE_PNG"))
    assert seen["status"].startswith("done: 1 image"), seen
    # the counterfactual image replaced the 8x8 placeholder: the model's 64 px output (or larger)
    assert seen["counterfactual_px"] >= 32, seen
    assert len(seen["interpretation"]) > 40, seen
    assert out.stat().st_size == seen["bytes"] > 10_000
