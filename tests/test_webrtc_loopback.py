"""A real aiortc client, a real server process, real encoders, every ICE check on 127.0.0.1.

The avatar idles with a closed mouth and silence, speaks with lips that move with the
voice, stops the moment it is interrupted, and survives a peer-connection replacement.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from gpuserver.client import AvatarClient, ReceivedVideo
from gpuserver.media import TICK_SECONDS
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

# Mouth of the default avatar (the astronaut): about x196-250, y129-156.
MOUTH = (slice(122, 168), slice(188, 258))
SPEECH = (
    "Good morning! I am the astronaut avatar, and I am speaking to you over WebRTC. "
    "My lips should move with every word you hear."
)


def mouth_motion(frames: list[ReceivedVideo], reference: np.ndarray) -> np.ndarray:
    return np.array(
        [np.abs(f.luma[MOUTH].astype(np.float32) - reference).mean() for f in frames]  # type: ignore[index]
    )


def audio_envelope(client: AvatarClient, times: list[float]) -> np.ndarray:
    """Audio loudness of the 40 ms tick starting at each media time."""
    by_tick: dict[int, list[float]] = {}
    for frame in client.media.audio:
        by_tick.setdefault(round(frame.media_time / TICK_SECONDS), []).append(frame.rms)
    return np.array([max(by_tick.get(round(t / TICK_SECONDS), [0.0])) for t in times])


async def speak_and_wait(client: AvatarClient, text: str) -> tuple[dict, dict]:
    count = len(client.messages)
    await client.send({"type": "speak", "text": text})
    started = await client.wait_for("speech_started", after=count, timeout=20)
    stopped = await client.wait_for("speech_stopped", after=count, timeout=60)
    return started, stopped


async def test_idle_then_speech_with_moving_lips_on_the_voice(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url, keep_video=True) as client:
        await client.start_media()
        await asyncio.sleep(1.5)  # the encoder's first frames are still converging in quality
        idle_count = len(client.media.video)
        reference = client.media.video[-1].luma[MOUTH].astype(np.float32)  # type: ignore[index]

        started, stopped = await speak_and_wait(client, SPEECH)
        assert stopped["interrupted"] is False
        assert started["turn_id"] == stopped["turn_id"]
        await asyncio.sleep(1.0)  # idle again after speech
        metrics = await client.wait_for("metrics")

    video = client.media.video
    # 25 fps +-10 % over the >= 3 s of speech, by arrival time.
    t_start = client.arrival_of(started)
    t_stop = client.arrival_of(stopped)
    assert t_stop - t_start >= 3.0
    during = [f for f in video if t_start <= f.arrival <= t_stop]
    fps = len(during) / (during[-1].arrival - during[0].arrival)
    assert 22.5 <= fps <= 27.5
    # pts advance one tick per frame: the server's clock drops nothing on loopback.
    steps = np.diff([f.media_time for f in video])
    assert np.median(steps) == pytest.approx(TICK_SECONDS)

    motion = mouth_motion(video, reference)
    loudness = audio_envelope(client, [f.media_time for f in video])
    settled = slice(idle_count - 12, idle_count - 2)
    idle_motion, idle_loudness = motion[settled], loudness[settled]
    speaking = (loudness > 300) & (np.arange(len(video)) >= idle_count)
    assert idle_loudness.max() < 50, "idle is silent"
    assert speaking.sum() > 25, "speech arrived as audio"
    assert idle_motion.max() < 0.3 * np.median(motion[speaking]), "lips move while speaking"
    tail = slice(len(video) - 10, len(video))
    assert loudness[tail].max() < 50, "silent after speech"
    # Closed again after speech (the encoder still refines the mouth for a moment).
    assert motion[tail].max() < 0.5 * np.median(motion[speaking])

    # Lips on the voice: mouth motion follows loudness at lag 0 (within one tick).
    lags = range(-5, 6)
    spoken = slice(idle_count, len(video))
    scores = [_correlation(motion[spoken], loudness[spoken], lag) for lag in lags]
    assert abs(list(lags)[int(np.argmax(scores))]) <= 1
    assert max(scores) > 0.4

    assert metrics["first_frame_ms"] is not None and metrics["spoken_ms"] > 3000


def _correlation(a: np.ndarray, b: np.ndarray, lag: int) -> float:
    if lag > 0:
        a, b = a[lag:], b[:-lag]
    elif lag < 0:
        a, b = a[:lag], b[-lag:]
    return float(np.corrcoef(a, b)[0, 1])


async def test_interrupt_stops_speech_and_reports_what_was_heard(server: ServerProcess) -> None:
    long_text = " ".join(["This sentence keeps the avatar talking for quite a while."] * 6)
    async with AvatarClient(server.ws_url) as client:
        await client.start_media()
        ref = await client.send({"type": "speak", "text": long_text})
        started = await client.wait_for("speech_started", timeout=20)
        await asyncio.sleep(1.5)
        count = len(client.messages)
        await client.send({"type": "interrupt"})
        interrupted = await client.wait_for("interrupted", after=count)
        stopped = await client.wait_for("speech_stopped", after=count)
        await asyncio.sleep(0.6)
        cut_at = client.arrival_of(stopped)
        kinds = [m["type"] for _, m in client.messages[count:]]

    assert interrupted["turn_id"] == started["turn_id"] == stopped["turn_id"]
    assert interrupted["ref"] == ref
    assert stopped["interrupted"] is True
    assert kinds.index("interrupted") < kinds.index("speech_stopped")
    heard = interrupted["heard_text"]
    assert heard and long_text.startswith(heard) and len(heard) < len(long_text) / 2
    # Silence follows at once: nothing loud arrives 200 ms after speech_stopped.
    late = [a.rms for a in client.media.audio if a.arrival > cut_at + 0.2]
    assert late and max(late) < 50


async def test_speak_with_queue_plays_after_the_current_turn(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        await client.start_media()
        await client.send({"type": "speak", "text": "First sentence."})
        await client.send({"type": "speak", "text": "Second sentence.", "queue": True})
        first = await client.wait_for("speech_stopped", timeout=30)
        second = await client.wait_for(
            "speech_stopped", timeout=30, where=lambda m: m["turn_id"] != first["turn_id"]
        )
        events = [(m["type"], m.get("turn_id")) for _, m in client.messages]
    assert first["interrupted"] is False and second["interrupted"] is False
    assert not client.of_type("interrupted")
    order = [e for e in events if e[0] in ("speech_started", "speech_stopped")]
    assert order == [
        ("speech_started", first["turn_id"]),
        ("speech_stopped", first["turn_id"]),
        ("speech_started", second["turn_id"]),
        ("speech_stopped", second["turn_id"]),
    ]


async def test_a_new_offer_replaces_the_peer_and_keeps_the_session(server: ServerProcess) -> None:
    async with AvatarClient(server.ws_url) as client:
        await client.start_media()
        session_id = client.session["session_id"]
        await client.start_media()  # a second offer on the same socket
        await speak_and_wait(client, "Still here after reconnecting.")
        assert client.media.video, "frames flow on the new peer connection"
        assert not client.of_type("error")
    assert session_id == client.session["session_id"]
    assert len(client.of_type("session")) == 1


async def test_after_the_server_closes_the_peer_a_new_offer_resumes_queued_speech(
    server: ServerProcess,
) -> None:
    async with AvatarClient(server.ws_url) as client, httpx.AsyncClient() as http:
        await client.start_media()
        session_id = client.session["session_id"]
        closed = await http.delete(f"{server.http_url}/api/sessions/{session_id}/peer")
        assert closed.json() == {"closed": True}
        listed = (await http.get(f"{server.http_url}/api/sessions")).json()["sessions"]
        assert [s["peer"] for s in listed if s["id"] == session_id] == ["none"]
        await client.send({"type": "speak", "text": "Queued while nobody listens."})
        await asyncio.sleep(0.5)
        assert not client.of_type("speech_started"), "nothing plays without a peer"
        await client.start_media()  # the client renegotiates on the same socket
        stopped = await client.wait_for("speech_stopped", timeout=30)
    assert stopped["interrupted"] is False
    assert client.session["session_id"] == session_id


async def test_trickled_browser_candidates_connect(server: ServerProcess) -> None:
    """Like a browser: an offer without candidates, then each candidate, then null."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    async with AvatarClient(server.ws_url) as client:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        got_video = asyncio.get_running_loop().create_future()
        readers: list[asyncio.Future[None]] = []

        @pc.on("track")
        def on_track(track) -> None:  # type: ignore[no-untyped-def]
            async def first() -> None:
                await track.recv()
                if not got_video.done():
                    got_video.set_result(track.kind)

            if track.kind == "video":
                readers.append(asyncio.ensure_future(first()))

        await pc.setLocalDescription(await pc.createOffer())
        lines = pc.localDescription.sdp.split("\r\n")
        candidates = [line[2:] for line in lines if line.startswith("a=candidate:")]
        trickled = ("a=candidate:", "a=end-of-candidates")  # a browser's offer has neither
        bare = "\r\n".join(line for line in lines if not line.startswith(trickled))
        assert candidates
        await client.send({"type": "webrtc_offer", "sdp": bare})
        answer = await client.wait_for("webrtc_answer")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        for line in candidates:
            init = {"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0}
            await client.send_raw(json.dumps({"type": "webrtc_ice_candidate", "candidate": init}))
        await client.send_raw(json.dumps({"type": "webrtc_ice_candidate", "candidate": None}))
        assert await asyncio.wait_for(got_video, 15) == "video"
        assert not client.of_type("error")
        await pc.close()
