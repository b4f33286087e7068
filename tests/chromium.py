"""Headless Chromium for the page tests: load a page with a probe script and read what it wrote, or screenshot it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="Debian chromium not installed at /usr/bin/chromium")


def _cmd(profile: Path) -> list[str]:
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}"]


def probe(page: Path, script_body: str, tmp_path: Path) -> str:
    """Load a copy of ``page`` with ``script_body`` run on load (it returns a string), and return that string."""
    script = ("<script>window.addEventListener('load',function(){var out=(function(){" + script_body + "})();"
              "var p=document.createElement('pre');p.id='probe';p.textContent=out;document.body.appendChild(p)});"
              "</script>")
    copy = tmp_path / "probe.html"
    copy.write_text(page.read_text().replace("</body>", script + "</body>"))
    res = subprocess.run(_cmd(tmp_path / "profile") + ["--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="probe">([^<]*)</pre>', res.stdout)
    assert found, res.stdout[-2000:]
    return found.group(1)


def screenshot(page: Path, shot: Path, tmp_path: Path, size: str = "1200,3000") -> None:
    res = subprocess.run(_cmd(tmp_path / "profile") + [f"--screenshot={shot}", f"--window-size={size}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
