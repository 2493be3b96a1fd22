"""Helpers every engine's `prepare` shares: progress reporting and crash-safe cache files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gpuserver.engines.base import Progress


def report(progress: Progress | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, fraction)


def scaled(progress: Progress | None, start: float, end: float) -> Progress | None:
    """Map a sub-stage's 0..1 progress onto [start, end] of the whole preparation."""
    if progress is None:
        return None
    return lambda stage, fraction: progress(stage, start + (end - start) * fraction)


def write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a torn cache file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
