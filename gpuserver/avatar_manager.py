"""Avatars: the registry (bundled default + the avatars directory), preparation, frame streams.

Preparing an avatar (face detection, engine-specific material) runs once per source on the
manager's own worker thread, one preparation at a time (uploads wait their turn and are told
their place), and is cached on disk by the engine. Prepared avatars are kept in memory up to
`memory_cache_mb`, least recently used first out; the default avatar always stays.

An upload never touches the avatar it replaces until it has been prepared: it is checked
(type, id, name, image size from the header: decompression bombs are never decoded), its id
reserved (a concurrent upload of the same id gets a conflict), written under a temporary
name, prepared, and only then renamed into place. A failure leaves the directory and the
cache as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import unicodedata
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from gpuserver.config import AvatarSettings
from gpuserver.engines.base import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    AvatarSourceError,
    LipSyncEngine,
    PreparedAvatar,
    Progress,
    source_digest,
)
from gpuserver.engines.image_size import check_image_pixels
from gpuserver.media import aligned_ticks
from gpuserver.tasks import WorkerPool

logger = logging.getLogger(__name__)

DEFAULT_AVATAR_ID = "default"
AVATAR_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SOURCE_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES
SCANNED_NAME_CHARS = 256  # names in hand-written metadata files are clipped to this
UPLOAD_PREFIX = ".upload-"  # temporary sources: hidden, and never a valid avatar id
MAX_OPEN_UPLOADS = 4  # uploads waiting or preparing, each holding its file in memory

# place(n): n preparations are ahead of this one (uploads report it as progress).
QueuePlace = Callable[[int], None]


class AvatarNotFoundError(LookupError):
    pass


class AvatarConflictError(RuntimeError):
    """The id is taken (or being uploaded) and the upload did not ask to replace it."""


class UploadsBusyError(RuntimeError):
    """`MAX_OPEN_UPLOADS` uploads are waiting or preparing already."""


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
        # Insertion order = recency of use: the first done entry is evicted first.
        self._prepared: OrderedDict[str, asyncio.Future[PreparedAvatar]] = OrderedDict()
        self._footprints: dict[str, int] = {}  # bytes held by each prepared avatar
        self._entries: dict[str, AvatarEntry] = _bundled()  # + the directory: `rescan`
        self._uploading: set[str] = set()  # ids reserved by uploads in progress
        self._turns = _Turns()
        # Threads of their own, not the loop's default executor (aiortc's encoders run
        # there); scans and file writes never queue behind a long preparation.
        self._preparation = WorkerPool("avatar-prepare", 1)
        self._files = WorkerPool("avatar-files", 1)

    async def aclose(self) -> None:
        """Stop the preparation and file threads (a running preparation finishes)."""
        self._preparation.shutdown()
        self._files.shutdown()

    # --- registry ------------------------------------------------------------------------

    async def rescan(self) -> None:
        """Pick up avatars added to, replaced in or removed from the avatars directory (by
        hand, by `gpuserver prepare-avatar`, by another process). Called on every listing:
        a scan is a directory listing plus a stat per avatar, on the file thread."""
        entries = await self._files.run(_scan, self.settings.dir)
        for avatar_id, old in self._entries.items():
            if entries.get(avatar_id) != old:  # gone or replaced: prepare afresh when used
                self._prepared.pop(avatar_id, None)
                self._footprints.pop(avatar_id, None)
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

    @property
    def in_memory(self) -> list[str]:
        """Ids of the prepared avatars held in memory, least recently used first."""
        return [i for i, task in self._prepared.items() if task.done() and not _failed(task)]

    async def prepared(self, avatar_id: str) -> PreparedAvatar:
        """The prepared avatar, preparing it (once, off the loop) on first use."""
        task = self._prepared.get(avatar_id)
        if task is None or _failed(task):
            if avatar_id not in self._entries:
                await self.rescan()  # perhaps added since the last listing
            entry = self.entry(avatar_id)
            task = asyncio.create_task(self._prepare(entry), name=f"prepare-{avatar_id}")
            self._prepared[avatar_id] = task
        self._prepared.move_to_end(avatar_id)
        # shield: one caller giving up must not cancel the preparation others wait for.
        avatar = await asyncio.shield(task)
        self._remember(avatar_id, task)
        return avatar

    async def _prepare(self, entry: AvatarEntry) -> PreparedAvatar:
        async with self._turns.turn(None):
            return await self._prepare_now(entry, None)

    async def _prepare_now(self, entry: AvatarEntry, progress: Progress | None) -> PreparedAvatar:
        """Prepare on the preparation thread; the caller holds a turn."""
        logger.info(
            "preparing avatar %r from %r with %s", entry.id, entry.source.name, self.engine.name
        )
        return await self._preparation.run(self._prepare_blocking, entry, progress)

    def _prepare_blocking(self, entry: AvatarEntry, progress: Progress | None) -> PreparedAvatar:
        """On the preparation thread: check the source, prepare it, and if that fails
        remove the cache entry it started (engines cache under <cache>/<engine>/<digest>)."""
        if entry.source.suffix.lower() in IMAGE_SUFFIXES:
            check_image_pixels(_read_head(entry.source), self.settings.max_image_pixels)
        cache_entry = self.settings.cache_dir / self.engine.name / source_digest(entry.source)
        existed = cache_entry.exists()
        try:
            return self.engine.prepare(entry.source, entry.id, self.settings.cache_dir, progress)
        except BaseException:
            if not existed:
                shutil.rmtree(cache_entry, ignore_errors=True)
            raise

    def _remember(self, avatar_id: str, task: asyncio.Future[PreparedAvatar]) -> None:
        """Account for a finished preparation and evict the least recently used over budget."""
        if self._prepared.get(avatar_id) is not task:
            return  # replaced meanwhile
        if avatar_id not in self._footprints:
            self._footprints[avatar_id] = footprint(task.result())
        budget = self.settings.memory_cache_mb * 1024 * 1024
        pinned = {self.settings.default, avatar_id}
        for candidate in self.in_memory:
            if sum(self._footprints.get(i, 0) for i in self.in_memory) <= budget:
                break
            if candidate not in pinned:
                del self._prepared[candidate]
                self._footprints.pop(candidate, None)
                logger.info("avatar %r evicted from memory (memory_cache_mb)", candidate)

    # --- uploads -------------------------------------------------------------------------

    async def begin_upload(
        self,
        data: bytes,
        filename: str,
        avatar_id: str | None = None,
        name: str | None = None,
        *,
        replace: bool = False,
    ) -> PendingUpload:
        """Check an upload and reserve its id, without touching the disk.

        Raises AvatarSourceError for an unusable upload (type, id, name, image size),
        AvatarConflictError if the id is being uploaded, or exists and `replace` is false,
        and UploadsBusyError while `MAX_OPEN_UPLOADS` others are open.
        """
        suffix = Path(filename).suffix.lower()
        if suffix not in SOURCE_SUFFIXES:
            allowed = ", ".join(sorted(SOURCE_SUFFIXES))
            shown = ascii(suffix[:16]) if suffix else "(none)"
            raise AvatarSourceError(f"unsupported file type {shown}; use {allowed}")
        avatar_id = avatar_id or _slug(Path(filename).stem)
        if not AVATAR_ID_PATTERN.match(avatar_id):
            raise AvatarSourceError("avatar id must be 1-64 letters, digits, '-' or '_'")
        if avatar_id == DEFAULT_AVATAR_ID:
            raise AvatarSourceError("the id 'default' is reserved for the bundled avatar")
        name = clean_name(name, self.settings.max_name_chars)
        if suffix in IMAGE_SUFFIXES:
            check_image_pixels(data, self.settings.max_image_pixels)
        if avatar_id in self._uploading:
            raise AvatarConflictError(f"avatar {avatar_id!r} is being uploaded right now")
        if len(self._uploading) >= MAX_OPEN_UPLOADS:
            raise UploadsBusyError(f"{MAX_OPEN_UPLOADS} uploads are in progress; try again later")
        exists = avatar_id in self._entries
        self._uploading.add(avatar_id)
        try:
            exists = exists or await self._files.run(_sources_of, self.settings.dir, avatar_id)
        except BaseException:
            self._uploading.discard(avatar_id)
            raise
        if exists and not replace:
            self._uploading.discard(avatar_id)
            raise AvatarConflictError(
                f"avatar {avatar_id!r} exists; upload with replace=true to replace it"
            )
        return PendingUpload(self, avatar_id, name, suffix, data)

    async def add(
        self,
        data: bytes,
        filename: str,
        avatar_id: str | None = None,
        name: str | None = None,
        progress: Progress | None = None,
        *,
        replace: bool = False,
    ) -> AvatarEntry:
        """Store an uploaded image/video as a new avatar and prepare it."""
        upload = await self.begin_upload(data, filename, avatar_id, name, replace=replace)
        return await upload.finish(progress)

    async def _store(
        self, upload: PendingUpload, progress: Progress | None, place: QueuePlace | None
    ) -> AvatarEntry:
        temporary = self.settings.dir / f"{UPLOAD_PREFIX}{secrets.token_hex(6)}{upload.suffix}"
        async with self._turns.turn(place):
            await self._files.run(_write_new, temporary, upload.data)
            try:
                staged = AvatarEntry(upload.avatar_id, upload.name or upload.avatar_id, temporary)
                prepared = await self._prepare_now(staged, progress)
                source = await self._files.run(
                    _install, temporary, upload.avatar_id, upload.name, upload.suffix
                )
            except BaseException:
                await self._files.run(lambda: temporary.unlink(missing_ok=True))
                raise
        modified = await self._files.run(_modified_ns, source)
        entry = AvatarEntry(upload.avatar_id, upload.name or upload.avatar_id, source, modified)
        self._entries[entry.id] = entry
        self._prepared.pop(entry.id, None)
        self._footprints.pop(entry.id, None)
        task = self._prepared[entry.id] = _resolved(prepared)
        self._remember(entry.id, task)
        logger.info("avatar %r stored as %r", entry.id, source.name)
        return entry

    # --- frame streams ---------------------------------------------------------------------

    async def generate_frames_stream(
        self, audio_data: np.ndarray | AsyncIterable[np.ndarray], avatar_id: str
    ) -> AsyncIterator[np.ndarray]:
        """One BGR uint8 (H, W, 3) frame per 640 samples of 16 kHz int16 `audio_data`.

        The seed's entry point; the speaking path uses `engine.frames`, which pairs each
        frame with its audio.
        """
        avatar = await self.prepared(avatar_id)
        chunks = _single(audio_data) if isinstance(audio_data, np.ndarray) else audio_data
        async with contextlib.aclosing(self.engine.frames(avatar, aligned_ticks(chunks))) as pairs:
            async for frame, _pcm in pairs:
                yield frame


@dataclass(eq=False)
class PendingUpload:
    """A checked upload whose id is reserved; `finish` stores and prepares it."""

    manager: AvatarManager
    avatar_id: str
    name: str | None
    suffix: str
    data: bytes

    async def finish(
        self, progress: Progress | None = None, place: QueuePlace | None = None
    ) -> AvatarEntry:
        """Prepare (after the preparations ahead: `place(n)` reports how many) and store it.

        On any failure nothing is left behind and an avatar it was to replace is untouched.
        The id is released either way.
        """
        try:
            return await self.manager._store(self, progress, place)
        finally:
            self.manager._uploading.discard(self.avatar_id)


class _Turns:
    """One at a time, first come first served; a waiter is told its place as it moves up."""

    def __init__(self) -> None:
        self._line: list[object] = []
        self._moved: asyncio.Future[None] | None = None  # resolved when someone leaves

    @contextlib.asynccontextmanager
    async def turn(self, place: QueuePlace | None) -> AsyncIterator[None]:
        ticket = object()
        self._line.append(ticket)
        try:
            while (ahead := self._line.index(ticket)) > 0:
                if place is not None:
                    place(ahead)
                if self._moved is None:
                    self._moved = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._moved)  # shared: one waiter's cancel is its own
            yield
        finally:
            self._line.remove(ticket)
            if self._moved is not None:
                self._moved.set_result(None)
                self._moved = None


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
            name = str(json.loads(meta.read_text())["name"])
            return clean_name(name[:SCANNED_NAME_CHARS], SCANNED_NAME_CHARS) or source.stem
        except (ValueError, KeyError, OSError):
            logger.warning("ignoring unreadable avatar metadata %r", meta.name)
    return source.stem


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:64] or "avatar"


def clean_name(name: str | None, max_chars: int) -> str | None:
    """A display name fit for every user's greeting: no control or format characters,
    whitespace collapsed; AvatarSourceError if longer than `max_chars`. None if empty."""
    if name is None:
        return None
    spaced = " ".join(name.split())  # newlines and tabs become spaces first
    cleaned = " ".join(
        "".join(c for c in spaced if not unicodedata.category(c).startswith("C")).split()
    )
    if len(cleaned) > max_chars:
        raise AvatarSourceError(f"the avatar name must be at most {max_chars} characters")
    return cleaned or None


def footprint(value: Any, seen: set[int] | None = None) -> int:
    """Bytes held by the arrays/tensors inside a prepared avatar (dataclasses, tuples...)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray) or hasattr(value, "element_size"):
        return int(value.nbytes)  # numpy arrays and torch tensors
    if is_dataclass(value) and not isinstance(value, type):
        return sum(footprint(getattr(value, f.name), seen) for f in fields(value))
    if isinstance(value, (tuple, list)):
        return sum(footprint(item, seen) for item in value)
    if isinstance(value, dict):
        return sum(footprint(item, seen) for item in value.values())
    return 0


def _read_head(source: Path) -> bytes:
    """Enough of an image file to find its size (a JPEG's frame header follows its EXIF)."""
    with source.open("rb") as file:
        return file.read(1 << 20)


def _sources_of(directory: Path, avatar_id: str) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.glob(f"{avatar_id}.*") if p.suffix.lower() in SOURCE_SUFFIXES]


def _write_new(temporary: Path, data: bytes) -> None:
    temporary.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_bytes(data)


def _install(temporary: Path, avatar_id: str, name: str | None, suffix: str) -> Path:
    """Move a prepared upload into place, replacing the avatar's old source and name."""
    directory = temporary.parent
    source = directory / f"{avatar_id}{suffix}"
    meta = source.with_suffix(".json")
    if name:
        staged_meta = directory / f"{UPLOAD_PREFIX}{secrets.token_hex(6)}.json"
        staged_meta.write_text(json.dumps({"name": name}))
        os.replace(staged_meta, meta)
    else:
        meta.unlink(missing_ok=True)
    os.replace(temporary, source)
    for old in _sources_of(directory, avatar_id):
        if old != source:
            old.unlink(missing_ok=True)
    return source


def _failed(task: asyncio.Future[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _resolved(value: PreparedAvatar) -> asyncio.Future[PreparedAvatar]:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def _single(pcm: np.ndarray) -> AsyncIterator[np.ndarray]:
    yield pcm
