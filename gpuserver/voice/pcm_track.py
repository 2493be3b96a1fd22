"""A microphone for aiortc clients (tests, benchmarks): an audio track that plays given PCM.

It sends 20 ms frames of 16 kHz mono int16 in real time, as a microphone does: queued PCM
when there is some, silence otherwise. aiortc's Opus encoder resamples to 48 kHz.
"""

from __future__ import annotations

import asyncio
import fractions
from collections import deque

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from gpuserver.media import AUDIO_FRAME_SAMPLES, PCM_DTYPE, SAMPLE_RATE, silence

_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
_FRAME_SECONDS = AUDIO_FRAME_SAMPLES / SAMPLE_RATE


class PCMTrack(MediaStreamTrack):
    """`play(pcm)` queues audio; the returned future gets the loop time its last frame left."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queued: deque[tuple[np.ndarray, asyncio.Future[float]]] = deque()
        self._offset = 0  # samples of the first queued clip already sent
        self._sent = 0  # frames sent
        self._t0: float | None = None

    def play(self, pcm: np.ndarray) -> asyncio.Future[float]:
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queued.append((pcm.astype(PCM_DTYPE, copy=False), done))
        return done

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._t0 is None:
            self._t0 = loop.time()
        delay = self._t0 + self._sent * _FRAME_SECONDS - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        samples = self._next_samples(loop.time())
        frame = av.AudioFrame.from_ndarray(samples[np.newaxis, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = _TIME_BASE
        frame.pts = self._sent * AUDIO_FRAME_SAMPLES
        self._sent += 1
        return frame

    def _next_samples(self, now: float) -> np.ndarray:
        """One frame: queued PCM (completing clips as they run out) padded with silence."""
        parts: list[np.ndarray] = []
        needed = AUDIO_FRAME_SAMPLES
        while needed and self._queued:
            pcm, done = self._queued[0]
            part = pcm[self._offset : self._offset + needed]
            parts.append(part)
            needed -= len(part)
            self._offset += len(part)
            if self._offset >= len(pcm):
                self._queued.popleft()
                self._offset = 0
                if not done.done():
                    done.set_result(now)
        parts.append(silence(needed))
        return np.concatenate(parts)
