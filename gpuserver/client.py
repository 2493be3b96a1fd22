"""A Python client of the protocol: WebSocket signalling plus an aiortc receiver.

For Python apps that drive the avatar, and for the test suite and benchmarks, which use
what it records: every server message with its arrival time, every decoded frame with its
media time, and the arrival time of the first RTP packet of each frame.

    async with AvatarClient("ws://127.0.0.1:8000/ws") as client:
        await client.start_media()
        await client.send({"type": "speak", "text": "Hello!"})
        await client.wait_for("speech_stopped")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import websockets
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from gpuserver.voice.pcm_track import PCMTrack

logger = logging.getLogger(__name__)

VIDEO_RATE = 90_000
OPUS_RATE = 48_000


@dataclass(frozen=True, slots=True)
class ReceivedVideo:
    media_time: float  # seconds from the first received frame of this peer connection
    arrival: float  # time.monotonic() when decoded
    luma: np.ndarray | None  # the Y plane, when the client keeps frames


@dataclass(frozen=True, slots=True)
class ReceivedAudio:
    media_time: float
    arrival: float
    rms: float  # loudness of the frame, int16 scale
    samples: int  # per channel


@dataclass(slots=True)
class Received:
    """What arrived over WebRTC, per kind."""

    video: list[ReceivedVideo] = field(default_factory=list)
    audio: list[ReceivedAudio] = field(default_factory=list)
    # media time -> monotonic arrival of the first RTP packet carrying it
    video_rtp_arrival: dict[float, float] = field(default_factory=dict)
    audio_rtp_arrival: dict[float, float] = field(default_factory=dict)


class AvatarClient:
    def __init__(
        self,
        url: str,
        *,
        keep_video: bool = False,
        token: str | None = None,
        microphone: bool = False,
    ) -> None:
        """`microphone`: offer a microphone (sendrecv audio); `self.microphone.play(pcm)`
        then talks to the server as a user would."""
        self.url = url
        # A header, not ?token=: query strings end up in access logs.
        self.headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        self.keep_video = keep_video
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.session: dict[str, Any] = {}
        self.media = Received()
        self.pc: RTCPeerConnection | None = None
        self.microphone = PCMTrack() if microphone else None
        self._ws: Any = None
        self._new_message = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._next_id = 0

    async def __aenter__(self) -> AvatarClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- WebSocket ---------------------------------------------------------------------------

    async def connect(self, *, resume: bool = False) -> dict[str, Any]:
        """Open the WebSocket and return the `session` greeting; with `resume`, ask to
        continue the session of the previous greeting (its `resumed` field says if it did)."""
        url = self.url
        if resume and self.session:
            query = {
                "session_id": self.session["session_id"],
                "resume_key": self.session["resume_key"],
            }
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(query)
        count = len(self.messages)
        self._ws = await websockets.connect(url, max_size=None, additional_headers=self.headers)
        self._tasks.append(asyncio.create_task(self._read()))
        first = await self.wait_for(("session", "error"), after=count)
        if first["type"] == "error":  # refused: busy, unauthorized, shutting down
            raise ConnectionRefusedError(f"{first['code']}: {first['message']}")
        self.session = first
        return self.session

    async def reconnect(self, *, resume: bool = True) -> dict[str, Any]:
        """Lose the WebSocket as a network drop would — the peer connection stays — and
        connect again (a client that closes its socket cleanly ends its session instead)."""
        self._ws.transport.abort()
        await self._ws.wait_closed()
        return await self.connect(resume=resume)

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self._ws:
                message = json.loads(raw)
                async with self._new_message:
                    self.messages.append((time.monotonic(), message))
                    self._new_message.notify_all()

    async def send(self, message: dict[str, Any]) -> str:
        """Send a message (an `id` is added when missing); return its id."""
        if "id" not in message and message.get("type") not in ("webrtc_ice_candidate",):
            self._next_id += 1
            message = {**message, "id": f"m{self._next_id}"}
        await self._ws.send(json.dumps(message))
        return str(message.get("id"))

    async def send_raw(self, frame: str | bytes) -> None:
        await self._ws.send(frame)

    async def wait_for(
        self,
        kind: str | tuple[str, ...],
        timeout: float = 10.0,
        after: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The first message of type `kind` (or of one of the types `kind`), at index >=
        `after`, matching `where`."""
        kinds = (kind,) if isinstance(kind, str) else kind

        def find() -> dict[str, Any] | None:
            for _, message in self.messages[after:]:
                if message.get("type") in kinds and (where is None or where(message)):
                    return message
            return None

        async with asyncio.timeout(timeout), self._new_message:
            while (found := find()) is None:
                await self._new_message.wait()
            return found

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [message for _, message in self.messages if message.get("type") == kind]

    def arrival_of(self, message: dict[str, Any]) -> float:
        return next(at for at, m in self.messages if m is message)

    # --- WebRTC ------------------------------------------------------------------------------

    async def start_media(self, timeout: float = 15.0) -> None:
        """Offer recvonly audio+video, apply the answer, and wait for the first video frame."""
        servers = [
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in self.session.get("ice_servers", [])
        ]
        if self.pc is not None:
            await self.pc.close()
        self.media = Received()
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        if self.microphone is None:
            pc.addTransceiver("audio", direction="recvonly")
        else:
            pc.addTransceiver(self.microphone, direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        first_frame = asyncio.get_running_loop().create_future()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.create_task(self._consume(track, first_frame)))

        await pc.setLocalDescription(await pc.createOffer())
        count = len(self.messages)
        await self.send({"type": "webrtc_offer", "sdp": pc.localDescription.sdp})
        answer = await self.wait_for("webrtc_answer", timeout=timeout, after=count)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        self._record_rtp_arrivals(pc)
        await asyncio.wait_for(first_frame, timeout)

    def _record_rtp_arrivals(self, pc: RTCPeerConnection) -> None:
        """Note when the first packet of each frame arrives (before any jitter buffer)."""
        for transceiver in pc.getTransceivers():
            receiver = transceiver.receiver
            kind = transceiver.kind
            rate = VIDEO_RATE if kind == "video" else OPUS_RATE
            arrivals = (
                self.media.video_rtp_arrival if kind == "video" else self.media.audio_rtp_arrival
            )
            original = receiver._handle_rtp_packet
            origin: list[int] = []

            async def handle(packet: Any, arrival_time_ms: int, original=original, rate=rate,
                             arrivals=arrivals, origin=origin) -> None:  # fmt: skip
                if not origin:
                    origin.append(packet.timestamp)
                media_time = ((packet.timestamp - origin[0]) % (1 << 32)) / rate
                arrivals.setdefault(round(media_time, 4), time.monotonic())
                await original(packet, arrival_time_ms)

            receiver._handle_rtp_packet = handle  # type: ignore[method-assign]

    async def _consume(self, track: MediaStreamTrack, first_frame: asyncio.Future[None]) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                media_time = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
                if isinstance(frame, VideoFrame):
                    luma = frame.to_ndarray(format="gray") if self.keep_video else None
                    self.media.video.append(ReceivedVideo(media_time, now, luma))
                    if not first_frame.done():
                        first_frame.set_result(None)
                elif isinstance(frame, AudioFrame):
                    pcm = frame.to_ndarray().astype(np.float32)
                    rms = float(np.sqrt(np.mean(pcm * pcm))) if pcm.size else 0.0
                    self.media.audio.append(ReceivedAudio(media_time, now, rms, frame.samples))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.pc is not None:
            await self.pc.close()
        if self._ws is not None:
            await self._ws.close()
