"""The cached measurement files (JSON in the cache directory): read, written whole by an
atomic rename (concurrent runs may write them), and extended with what the engine's runs
observe (the newest few values of a rate, kept under a key of their own)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def read_json(path: Path) -> dict | None:
    """The file's object, or None when it is missing or unreadable (with a warning)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable profile %s (%s)", path, err)
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def observe(path: Path, key: str, value: float, keep: int) -> list[float] | None:
    """Append ``value`` to the list under ``key`` in an existing profile, keeping the newest
    ``keep``; returns the list, or None when there is no profile to add to or it cannot be
    written (logged: an observation never fails the run that made it)."""
    data = read_json(path)
    if data is None:
        return None
    data[key] = [*(data.get(key) or []), value][-keep:]
    try:
        write_json(path, data)
    except OSError as err:
        logger.warning("could not record %s in %s: %s", key, path, err)
        return None
    return data[key]
