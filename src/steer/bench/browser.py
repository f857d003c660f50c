"""Open a report in headless Chromium: check that every image and plot loaded, and take screenshots."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["find_chromium", "check_page", "screenshot"]

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, NAMES) if p), None)


def _run(index: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise RuntimeError(f"no headless browser found (looked for {', '.join(NAMES)}); on Debian: apt-get install "
                           "chromium")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
                               Path(index).resolve().as_uri()], capture_output=True, text=True, timeout=timeout)


def check_page(index: "str | Path") -> dict:
    """Load the page, then read what its load handler found (``data-check`` on ``<body>``: images and inline SVG
    plots that failed to render) and every console message (the report logs none, so any is an error)."""
    out = _run(Path(index), "--dump-dom")
    m = re.search(r'data-check="(ok|broken) images=(\d+) plots=(\d+) broken=(\d+)"', out.stdout)
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    if m is None:
        return {"ok": False, "loaded": False, "console": console}
    return {"ok": m[1] == "ok" and not console, "loaded": True, "images": int(m[2]), "plots": int(m[3]),
            "broken": int(m[4]), "console": console}


def screenshot(index: "str | Path", png: "str | Path", width: int = 1400, height: int = 1800) -> Path:
    """A PNG of the page's first ``width`` × ``height`` pixels."""
    png = Path(png).resolve()
    out = _run(Path(index), f"--screenshot={png}", f"--window-size={width},{height}")
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot: {out.stderr.strip().splitlines()[-1:]}")
    return png
