"""A headless Chromium for the web pages' tests, and the content policy refusals it saw."""

from __future__ import annotations

import shutil

import pytest
from playwright.sync_api import Page

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Flags for a headless Chromium on a machine without a network beyond loopback.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not shutil.which(CHROMIUM), reason="needs Chromium (apt-get install chromium)"
)

#: Collects the page's content policy violations (a test's script runs whatever the policy).
RECORD_VIOLATIONS = """
window.violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.violations.push(
    {directive: e.violatedDirective, source: e.sourceFile, blocked: e.blockedURI}));
"""


def violations(page: Page) -> list[dict[str, str]]:
    """What the policy refused on ``page`` that is not plotly styling itself: plotly (from
    its own file) adds a stylesheet for maps, unused here, and some empty style attributes."""
    seen: list[dict[str, str]] = page.evaluate("window.violations ?? []")
    plotly = ("style-src-elem", "style-src-attr")
    return [v for v in seen if not (v["directive"] in plotly and v["source"].endswith("/plotly.min.js"))]
