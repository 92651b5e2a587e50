"""The browser libraries the console serves, vendored from their npm packages.

`make console-assets` runs `npm ci` on sagactl/console/vendor/package.json (exact versions in
its package-lock.json) into CONSOLE_ASSETS_DIR (default .cache/console-assets, ignored by
git); the console serves the few files below from there, so a page needs nothing from the
internet.
"""

from __future__ import annotations

import os
from pathlib import Path

from service_runtime.config import PROJECT_ROOT

# name in /assets/ -> file inside node_modules
FILES = {
    "htmx.min.js": "htmx.org/dist/htmx.min.js",
    "mermaid.min.js": "mermaid/dist/mermaid.min.js",
    "uPlot.iife.min.js": "uplot/dist/uPlot.iife.min.js",
    "uPlot.min.css": "uplot/dist/uPlot.min.css",
}


def assets_dir() -> Path:
    return Path(os.environ.get("CONSOLE_ASSETS_DIR") or PROJECT_ROOT / ".cache" / "console-assets")


def asset_path(name: str) -> Path | None:
    """The file behind /assets/NAME, or None when NAME is not one of ours."""
    relative = FILES.get(name)
    return assets_dir() / "node_modules" / relative if relative else None


def missing() -> list[str]:
    """The assets not installed (the page then says to run `make console-assets`)."""
    return [name for name in FILES if not (asset_path(name) or Path()).is_file()]
