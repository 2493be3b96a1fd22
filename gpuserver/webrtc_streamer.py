"""Per-session WebRTC: one RTCPeerConnection whose audio and video tracks share one clock.

`WebRTCStreamer` owns, per session, a `MediaSession`: the speech queue, the `MediaClock` and
the current peer connection. Producers call `stream_frame(session_id, frame, audio, turn_id)`
(awaits while the queue is full) and `end_turn`; `clear` drops what is queued (barge-in).
A new offer on the same session replaces the peer connection but keeps the clock and the
queue, so speech resumes where it was after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aioice.ice
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.codecs import h264, vpx
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame
from av.frame import Frame

from gpuserver.config import IceServer, WebRTCSettings
from gpuserver.media import (
    AUDIO_FRAME_SAMPLES,
    AUDIO_FRAMES_PER_TICK,
    SAMPLE_RATE,
    VIDEO_CLOCK_RATE,
    VIDEO_PTS_PER_TICK,
)
from gpuserver.media_clock import (
    EndOfTurn,
    IdleSource,
    MediaClock,
    PlaybackListener,
    PlaybackPosition,
    SpeechQueue,
    SpeechTick,
)
from gpuserver.sdp import SdpError, parse_candidate, validate_offer

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
# Ticks a track holds for a slow encoder before dropping its oldest frame. Pairing survives
# drops: pts still say which audio belongs to which frame.
TRACK_BUFFER_TICKS = 4


class NoPeerError(LookupError):
    """The session has no peer connection (no webrtc_offer yet)."""


def restrict_host_addresses(addresses: Iterable[str]) -> None:
    """Gather ICE host candidates only on `addresses` (empty: every interface).

    aioice looks its host addresses up at gather time through this module-level function,
    and skips 127.0.0.1 by itself — so loopback-only tests need exactly this.
    """
    chosen = list(addresses)
    original = getattr(aioice.ice.get_host_addresses, "__wrapped__", aioice.ice.get_host_addresses)
    if not chosen:
        aioice.ice.get_host_addresses = original
        return

    def only_configured(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    only_configured.__wrapped__ = original  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = only_configured


def set_start_bitrate(kbps: int) -> None:
    """The bitrate aiortc's encoders start at (a module default in aiortc, so process-wide)."""
    for codec in (vpx, h264):
        codec.DEFAULT_BITRATE = max(codec.MIN_BITRATE, min(kbps * 1000, codec.MAX_BITRATE))


class ClockedTrack(MediaStreamTrack):
    """A track fed by the media clock; aiortc's sender pulls from it and encodes off-loop."""

    def __init__(self, kind: str, on_first_recv: Callable[[], None]) -> None:
        super().__init__()
        self.kind = kind
        frames_per_tick = AUDIO_FRAMES_PER_TICK if kind == "audio" else 1
        self._max_frames = TRACK_BUFFER_TICKS * frames_per_tick
        self._frames: asyncio.Queue[Frame] = asyncio.Queue()
        self._on_first_recv: Callable[[], None] | None = on_first_recv
        self.dropped = 0

    def push(self, frame: Frame) -> None:
        if self.readyState != "live":
            return
        while self._frames.qsize() >= self._max_frames:
            self._frames.get_nowait()  # the encoder fell behind: drop, never delay the clock
            self.dropped += 1
        self._frames.put_nowait(frame)

    async def recv(self) -> Frame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._on_first_recv is not None:
            callback, self._on_first_recv = self._on_first_recv, None
            callback()
        return await self._frames.get()


@dataclass(eq=False)
class _Peer:
    pc: RTCPeerConnection
    video: ClockedTrack
    audio: ClockedTrack


class MediaSession:
    """Queue, clock and current peer connection of one session. Also the clock's sink."""

    def __init__(
        self,
        session_id: str,
        settings: WebRTCSettings,
        idle: IdleSource,
        listener: PlaybackListener,
    ) -> None:
        self.session_id = session_id
        self.settings = settings
        self.queue = SpeechQueue(settings.queue_ticks)
        self.clock = MediaClock(
            self.queue,
            idle,
            self,
            listener,
            prebuffer_ticks=settings.prebuffer_ticks,
            prebuffer_timeout=settings.prebuffer_timeout_ms / 1000,
        )
        self._clock_task = asyncio.create_task(self.clock.run(), name=f"clock-{session_id}")
        self.peer: _Peer | None = None

    # --- TickSink ----------------------------------------------------------------------------

    def send_tick(self, index: int, frame: np.ndarray, audio: np.ndarray) -> None:
        peer = self.peer
        if peer is None:
            return
        video = VideoFrame.from_ndarray(frame, format="bgr24")
        video.pts = index * VIDEO_PTS_PER_TICK
        video.time_base = VIDEO_TIME_BASE
        peer.video.push(video)
        for half in range(AUDIO_FRAMES_PER_TICK):
            samples = audio[half * AUDIO_FRAME_SAMPLES : (half + 1) * AUDIO_FRAME_SAMPLES]
            chunk = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            chunk.sample_rate = SAMPLE_RATE
            chunk.pts = (index * AUDIO_FRAMES_PER_TICK + half) * AUDIO_FRAME_SAMPLES
            chunk.time_base = AUDIO_TIME_BASE
            peer.audio.push(chunk)

    # --- signalling --------------------------------------------------------------------------

    async def accept_offer(self, offer_sdp: str, ice_servers: list[IceServer]) -> str:
        """Replace the peer connection with one answering `offer_sdp`; return the answer."""
        validate_offer(offer_sdp)
        await self.close_peer()
        pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[_aiortc_ice_server(server) for server in ice_servers])
        )
        peer = _Peer(
            pc,
            video=ClockedTrack("video", self._consumer_connected),
            audio=ClockedTrack("audio", lambda: None),
        )
        video = pc.addTransceiver(peer.video, direction="sendonly")
        pc.addTransceiver(peer.audio, direction="sendonly")
        if self.settings.video_codec == "h264":
            _prefer_codec(video, "video/H264")
        self._watch(pc)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await pc.close()
            raise SdpError(f"the offer was not accepted: {exc}") from None
        self.peer = peer
        logger.info("peer connection ready (answer sent, %s)", self.settings.video_codec)
        return pc.localDescription.sdp

    async def add_ice_candidate(self, candidate: str, mid: str | None, index: int | None) -> None:
        if self.peer is None:
            raise NoPeerError("no peer connection: send webrtc_offer first")
        parsed = parse_candidate(candidate, mid, index)
        if parsed is not None and parsed.ip.endswith(".local"):
            # mDNS names cannot be resolved by aiortc; the browser sends real addresses too
            # unless its mDNS obfuscation is on (then only a TURN/STUN path can connect).
            logger.debug("ignoring mDNS candidate %s", parsed.ip)
            return
        await self.peer.pc.addIceCandidate(parsed)

    def _consumer_connected(self) -> None:
        logger.info("media flowing: the media clock runs")
        self.clock.resume()

    def _watch(self, pc: RTCPeerConnection) -> None:
        @pc.on("connectionstatechange")
        async def on_state() -> None:
            logger.info("peer connection %s", pc.connectionState)
            if pc.connectionState in ("failed", "closed") and self.peer and self.peer.pc is pc:
                # Nobody receives: hold speech in the queue until a new offer connects.
                self.clock.pause()

    async def close_peer(self) -> None:
        peer, self.peer = self.peer, None
        if peer is None:
            return
        self.clock.pause()
        peer.video.stop()
        peer.audio.stop()
        await peer.pc.close()

    async def close(self) -> None:
        self._clock_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._clock_task
        await self.close_peer()


def _aiortc_ice_server(server: IceServer) -> RTCIceServer:
    return RTCIceServer(urls=server.urls, username=server.username, credential=server.credential)


def _prefer_codec(transceiver: object, mime_type: str) -> None:
    codecs = RTCRtpSender.getCapabilities("video").codecs
    preferred = [c for c in codecs if c.mimeType == mime_type]
    rest = [c for c in codecs if c.mimeType != mime_type]
    transceiver.setCodecPreferences(preferred + rest)  # type: ignore[attr-defined]


class WebRTCStreamer:
    """All sessions' media. The session id is the key of every call."""

    def __init__(self, settings: WebRTCSettings) -> None:
        self.settings = settings
        self._sessions: dict[str, MediaSession] = {}
        restrict_host_addresses(settings.host_addresses)
        set_start_bitrate(settings.video_bitrate_kbps)

    def open(self, session_id: str, idle: IdleSource, listener: PlaybackListener) -> MediaSession:
        """The session's media (created on first use, before its first offer completes)."""
        media = self._sessions.get(session_id)
        if media is None:
            media = MediaSession(session_id, self.settings, idle, listener)
            self._sessions[session_id] = media
        return media

    def get(self, session_id: str) -> MediaSession:
        media = self._sessions.get(session_id)
        if media is None:
            raise NoPeerError("no peer connection: send webrtc_offer first")
        return media

    def has_media(self, session_id: str) -> bool:
        return session_id in self._sessions

    async def stream_frame(
        self, session_id: str, frame: np.ndarray, audio: np.ndarray, turn_id: str
    ) -> None:
        """Queue one tick (frame + its 640 samples); waits while the queue is full."""
        await self.get(session_id).queue.put(SpeechTick(frame, audio, turn_id))

    async def end_turn(self, session_id: str, turn_id: str) -> None:
        await self.get(session_id).queue.put(EndOfTurn(turn_id))

    def clear(self, session_id: str) -> PlaybackPosition | None:
        """Drop all queued speech now; return how far the playing turn got."""
        media = self._sessions.get(session_id)
        return media.clock.interrupt() if media else None

    async def close(self, session_id: str) -> None:
        media = self._sessions.pop(session_id, None)
        if media is not None:
            await media.close()

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(sid) for sid in list(self._sessions)))
