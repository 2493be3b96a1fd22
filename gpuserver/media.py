"""The media clock's units and small PCM helpers shared by every stage.

One tick = 40 ms = one video frame (25 fps) = exactly 640 samples of 16 kHz mono int16
audio, sent as two 20 ms audio frames of 320 samples. Every stage speaks in these units.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import numpy as np

SAMPLE_RATE = 16_000
FPS = 25
TICK_SECONDS = 1 / FPS
SAMPLES_PER_TICK = SAMPLE_RATE // FPS  # 640
AUDIO_FRAME_SAMPLES = 320  # 20 ms
AUDIO_FRAMES_PER_TICK = SAMPLES_PER_TICK // AUDIO_FRAME_SAMPLES  # 2
VIDEO_CLOCK_RATE = 90_000
VIDEO_PTS_PER_TICK = VIDEO_CLOCK_RATE // FPS  # 3600

PCM_DTYPE = np.int16


def silence(samples: int = SAMPLES_PER_TICK) -> np.ndarray:
    return np.zeros(samples, dtype=PCM_DTYPE)


def pad_to_ticks(pcm: np.ndarray) -> np.ndarray:
    """Zero-pad mono int16 PCM up to a whole number of ticks."""
    remainder = len(pcm) % SAMPLES_PER_TICK
    if remainder == 0:
        return pcm
    return np.concatenate([pcm, silence(SAMPLES_PER_TICK - remainder)])


class TickAligner:
    """Re-cuts a stream of PCM chunks of any length into whole ticks.

    `push` returns the samples that complete whole ticks (possibly empty) and keeps the
    remainder; `flush` returns the remainder zero-padded to one tick.
    """

    def __init__(self) -> None:
        self._pending = silence(0)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        data = np.concatenate([self._pending, pcm.astype(PCM_DTYPE, copy=False)])
        whole = len(data) - len(data) % SAMPLES_PER_TICK
        self._pending = data[whole:]
        return data[:whole]

    def flush(self) -> np.ndarray:
        tail, self._pending = self._pending, silence(0)
        return pad_to_ticks(tail)


async def aligned_ticks(chunks: AsyncIterable[np.ndarray]) -> AsyncIterator[np.ndarray]:
    """Yield tick-aligned PCM (a multiple of 640 samples) from chunks of any length."""
    aligner = TickAligner()
    async for chunk in chunks:
        whole = aligner.push(chunk)
        if len(whole):
            yield whole
    tail = aligner.flush()
    if len(tail):
        yield tail
