"""Where things live. Embedded default: everything under the working folder; environment
variables move each piece to a cluster without code changes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def home() -> Path:
    """LORAFLEET_HOME, else the current folder: holds mlflow.db, artefacts and checkpoints."""
    return Path(os.environ.get("LORAFLEET_HOME", os.getcwd())).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI (a server on a cluster), else SQLite in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Local artefact folder for the embedded store; a server chooses (and proxies) its own."""
    if tracking_uri().startswith(("http://", "https://")):
        return None
    return (home() / "mlartifacts").as_uri()


def storage_path() -> str:
    """Checkpoints: LORAFLEET_STORAGE_PATH (e.g. s3://bucket/checkpoints), else a local folder."""
    return os.environ.get("LORAFLEET_STORAGE_PATH") or str(home() / "checkpoints")


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


@contextmanager
def environ(values: dict[str, str | None]) -> Iterator[None]:
    """os.environ with these values set inside (None: the name unset); after, these names only
    come back as they were (whatever else changed meanwhile stays: Ray sets RAY_AUTH_MODE while it
    starts a cluster)."""
    saved = {name: os.environ.get(name) for name in values}
    _put(values)
    try:
        yield
    finally:
        _put(saved)


def _put(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
