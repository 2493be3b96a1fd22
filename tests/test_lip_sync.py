"""Lip-sync at the receiver: what the eye sees and the ear hears arrive together.

The server runs the `clapper` engine (a white frame on every loud tick) and speaks the fake
TTS's tone bursts, one per word. Through the real media clock, tracks, encoders and a real
aiortc receiver on 127.0.0.1, each burst's first white frame and first loud audio frame must
arrive within 40 ms of each other (RTP arrival, before the receiver's jitter buffers) —
burst after burst over more than 20 s, after an interrupt and across a producer's stall.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from gpuserver.client import AvatarClient
from gpuserver.media import TICK_SECONDS
from tests.conftest import ServerProcess, start_server
from tests.fakes.openai_server import FakeOpenAI, run_fake_openai

pytestmark = pytest.mark.slow

SYNC_TOLERANCE_S = 0.040
WORD_S = 2.0  # one burst every 2 s: 50 ticks, so every burst starts on a tick
LOUD_RMS = 1000.0
WHITE_LUMA = 200.0


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    # The fake TTS streams ~10x faster than real time: 3 s into an utterance (0.3 s after
    # its start) it stalls 4 s, which outlasts the speech buffered ahead, so playback runs
    # dry mid-turn for over a second.
    settings = FakeOpenAI(seconds_per_word=WORD_S, stall_after_s=3.0, stall_s=4.0)
    with run_fake_openai(settings) as running:
        yield running


@pytest.fixture(scope="module")
def clapper_server(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeOpenAI
) -> Iterator[ServerProcess]:
    env = {"GPUSERVER_TTS__BASE_URL": fake.base_url, "GPUSERVER_TTS__MODEL": "bursts"}
    running = start_server(
        tmp_path_factory.mktemp("clapper"),
        *("--llm", "echo", "--tts", "openai", "--engine", "clapper"),
        env=env,
    )
    yield running
    running.stop()


@dataclass(frozen=True)
class Onset:
    media_time: float
    arrival: float  # RTP arrival of the first packet of that media time


def onsets(times: list[float], marked: list[bool], arrivals: dict[float, float]) -> list[Onset]:
    """The first marked media time of each run of marked ones."""
    found, previous = [], False
    for media_time, mark in zip(times, marked, strict=True):
        if mark and not previous and (arrival := arrivals.get(round(media_time, 4))):
            found.append(Onset(media_time, arrival))
        previous = mark
    return found


def flashes(client: AvatarClient) -> list[Onset]:
    video = client.media.video
    white = [float(frame.luma.mean()) > WHITE_LUMA for frame in video]  # type: ignore[union-attr]
    return onsets([f.media_time for f in video], white, client.media.video_rtp_arrival)


def sounds(client: AvatarClient) -> list[Onset]:
    audio = client.media.audio
    loud = [frame.rms > LOUD_RMS for frame in audio]
    return onsets([f.media_time for f in audio], loud, client.media.audio_rtp_arrival)


async def test_every_burst_is_seen_and_heard_together_after_interrupts_and_stalls(
    clapper_server: ServerProcess,
) -> None:
    async with AvatarClient(clapper_server.ws_url, keep_video=True) as client:
        await client.start_media()
        await client.send({"type": "speak", "text": "one two three four"})
        await client.wait_for("speech_started", timeout=20)
        await asyncio.sleep(2.6)  # two bursts, then cut during the second word's silence
        await client.send({"type": "interrupt"})
        await client.wait_for("speech_stopped")
        await client.send({"type": "speak", "text": "a b c d e f g h i j"})
        await client.wait_for("speech_stopped", where=lambda m: not m["interrupted"], timeout=60)
        await asyncio.sleep(0.5)

    seen, heard = flashes(client), sounds(client)
    assert len(seen) >= 10, "two bursts before the interrupt, ten after"
    assert seen[-1].arrival - seen[0].arrival >= 20.0
    offsets = []
    for flash in seen:
        sound = min(heard, key=lambda s: abs(s.arrival - flash.arrival))
        # The same tick: the audio frame left the server with the white frame's pts.
        assert abs(sound.media_time - flash.media_time) <= TICK_SECONDS
        offsets.append(sound.arrival - flash.arrival)
    assert max(abs(offset) for offset in offsets) <= SYNC_TOLERANCE_S, offsets
    # The stall left silence and no flash inside the second turn: idle, never a burst.
    gaps = np.diff([flash.arrival for flash in seen])
    assert gaps.max() > WORD_S + 0.5
