"""Avatars: the registry (bundled default + the avatars directory), preparation, frame streams.

Preparing an avatar (face detection, engine-specific material) runs once per source in a
worker thread and is cached on disk by the engine; prepared avatars stay in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from gpuserver.config import AvatarSettings
from gpuserver.engines.base import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    AvatarSourceError,
    LipSyncEngine,
    PreparedAvatar,
    Progress,
)
from gpuserver.media import SAMPLES_PER_TICK, aligned_ticks

logger = logging.getLogger(__name__)

DEFAULT_AVATAR_ID = "default"
AVATAR_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SOURCE_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES


class AvatarNotFoundError(LookupError):
    pass


@dataclass(frozen=True)
class AvatarEntry:
    id: str
    name: str
    source: Path
    # The source's modification time: a file replaced under the same name is a new entry.
    modified_ns: int = 0


def bundled_default_source() -> Path:
    return Path(str(resources.files("gpuserver") / "assets" / "avatars" / "default.png"))


class AvatarManager:
    def __init__(self, engine: LipSyncEngine, settings: AvatarSettings) -> None:
        self.engine = engine
        self.settings = settings
        self._prepared: dict[str, asyncio.Task[PreparedAvatar]] = {}
        self._entries: dict[str, AvatarEntry] = _bundled()  # + the directory: `rescan`

    # --- registry ------------------------------------------------------------------------

    async def rescan(self) -> None:
        """Pick up avatars added to, replaced in or removed from the avatars directory (by
        hand, by `gpuserver prepare-avatar`, by another process). Called on every listing:
        a scan is a directory listing plus a stat per avatar, off the event loop."""
        entries = await asyncio.to_thread(_scan, self.settings.dir)
        for avatar_id, old in self._entries.items():
            if entries.get(avatar_id) != old:  # gone or replaced: prepare afresh when used
                self._prepared.pop(avatar_id, None)
        self._entries = entries

    def entries(self) -> list[AvatarEntry]:
        return list(self._entries.values())

    def entry(self, avatar_id: str) -> AvatarEntry:
        entry = self._entries.get(avatar_id)
        if entry is None:
            known = ", ".join(self._entries)
            raise AvatarNotFoundError(f"unknown avatar {avatar_id!r}; available: {known}")
        return entry

    # --- preparation ---------------------------------------------------------------------

    async def prepared(self, avatar_id: str) -> PreparedAvatar:
        """The prepared avatar, preparing it (once, off the loop) on first use."""
        task = self._prepared.get(avatar_id)
        if task is None or (task.done() and task.exception() is not None):
            if avatar_id not in self._entries:
                await self.rescan()  # perhaps added since the last listing
            entry = self.entry(avatar_id)
            task = asyncio.create_task(self._prepare(entry), name=f"prepare-{avatar_id}")
            self._prepared[avatar_id] = task
        # shield: one caller giving up must not cancel the preparation others wait for.
        return await asyncio.shield(task)

    async def _prepare(
        self, entry: AvatarEntry, progress: Progress | None = None
    ) -> PreparedAvatar:
        logger.info("preparing avatar %r from %s with %s", entry.id, entry.source, self.engine.name)
        return await asyncio.to_thread(
            self.engine.prepare, entry.source, entry.id, self.settings.cache_dir, progress
        )

    async def add(
        self,
        data: bytes,
        filename: str,
        avatar_id: str | None = None,
        name: str | None = None,
        progress: Progress | None = None,
    ) -> AvatarEntry:
        """Store an uploaded image/video as a new avatar and prepare it."""
        suffix = Path(filename).suffix.lower()
        if suffix not in SOURCE_SUFFIXES:
            allowed = ", ".join(sorted(SOURCE_SUFFIXES))
            raise AvatarSourceError(f"unsupported file type {suffix or '(none)'}; use {allowed}")
        avatar_id = avatar_id or _slug(Path(filename).stem)
        if not AVATAR_ID_PATTERN.match(avatar_id):
            raise AvatarSourceError("avatar id must be 1-64 letters, digits, '-' or '_'")
        if avatar_id == DEFAULT_AVATAR_ID:
            raise AvatarSourceError("the id 'default' is reserved for the bundled avatar")
        directory = self.settings.dir
        source = directory / f"{avatar_id}{suffix}"
        modified = await asyncio.to_thread(_write_source, directory, avatar_id, source, data, name)
        entry = AvatarEntry(avatar_id, name or avatar_id, source, modified)
        try:
            prepared = await self._prepare(entry, progress)
        except Exception:
            await asyncio.to_thread(_remove_source, source)
            raise
        self._entries[avatar_id] = entry
        self._prepared[avatar_id] = _done_task(prepared)
        return entry

    # --- frame streams -------------------------------------------------------------------

    async def generate_av_stream(
        self, audio: AsyncIterable[np.ndarray], avatar_id: str
    ) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """(frame, its 640 samples) pairs for tick-aligned `audio`, as the engine makes them."""
        avatar = await self.prepared(avatar_id)
        pending: deque[np.ndarray] = deque()

        async def remember_ticks() -> AsyncIterator[np.ndarray]:
            async for pcm in audio:
                pending.extend(np.split(pcm, len(pcm) // SAMPLES_PER_TICK))
                yield pcm

        # Engines may read ahead (MuseTalk needs audio context), so pair by order, not by time.
        async for frame in self.engine.frames(avatar, remember_ticks()):
            yield frame, pending.popleft()

    async def generate_frames_stream(
        self, audio_data: np.ndarray | AsyncIterable[np.ndarray], avatar_id: str
    ) -> AsyncIterator[np.ndarray]:
        """One BGR uint8 (H, W, 3) frame per 640 samples of 16 kHz int16 `audio_data`."""
        chunks = _single(audio_data) if isinstance(audio_data, np.ndarray) else audio_data
        async for frame, _pcm in self.generate_av_stream(aligned_ticks(chunks), avatar_id):
            yield frame


def _bundled() -> dict[str, AvatarEntry]:
    default = AvatarEntry(DEFAULT_AVATAR_ID, "Astronaut", bundled_default_source())
    return {DEFAULT_AVATAR_ID: default}


def _modified_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _scan(directory: Path) -> dict[str, AvatarEntry]:
    """The bundled default plus every `<id>.<image|video>` in `directory` (blocking)."""
    found = _bundled()
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.suffix.lower() in SOURCE_SUFFIXES and AVATAR_ID_PATTERN.match(path.stem):
                entry = AvatarEntry(path.stem, _display_name(path), path, _modified_ns(path))
                found[path.stem] = entry
    return found


def _display_name(source: Path) -> str:
    meta = source.with_suffix(".json")
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text())["name"])
        except (ValueError, KeyError, OSError):
            logger.warning("ignoring unreadable avatar metadata %s", meta)
    return source.stem


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:64] or "avatar"


def _write_source(
    directory: Path, avatar_id: str, source: Path, data: bytes, name: str | None
) -> int:
    """Store the avatar's files; returns the source's modification time."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(f"{avatar_id}.*"):
        old.unlink()
    source.write_bytes(data)
    if name:
        source.with_suffix(".json").write_text(json.dumps({"name": name}))
    return _modified_ns(source)


def _remove_source(source: Path) -> None:
    source.unlink(missing_ok=True)
    source.with_suffix(".json").unlink(missing_ok=True)


def _done_task(value: PreparedAvatar) -> asyncio.Task[PreparedAvatar]:
    async def ready() -> PreparedAvatar:
        return value

    return asyncio.ensure_future(ready())


async def _single(pcm: np.ndarray) -> AsyncIterator[np.ndarray]:
    yield pcm
