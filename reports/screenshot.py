"""A PNG of a report page taken by headless Chromium (for READMEs and quick looks)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
# no background networking: the report is self-contained and the machine may have no network
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


def take_screenshot(html: Path, png: Path, view: str = "", size: tuple[int, int] = (1280, 1400),
                    timeout: float = 120) -> Path:
    """Open ``html`` (``view``: a tab name or ``sample=ID`` / ``image=ID``) and save a screenshot."""
    browser = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    if browser is None:
        raise RuntimeError("--screenshot needs Chromium (Debian: apt-get install chromium; bin/ensure-chromium)")
    url = Path(html).resolve().as_uri() + (f"#{view}" if view else "")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                        "--virtual-time-budget=5000", f"--screenshot={png}", url],
                       check=True, capture_output=True, timeout=timeout)
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot of {url}")
    return png
