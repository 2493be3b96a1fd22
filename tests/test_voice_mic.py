"""The microphone reader: a received WebRTC audio track as 16 kHz mono int16 PCM."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack

from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.voice.mic import mic_pcm
from gpuserver.voice.pcm_track import PCMTrack
from tests.voice_fixtures import FramesTrack, Speech, question, received_over_webrtc

__all__ = ["question"]


def envelope(pcm: np.ndarray, window: int = 320) -> np.ndarray:
    """RMS per 20 ms."""
    frames = pcm[: len(pcm) - len(pcm) % window].astype(np.float64).reshape(-1, window)
    return np.sqrt((frames**2).mean(axis=1))


def audible(pcm: np.ndarray) -> tuple[int, int]:
    loud = np.flatnonzero(np.abs(pcm) > 300)
    return int(loud[0]), int(loud[-1]) + 1


async def collect(track: MediaStreamTrack, seconds: float) -> np.ndarray:
    chunks = []
    async for chunk in mic_pcm(track):
        assert chunk.dtype == PCM_DTYPE and chunk.ndim == 1
        chunks.append(chunk)
        if sum(map(len, chunks)) >= seconds * SAMPLE_RATE:
            break
    return np.concatenate(chunks)


@pytest.mark.slow
async def test_speech_sent_over_opus_arrives_as_the_same_16khz_mono_speech(
    question: Speech,
) -> None:
    microphone = PCMTrack()
    async with received_over_webrtc(microphone) as remote:
        microphone.play(question.pcm)
        heard = await collect(remote, seconds=len(question.pcm) / SAMPLE_RATE)

    start, end = audible(heard)
    assert abs((end - start) - (question.end - question.start)) <= 0.05 * SAMPLE_RATE
    # The loudness contour survives Opus: correlate it with the original's, aligned.
    sent = envelope(question.pcm[question.start : question.end])
    got = envelope(heard[start : start + question.end - question.start])
    assert np.corrcoef(sent, got)[0, 1] > 0.9
    assert 0.5 < got.mean() / sent.mean() < 2.0


@pytest.mark.slow
async def test_reading_ends_cleanly_when_the_peer_connection_closes() -> None:
    microphone = PCMTrack()
    async with received_over_webrtc(microphone) as remote:
        reading = asyncio.create_task(collect(remote, seconds=60))
        await asyncio.sleep(0.3)
        assert not reading.done()
    heard = await asyncio.wait_for(reading, 5)  # the receiver closed: the track ended
    assert len(heard) > 0 and not heard.any()  # the microphone sent silence


@pytest.mark.parametrize(
    ("rate", "layout"), [(48_000, "stereo"), (48_000, "mono"), (16_000, "mono")]
)
async def test_any_decoded_layout_becomes_16khz_mono_of_the_same_length(
    question: Speech, rate: int, layout: str
) -> None:
    heard = await collect(FramesTrack(question.pcm, rate, layout), seconds=60)
    assert abs(len(heard) - len(question.pcm)) <= 0.02 * SAMPLE_RATE
    start, end = audible(heard)
    assert abs(start - question.start) <= 160 and abs(end - question.end) <= 160


class _SilentTrack(MediaStreamTrack):
    """A live track that delivers nothing (a muted browser microphone with DTX)."""

    kind = "audio"

    async def recv(self) -> None:  # type: ignore[override]
        await asyncio.Event().wait()


async def test_a_track_that_delivers_nothing_reads_as_silence() -> None:
    heard = await collect(_SilentTrack(), seconds=0.5)
    assert len(heard) >= 0.5 * SAMPLE_RATE and not heard.any()
