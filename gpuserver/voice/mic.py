"""The user's microphone: a received WebRTC audio track as 16 kHz mono int16 PCM.

aiortc decodes the browser's Opus to 48 kHz (stereo or mono) frames of 20 ms; PyAV's
resampler (libswresample) downmixes and resamples them as they come. When the sender stops
delivering audio (a muted or removed microphone, or DTX), the gap is reported as silence after
`silence_after_s`, so an utterance in progress still ends instead of hanging until audio
resumes. The iteration ends cleanly when the track ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from gpuserver.media import PCM_DTYPE, SAMPLE_RATE, silence


async def mic_pcm(
    track: MediaStreamTrack, *, silence_after_s: float = 0.25
) -> AsyncIterator[np.ndarray]:
    """16 kHz mono int16 chunks of `track`'s audio, in order, until the track ends."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    gap = silence(round(silence_after_s * SAMPLE_RATE))
    while True:
        try:
            async with asyncio.timeout(silence_after_s):
                frame = await track.recv()
        except TimeoutError:
            yield gap
            continue
        except MediaStreamError:
            break
        assert isinstance(frame, av.AudioFrame)
        for chunk in resampler.resample(frame):
            yield _samples(chunk)
    for chunk in resampler.resample(None):
        yield _samples(chunk)


def _samples(frame: av.AudioFrame) -> np.ndarray:
    return frame.to_ndarray().reshape(-1).astype(PCM_DTYPE, copy=False)
