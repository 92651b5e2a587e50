"""Secrets of the embedded stack: generated at first use into `<run_dir>/secrets/`, one file per
secret, mode 0600 in a 0700 folder. Never printed, logged or put on a command line (DESIGN §9):
they reach the processes through their environment and the servers through files."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def secret(run_dir: Path | str, name: str) -> str:
    """The secret `name` of this run folder, created (random, URL-safe) if it does not exist."""
    directory = Path(run_dir) / "secrets"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / name
    if not path.exists():
        # written aside, then linked into place: a concurrent first start (two terminals,
        # parallel tests) sees either no file or a complete one, and both end up agreeing
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    return path.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by its owner only (mode 0600), atomically."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def redact_url(url: str) -> str:
    """The URL with its password (in the authority or a `password=` parameter) masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
