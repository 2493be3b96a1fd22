"""One turn's speech, from text to the media clock's queue.

    text chunks -> TTS (PCM + word timings) -> whole ticks -> engine.frames()
        -> (frame, its 640 samples) -> SpeechQueue -> the media clock

The pipeline is built from objects — a TTS backend, an engine and the avatar it animates,
the session's clock — never from ids. Every stage is an async generator that `speak` closes
explicitly when it returns, fails or is cancelled (an interrupt), so synthesis stops and the
engine drops its pending jobs at once instead of whenever the garbage collector runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator

import numpy as np

from gpuserver.engines.base import LipSyncEngine, PreparedAvatar
from gpuserver.media import TickAligner
from gpuserver.media_clock import EndOfTurn, MediaClock, SpeechTick
from gpuserver.speech_timeline import SpeechTimeline
from gpuserver.tts.base import TTSBackend

logger = logging.getLogger(__name__)


async def synthesize_ticks(
    tts: TTSBackend, chunks: AsyncIterable[str], timeline: SpeechTimeline, voice: str | None
) -> AsyncIterator[np.ndarray]:
    """Tick-aligned PCM of every text chunk in turn, in `voice` (None: the TTS's default);
    records its words in `timeline`."""
    position = 0
    async for chunk in chunks:
        if not chunk.strip():
            continue
        timeline.begin_segment(chunk, position)
        aligner = TickAligner()
        speech = tts.synthesize(chunk, voice)
        async with contextlib.aclosing(speech):
            async for piece in speech:
                timeline.audio_started()
                for word in piece.words:
                    timeline.add_word(word.text, word.start)
                if len(ticks := aligner.push(piece.pcm)):
                    position += len(ticks)
                    yield ticks
        # Pad each chunk to whole ticks: its tail must not wait for the next sentence.
        if len(tail := aligner.flush()):
            position += len(tail)
            yield tail


class SpeechPipeline:
    def __init__(
        self,
        tts: TTSBackend,
        engine: LipSyncEngine,
        avatar: PreparedAvatar,
        clock: MediaClock,
        turn_id: str,
        timeline: SpeechTimeline,
        voice: str | None = None,
    ) -> None:
        self.tts = tts
        self.voice = voice
        self.engine = engine
        self.avatar = avatar
        self.clock = clock
        self.turn_id = turn_id
        self.timeline = timeline

    async def speak(self, chunks: AsyncIterable[str]) -> None:
        """Queue the speech of `chunks` tick by tick; return when the last tick is queued.

        The turn's end marker follows its last tick, also when synthesis fails half-way
        (the error propagates after it); a cancelled turn queues nothing more.
        """
        audio = synthesize_ticks(self.tts, chunks, self.timeline, self.voice)
        frames = self.engine.frames(self.avatar, audio, lambda: self.clock.upcoming_phase)
        queue = self.clock.queue
        try:
            async with contextlib.aclosing(audio), contextlib.aclosing(frames):
                async for frame, pcm in frames:
                    await queue.put(SpeechTick(frame, pcm, self.turn_id))
        finally:
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                await queue.put(EndOfTurn(self.turn_id))
