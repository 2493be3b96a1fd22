"""What the media clock's ticks become on the wire: av frames with pts from the tick index."""

from __future__ import annotations

import fractions
import time

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection

from gpuserver.config import WebRTCSettings
from gpuserver.media import SAMPLES_PER_TICK
from gpuserver.webrtc_streamer import (
    TRACK_BUFFER_TICKS,
    ClockedTrack,
    MediaSession,
    WebRTCStreamer,
    _Peer,
)


class Ignore:
    def speech_started(self, turn_id: str) -> None: ...

    def turn_played(self, turn_id: str, ticks: int) -> None: ...

    def peer_lost(self, reason: str, failed: bool) -> None: ...

    def microphone(self, track: object) -> None: ...


def media_with_tracks() -> tuple[MediaSession, _Peer]:
    """A media session whose tracks are read by the test instead of an encoder."""
    idle = lambda phase: np.zeros((8, 8, 3), np.uint8)  # noqa: E731
    media = MediaSession("s", WebRTCSettings(), idle, Ignore())
    peer = _Peer(
        RTCPeerConnection(RTCConfiguration(iceServers=[])),
        video=ClockedTrack("video"),
        audio=ClockedTrack("audio"),
    )
    media._peer = peer
    return media, peer


async def test_each_tick_is_one_video_frame_and_two_20ms_audio_frames_on_one_clock() -> None:
    media, peer = media_with_tracks()
    frame = np.full((8, 8, 3), 7, np.uint8)
    audio = np.arange(SAMPLES_PER_TICK, dtype=np.int16)
    for tick in (0, 1, 2, 5):  # 3 and 4 were skipped by a stall
        media.send_tick(tick, frame, audio)
    videos = [await peer.video.recv() for _ in range(4)]
    audios = [await peer.audio.recv() for _ in range(8)]

    assert [v.pts for v in videos] == [0, 3600, 7200, 18000]
    assert all(v.time_base == fractions.Fraction(1, 90_000) for v in videos)
    assert (videos[0].to_ndarray(format="bgr24") == 7).all()
    assert [a.pts for a in audios] == [0, 320, 640, 960, 1280, 1600, 3200, 3520]
    assert all(a.samples == 320 and a.sample_rate == 16_000 for a in audios)
    assert all(a.time_base == fractions.Fraction(1, 16_000) for a in audios)
    # The two halves carry exactly the tick's 640 samples, in order.
    pcm = np.concatenate([a.to_ndarray().ravel() for a in audios[:2]])
    assert (pcm == audio).all()
    await media.close_peer()


async def test_the_second_audio_frame_of_a_tick_leaves_20ms_after_the_first() -> None:
    media, peer = media_with_tracks()
    media.send_tick(0, np.zeros((8, 8, 3), np.uint8), np.zeros(SAMPLES_PER_TICK, np.int16))
    first = await peer.audio.recv()
    first_at = time.monotonic()
    second = await peer.audio.recv()
    second_at = time.monotonic()
    assert (first.pts, second.pts) == (0, 320)
    assert second_at - first_at >= 0.019, "not handed to the encoder before its 20 ms"
    await media.close_peer()


async def test_a_slow_encoder_loses_its_oldest_frames_never_the_clock() -> None:
    media, peer = media_with_tracks()
    for tick in range(TRACK_BUFFER_TICKS + 3):
        media.send_tick(tick, np.zeros((8, 8, 3), np.uint8), np.zeros(640, np.int16))
    first = await peer.video.recv()
    assert first.pts == 3 * 3600
    assert peer.video.dropped == 3
    await media.close_peer()


async def test_host_candidates_are_restricted_to_the_configured_addresses() -> None:
    WebRTCStreamer(WebRTCSettings(host_addresses=["127.0.0.1"]))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    candidates = [line for line in pc.localDescription.sdp.split("\r\n") if "typ host" in line]
    await pc.close()
    assert candidates
    assert all(" 127.0.0.1 " in line for line in candidates)
