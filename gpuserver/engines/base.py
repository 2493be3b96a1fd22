"""The lip-sync engine interface every engine implements (warp on CPU, musetalk on GPU)."""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from gpuserver.config import EngineSettings
from gpuserver.media import SAMPLES_PER_TICK
from gpuserver.tasks import WorkerPool

# progress(stage, fraction) — fraction in [0, 1]; used for CLI progress bars and upload status.
Progress = Callable[[str, float], None]
# The idle-loop phase the first speech frame is drawn over; asked when that frame is drawn,
# so speech continues the idle animation (blinks, breathing) where it is.
PhaseSource = Callable[[], int]
# One tick of speech: a BGR frame and exactly the 640 samples it was made from.
SpeechFrame = tuple[np.ndarray, np.ndarray]

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
    """Turns speech audio into lip-synced frames of a prepared avatar.

    CPU work of `frames` (rendering, pasting, feature extraction) runs on the engine's own
    bounded `render_pool`, never on the event loop nor on its default executor (aiortc's
    encoders use that one).
    """

    name: ClassVar[str]

    def __init__(self, render_threads: int = 2) -> None:
        self.render_pool = WorkerPool(f"{self.name}-render", render_threads)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> LipSyncEngine:
        """The engine configured by the `[engine]` settings (engines with options override)."""
        return cls(render_threads=settings.render_threads)

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

    async def frames(
        self,
        avatar: PreparedAvatar,
        audio: AsyncIterable[np.ndarray],
        phase: PhaseSource = lambda: 0,
    ) -> AsyncIterator[SpeechFrame]:
        """(frame, its 640 samples) for every tick of `audio`, in order.

        `audio` yields 16 kHz mono int16 chunks whose lengths are multiples of 640. Closing
        this iterator (an interrupt) stops the engine's pending work at once.
        """
        pending: deque[np.ndarray] = deque()

        async def remembered() -> AsyncIterator[np.ndarray]:
            async for pcm in audio:
                if len(pcm) % SAMPLES_PER_TICK:
                    raise ValueError(f"audio chunk of {len(pcm)} samples is not whole ticks")
                pending.extend(pcm.reshape(-1, SAMPLES_PER_TICK))
                yield pcm

        # Engines may read ahead (MuseTalk needs audio context): pair by order, not by time.
        ticks = remembered()
        async with (
            contextlib.aclosing(ticks),
            contextlib.aclosing(self.lip_sync(avatar, ticks, phase)) as lip_synced,
        ):
            async for frame in lip_synced:
                yield frame, pending.popleft()

    @abstractmethod
    def lip_sync(
        self, avatar: PreparedAvatar, audio: AsyncIterable[np.ndarray], phase: PhaseSource
    ) -> AsyncIterator[np.ndarray]:
        """One BGR uint8 frame per 640 samples of `audio`, in order, drawn over the idle
        loop from phase `phase()` on. Closing the iterator stops all pending work."""

    @property
    def latest_batch(self) -> int | None:
        """Frames in the engine's latest batch across sessions (None: it does not batch)."""
        return None

    async def aclose(self) -> None:
        """Release models and threads (subclasses with more resources extend it)."""
        self.render_pool.shutdown()


def source_digest(source: Path) -> str:
    """A short content hash of an avatar source: the key of its preparation cache."""
    digest = hashlib.sha256()
    with source.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
