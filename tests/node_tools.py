"""The Node packages some tests check documents with, installed from scratch when missing.

`tests/node/package.json` and its lock name them: the official AsyncAPI JSON Schemas
(`@asyncapi/specs`) and the Mermaid parser (`mermaid`). They are installed with `npm ci` into
the ignored `.cache/node` (also `make node-deps`), again whenever the lock changes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCE = PROJECT_ROOT / "tests" / "node"
NODE_DIR = PROJECT_ROOT / ".cache" / "node"
FILES = ("package.json", "package-lock.json", "mermaid_parse.mjs")


def node_dir() -> Path:
    """.cache/node with its packages installed (npm ci when missing or out of date)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed to check the AsyncAPI and Mermaid documents")
    stamp = NODE_DIR / ".installed"
    lock = (SOURCE / "package-lock.json").read_text()
    if not stamp.exists() or stamp.read_text() != lock:
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copy(SOURCE / name, NODE_DIR / name)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=600,
        )
        stamp.write_text(lock)
    for name in FILES:  # the script may change without the lock
        shutil.copy(SOURCE / name, NODE_DIR / name)
    return NODE_DIR


def asyncapi_schema(version: str = "3.0.0") -> dict:
    """The official AsyncAPI JSON Schema (bundled, from @asyncapi/specs)."""
    path = node_dir() / "node_modules" / "@asyncapi" / "specs" / "schemas" / f"{version}.json"
    return json.loads(path.read_text())


def mermaid_parse(diagrams: list[str]) -> list[dict]:
    """Each diagram through mermaid.parse in node: {ok, type} or {ok: False, error}."""
    folder = node_dir()
    done = subprocess.run(
        ["node", "mermaid_parse.mjs"],
        cwd=folder,
        input=json.dumps(diagrams),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)
