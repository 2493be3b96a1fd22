"""One turn's speech pipeline: TTS -> engine -> paired ticks -> the clock's queue.

A fake TTS yields long speech at once; the pipeline must queue exactly its ticks, each frame
with its own audio, close the turn after the last one, close the turn even when synthesis
fails half-way, and — cut by an interrupt — stop at once: no end marker, the TTS stream
closed, and (MuseTalk) every pending engine job dropped from the shared batcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from gpuserver.avatar_manager import bundled_default_source
from gpuserver.engines.base import LipSyncEngine, PreparedAvatar
from gpuserver.engines.musetalk.engine import MusetalkEngine
from gpuserver.engines.warp import WarpEngine
from gpuserver.media import SAMPLES_PER_TICK
from gpuserver.media_clock import EndOfTurn, MediaClock, SpeechQueue, SpeechTick
from gpuserver.speech_pipeline import SpeechPipeline
from gpuserver.speech_timeline import SpeechTimeline
from gpuserver.tts.base import SpeechChunk, TTSBackend, TTSError, Word
from tests.musetalk_fixtures import musetalk_engine, noise_speech, tiny_models_dir

__all__ = ["musetalk_engine", "tiny_models_dir"]  # fixtures


class ScriptedTTS(TTSBackend):
    """Speaks each text as `ticks` ticks of noise, in chunks of `chunk` samples (not whole
    ticks); can fail after some chunks."""

    name = "scripted"

    def __init__(
        self, ticks: int = 20, chunk: int = 3 * SAMPLES_PER_TICK + 7, fail_after: int | None = None
    ) -> None:
        self.ticks = ticks
        self.chunk = chunk
        self.fail_after = fail_after
        self.closed = asyncio.Event()

    async def synthesize(self, text: str, voice: str | None = None) -> AsyncIterator[SpeechChunk]:
        pcm = noise_speech(self.ticks)
        try:
            for n, start in enumerate(range(0, len(pcm), self.chunk)):
                if self.fail_after is not None and n >= self.fail_after:
                    raise TTSError("the voice broke")
                words = (Word(text.split()[0], 0),) if n == 0 else ()
                yield SpeechChunk(pcm[start : start + self.chunk], words)
                await asyncio.sleep(0)
        finally:
            self.closed.set()


async def say(text: str) -> AsyncIterator[str]:
    yield text


def clock(queue_ticks: int = 500) -> MediaClock:
    idle = lambda phase: np.zeros((4, 4, 3), np.uint8)  # noqa: E731
    return MediaClock(SpeechQueue(queue_ticks), idle, sink=None, listener=None)  # type: ignore[arg-type]


async def until(condition: Callable[[], bool]) -> None:
    """Poll: the pipeline's tasks run in real time and expose no event to wait on."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def drain(queue: SpeechQueue) -> list[SpeechTick | EndOfTurn]:
    items = []
    while queue.peek() is not None:
        items.append(queue.popleft())
    return items


@pytest.fixture(scope="module")
def warp() -> tuple[LipSyncEngine, PreparedAvatar]:
    engine = WarpEngine()
    return engine, engine.prepare(bundled_default_source(), "default", Path("/tmp/gpuserver-test"))


async def test_a_turn_queues_each_frame_with_its_own_audio_then_its_end(
    warp: tuple[LipSyncEngine, PreparedAvatar],
) -> None:
    engine, avatar = warp
    media = clock()
    tts = ScriptedTTS(ticks=20)
    pipeline = SpeechPipeline(tts, engine, avatar, media, "t1", SpeechTimeline())
    await pipeline.speak(say("Hello there"))
    *ticks, end = drain(media.queue)
    assert end == EndOfTurn("t1")
    assert len(ticks) == 20 and all(isinstance(t, SpeechTick) for t in ticks)
    audio = np.concatenate([t.audio for t in ticks])  # type: ignore[union-attr]
    assert (audio == noise_speech(20)).all(), "every tick carries exactly its own samples"
    assert pipeline.timeline.first_audio_at is not None


async def test_a_synthesis_failure_still_ends_the_turn_then_raises(
    warp: tuple[LipSyncEngine, PreparedAvatar],
) -> None:
    engine, avatar = warp
    media = clock()
    pipeline = SpeechPipeline(
        ScriptedTTS(fail_after=2), engine, avatar, media, "t1", SpeechTimeline()
    )
    with pytest.raises(TTSError):
        await pipeline.speak(say("Hello there"))
    items = drain(media.queue)
    assert items[-1] == EndOfTurn("t1"), "the clock learns the turn is over"
    assert len(items) - 1 == 6, "what was synthesized before the failure is kept"


async def test_a_cut_turn_stops_at_once_and_queues_no_end(
    warp: tuple[LipSyncEngine, PreparedAvatar],
) -> None:
    engine, avatar = warp
    media = clock(queue_ticks=5)  # full after 5 ticks: the producer waits on the queue
    tts = ScriptedTTS(ticks=200)
    pipeline = SpeechPipeline(tts, engine, avatar, media, "t1", SpeechTimeline())
    turn = asyncio.create_task(pipeline.speak(say("Hello there")))
    await until(lambda: media.queue.ticks >= 5)
    media.interrupt()
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert tts.closed.is_set(), "synthesis was closed, not left to the garbage collector"
    assert not any(isinstance(item, EndOfTurn) for item in drain(media.queue))


async def test_cutting_a_musetalk_turn_drops_its_pending_jobs_from_the_batcher(
    musetalk_engine: MusetalkEngine, tmp_path: Path
) -> None:
    avatar = await musetalk_engine.render_pool.run(
        musetalk_engine.prepare, bundled_default_source(), "default", tmp_path
    )
    stats = musetalk_engine.worker.stats  # type: ignore[union-attr]
    dropped, computed = stats.dropped, stats.jobs["frame"]
    media = clock(queue_ticks=1)
    tts = ScriptedTTS(ticks=120, chunk=120 * SAMPLES_PER_TICK)  # all the audio at once
    pipeline = SpeechPipeline(tts, musetalk_engine, avatar, media, "t1", SpeechTimeline())
    turn = asyncio.create_task(pipeline.speak(say("Hello there")))
    await until(lambda: media.queue.ticks >= 1)  # frame jobs are queued behind this one
    media.interrupt()
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert stats.dropped > dropped, "queued frame jobs were dropped, not computed"
    await asyncio.sleep(0.5)
    assert stats.jobs["frame"] - computed < 120 - 8, "most of the turn was never computed"
