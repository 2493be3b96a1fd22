"""The lip-sync engine interface every engine implements (warp on CPU, musetalk on GPU)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from gpuserver.config import EngineSettings

# progress(stage, fraction) — fraction in [0, 1]; used for CLI progress bars and upload status.
Progress = Callable[[str, float], None]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi"})


class AvatarSourceError(ValueError):
    """The avatar source cannot be used (unreadable, no face found, unsupported type)."""


@dataclass(eq=False)
class PreparedAvatar:
    """What an engine needs to animate one avatar, built once by `LipSyncEngine.prepare`.

    Engines subclass it to add their own data. `idle_frames` is the loop played between
    utterances (blinks, breathing); every frame is BGR uint8 (H, W, 3).
    """

    avatar_id: str
    source_digest: str
    idle_frames: tuple[np.ndarray, ...] = field(repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame of this avatar."""
        height, width = self.idle_frames[0].shape[:2]
        return width, height

    def idle_frame(self, tick: int) -> np.ndarray:
        return self.idle_frames[tick % len(self.idle_frames)]


class LipSyncEngine(ABC):
    name: ClassVar[str]

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> LipSyncEngine:
        """The engine configured by the `[engine]` settings (engines with options override)."""
        return cls()

    @abstractmethod
    def prepare(
        self,
        source: Path,
        avatar_id: str,
        cache_dir: Path,
        progress: Progress | None = None,
    ) -> PreparedAvatar:
        """Build (or load from `cache_dir`) everything needed to animate `source`.

        Blocking: callers run it in a worker thread. Results are cached under
        `cache_dir / self.name / source_digest(source)` so a second call is cheap.
        Raises AvatarSourceError for unusable sources.
        """

    @abstractmethod
    def frames(
        self, avatar: PreparedAvatar, audio: AsyncIterable[np.ndarray]
    ) -> AsyncIterator[np.ndarray]:
        """Yield one BGR uint8 frame per 640 samples of `audio`, in order.

        `audio` yields 16 kHz mono int16 chunks whose lengths are multiples of 640. Heavy
        work runs off the event loop. Cancelling the iteration stops all pending work.
        """

    async def aclose(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Release models/threads. Engines without resources need not override."""


def source_digest(source: Path) -> str:
    """A short content hash of an avatar source: the key of its preparation cache."""
    digest = hashlib.sha256()
    with source.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
