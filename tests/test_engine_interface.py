"""What every lip-sync engine's `frames()` promises the speech pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gpuserver.avatar_manager import bundled_default_source
from gpuserver.engines.base import LipSyncEngine, PhaseSource, PreparedAvatar, Progress
from gpuserver.engines.warp import WarpEngine
from gpuserver.media import SAMPLES_PER_TICK

FRAME = (4, 4, 3)


class ReadAheadEngine(LipSyncEngine):
    """Like MuseTalk: reads two chunks of audio before drawing the first frame."""

    name = "read-ahead"

    def __init__(self) -> None:
        super().__init__(render_threads=1)
        self.closed = asyncio.Event()
        self.phases: list[int] = []

    def prepare(
        self, source: Path, avatar_id: str, cache_dir: Path, progress: Progress | None = None
    ) -> PreparedAvatar:
        raise NotImplementedError

    async def lip_sync(
        self, avatar: PreparedAvatar, audio: AsyncIterable[np.ndarray], phase: PhaseSource
    ) -> AsyncIterator[np.ndarray]:
        held: list[np.ndarray] = []
        try:
            async for chunk in audio:
                held.extend(chunk.reshape(-1, SAMPLES_PER_TICK))
                if len(held) > 2:
                    self.phases.append(phase())
                    block = held.pop(0)
                    yield np.full(FRAME, int(block[0]) % 256, np.uint8)
            for block in held:
                yield np.full(FRAME, int(block[0]) % 256, np.uint8)
        finally:
            self.closed.set()


def numbered_ticks(n: int) -> np.ndarray:
    """Tick k's samples all equal k, so a frame can say which audio it was drawn from."""
    return np.repeat(np.arange(n, dtype=np.int16), SAMPLES_PER_TICK)


async def in_chunks(pcm: np.ndarray, ticks: int) -> AsyncIterator[np.ndarray]:
    step = ticks * SAMPLES_PER_TICK
    for start in range(0, len(pcm), step):
        yield pcm[start : start + step]


AVATAR = PreparedAvatar("a", "digest", (np.zeros(FRAME, np.uint8),))


async def test_each_frame_comes_with_exactly_the_audio_it_was_made_from() -> None:
    engine = ReadAheadEngine()
    pairs = [pair async for pair in engine.frames(AVATAR, in_chunks(numbered_ticks(7), 1))]
    assert len(pairs) == 7
    for k, (frame, audio) in enumerate(pairs):
        assert int(frame[0, 0, 0]) == k
        assert len(audio) == SAMPLES_PER_TICK and (audio == k).all()


async def test_audio_that_is_not_whole_ticks_is_refused() -> None:
    engine = ReadAheadEngine()

    async def ragged() -> AsyncIterator[np.ndarray]:
        yield np.zeros(SAMPLES_PER_TICK + 1, np.int16)

    with pytest.raises(ValueError, match="not whole ticks"):
        [pair async for pair in engine.frames(AVATAR, ragged())]


async def test_closing_the_frames_closes_the_engine_at_once() -> None:
    engine = ReadAheadEngine()
    frames = engine.frames(AVATAR, in_chunks(numbered_ticks(50), 1))
    await anext(frames)
    await frames.aclose()
    assert engine.closed.is_set(), "an interrupt stops the engine, not the garbage collector"


async def test_warp_draws_speech_over_the_idle_loop_from_the_phase_it_is_given(
    tmp_path: Path,
) -> None:
    engine = WarpEngine()
    avatar = engine.prepare(bundled_default_source(), "default", tmp_path)
    silence = np.zeros(3 * SAMPLES_PER_TICK, np.int16)  # a closed mouth: the idle frame as is
    frames = [
        frame async for frame, _ in engine.frames(avatar, in_chunks(silence, 3), phase=lambda: 30)
    ]
    for k, frame in enumerate(frames):
        assert (frame == avatar.idle_frame(30 + k)).all()
    await engine.aclose()
