"""Per-session WebRTC: one RTCPeerConnection whose audio and video tracks share one clock.

A `MediaSession` holds a session's speech queue, its `MediaClock` and its current peer
connection, and is the clock's sink: each tick becomes one video frame and two 20 ms audio
frames with pts from the tick index. A new offer replaces the peer connection but keeps the
clock and the queue, so speech resumes where it was after a reconnect. `WebRTCStreamer`
creates media sessions from the WebRTC settings and knows the open ones (for the seed's
id-based API and for metrics). This module knows nothing of models or avatars: frames come
from whoever fills the queue, idle frames from the `IdleSource` it is given.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import aioice.ice
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterBuffer
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
    ClockStats,
    IdleSource,
    MediaClock,
    PlaybackListener,
    PlaybackPosition,
    SpeechQueue,
)
from gpuserver.sdp import SdpError, parse_candidate, validate_offer_async
from gpuserver.tasks import TaskOwner
from gpuserver.video_encoder import set_start_bitrate, tune_video_encoders

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
AUDIO_PTIME = AUDIO_FRAME_SAMPLES / SAMPLE_RATE  # 20 ms
# Ticks a track holds for a slow encoder before dropping its oldest frame. Pairing survives
# drops: pts still say which audio belongs to which frame.
TRACK_BUFFER_TICKS = 4
# The microphone's jitter buffer: 16 frames of room, released after 1 (aiortc's default: 4).
MIC_JITTER_CAPACITY = 16
MIC_JITTER_PREFETCH = 1


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


# --- tracks ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Outgoing:
    frame: Frame
    release_at: float  # time.monotonic() before which the encoder does not get it


class ClockedTrack(MediaStreamTrack):
    """A track fed by the media clock; aiortc's sender pulls from it and encodes off-loop.

    A frame can be held until its release time: the second 20 ms audio frame of a tick
    leaves 20 ms after the first.
    """

    def __init__(self, kind: str, on_first_recv: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.kind = kind
        frames_per_tick = AUDIO_FRAMES_PER_TICK if kind == "audio" else 1
        self._max_frames = TRACK_BUFFER_TICKS * frames_per_tick
        self._frames: deque[_Outgoing] = deque()
        self._ready = asyncio.Event()
        self._on_first_recv = on_first_recv
        self.dropped = 0

    def push(self, frame: Frame, *, release_at: float = 0.0) -> None:
        if self.readyState != "live":
            return
        while len(self._frames) >= self._max_frames:
            # The encoder fell behind: drop, never delay the clock.
            self._frames.popleft()
            self.dropped += 1
        self._frames.append(_Outgoing(frame, release_at))
        self._ready.set()

    async def recv(self) -> Frame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._on_first_recv is not None:
            callback, self._on_first_recv = self._on_first_recv, None
            callback()
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        head = self._frames.popleft()
        if (wait := head.release_at - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        return head.frame


@dataclass(eq=False)
class _Peer:
    pc: RTCPeerConnection
    video: ClockedTrack
    audio: ClockedTrack
    remote_candidates: int = 0
    microphone: MediaStreamTrack | None = None  # the client's, when its offer sends audio
    deadline: asyncio.TimerHandle | None = None  # closes the peer if it never connects

    async def close(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.video.stop()
        self.audio.stop()
        await self.pc.close()


class MediaListener(PlaybackListener, Protocol):
    """What a session hears from its media: playback (from the clock) and its peer."""

    def peer_lost(self, reason: str, failed: bool) -> None:
        """The client's peer connection went away: it failed (or never connected), or the
        client closed it; `reason` says which, for the client."""

    def microphone(self, track: MediaStreamTrack) -> None:
        """The client's peer connection sends the user's microphone on `track`."""


class MediaSession:
    """Queue, clock and current peer connection of one session. Also the clock's sink.

    The clock's task is not started here: the session that owns this media runs
    `clock.run()` among its own tasks.
    """

    def __init__(
        self,
        session_id: str,
        settings: WebRTCSettings,
        idle: IdleSource,
        listener: MediaListener,
        on_cut_to_idle: Callable[[float], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self._listener = listener
        self.settings = settings
        self.queue = SpeechQueue(settings.queue_ticks)
        self.clock = MediaClock(
            self.queue,
            idle,
            self,
            listener,
            prebuffer_ticks=settings.prebuffer_ticks,
            prebuffer_timeout=settings.prebuffer_timeout_ms / 1000,
            on_cut_to_idle=on_cut_to_idle,
        )
        self._peer: _Peer | None = None
        self._signalling = asyncio.Lock()
        self._closing = TaskOwner(f"peers-{session_id}")  # peers dropped by their own state

    @property
    def peer_state(self) -> str:
        """The peer connection's state; "none" before any offer or after `close_peer`."""
        return self._peer.pc.connectionState if self._peer else "none"

    # --- TickSink ----------------------------------------------------------------------------

    def send_tick(self, index: int, frame: np.ndarray, audio: np.ndarray) -> None:
        peer = self._peer
        if peer is None:
            return
        video = VideoFrame.from_ndarray(frame, format="bgr24")
        video.pts = index * VIDEO_PTS_PER_TICK
        video.time_base = VIDEO_TIME_BASE
        # No key frame after an interrupt: at a constant rate it is blurry for a few hundred
        # ms, and its burst makes a busy receiver lower its estimate (bench/interrupt.py:
        # p95 96 vs 86 ms at 1 session, 291-696 vs 158-198 ms at 4 on 2 cores).
        peer.video.push(video)
        now = time.monotonic()
        for half in range(AUDIO_FRAMES_PER_TICK):
            samples = audio[half * AUDIO_FRAME_SAMPLES : (half + 1) * AUDIO_FRAME_SAMPLES]
            chunk = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            chunk.sample_rate = SAMPLE_RATE
            chunk.pts = (index * AUDIO_FRAMES_PER_TICK + half) * AUDIO_FRAME_SAMPLES
            chunk.time_base = AUDIO_TIME_BASE
            peer.audio.push(chunk, release_at=now + half * AUDIO_PTIME)

    def interrupt(self) -> PlaybackPosition | None:
        """Drop all queued speech now; return how far the playing turn got."""
        return self.clock.interrupt()

    # --- signalling --------------------------------------------------------------------------

    async def accept_offer(self, offer_sdp: str, ice_servers: list[IceServer]) -> str:
        """Answer `offer_sdp` with a new peer connection; return the answer.

        The working peer is replaced only once the new one is set up: a rejected offer, or
        a handler cancelled half-way, leaves it as it was and leaks nothing.
        """
        await validate_offer_async(offer_sdp)
        async with self._signalling:
            peer = self._new_peer(ice_servers)
            try:
                await peer.pc.setRemoteDescription(
                    RTCSessionDescription(sdp=offer_sdp, type="offer")
                )
                await peer.pc.setLocalDescription(await peer.pc.createAnswer())
            except BaseException as exc:
                await asyncio.shield(peer.close())
                if isinstance(exc, Exception):
                    raise SdpError(f"the offer was not accepted: {exc}") from None
                raise
            old, self._peer = self._peer, peer
            self._announce_microphone(peer)
            if old is not None:
                await old.close()
        logger.info("peer connection ready (answer sent, %s)", self.settings.video_codec)
        return peer.pc.localDescription.sdp

    def _new_peer(self, ice_servers: list[IceServer]) -> _Peer:
        pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[_aiortc_ice_server(server) for server in ice_servers])
        )
        peer = _Peer(
            pc, video=ClockedTrack("video", self._consumer_connected), audio=ClockedTrack("audio")
        )
        video = pc.addTransceiver(peer.video, direction="sendonly")
        # sendrecv: an offer with a microphone gets it answered; a recvonly one, sendonly.
        pc.addTransceiver(peer.audio, direction="sendrecv")
        if self.settings.video_codec == "h264":
            _prefer_codec(video, "video/H264")
        self._watch(peer)
        return peer

    async def add_ice_candidate(self, candidate: str, mid: str | None, index: int | None) -> None:
        async with self._signalling:
            peer = self._peer
            if peer is None:
                raise NoPeerError("no peer connection: send webrtc_offer first")
            parsed = parse_candidate(candidate, mid, index)
            if parsed is not None:
                peer.remote_candidates += 1
                if peer.remote_candidates > self.settings.max_remote_candidates:
                    limit = self.settings.max_remote_candidates
                    raise SdpError(f"too many ICE candidates: at most {limit} per offer")
            if parsed is not None and parsed.ip.endswith(".local"):
                # mDNS names cannot be resolved by aiortc; the browser sends real addresses
                # too unless its mDNS obfuscation is on (then only TURN/STUN can connect).
                logger.debug("ignoring mDNS candidate %r", parsed.ip)
                return
            await peer.pc.addIceCandidate(parsed)

    def _announce_microphone(self, peer: _Peer) -> None:
        if peer.microphone is not None:
            logger.info("the client sends its microphone")
            self._listener.microphone(peer.microphone)

    def _consumer_connected(self) -> None:
        logger.info("media flowing: the media clock runs")
        self.clock.resume()

    def _watch(self, peer: _Peer) -> None:
        pc = peer.pc
        timeout = self.settings.connect_timeout_s
        never = f"the WebRTC connection did not connect within {timeout:.0f} s"
        loop = asyncio.get_running_loop()
        peer.deadline = loop.call_later(timeout, self._lost, peer, never, True)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                _hold_less_audio(pc, track)
                peer.microphone = track  # announced once the peer is the session's
                if self._peer is peer:
                    self._announce_microphone(peer)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            logger.info("peer connection %s", pc.connectionState)
            if pc.connectionState == "connected" and peer.deadline is not None:
                peer.deadline.cancel()
            elif pc.connectionState in ("failed", "closed"):
                failed = pc.connectionState == "failed"
                self._lost(peer, f"the WebRTC connection {pc.connectionState}", failed)

    def _lost(self, peer: _Peer, reason: str, failed: bool) -> None:
        """The current peer failed, closed or never connected: drop it and say why."""
        if self._peer is not peer:
            return  # replaced or closed on purpose: nothing was lost
        self._peer = None
        self.clock.pause()  # nobody receives: queued speech waits for a new offer
        self._closing.start(peer.close(), "close-lost-peer")
        logger.info("peer connection lost: %s", reason)
        self._listener.peer_lost(reason, failed)

    async def close_peer(self) -> None:
        async with self._signalling:
            peer, self._peer = self._peer, None
            if peer is not None:
                self.clock.pause()
                await peer.close()

    async def close(self) -> None:
        """Close the peer connection and any being dropped; never raises."""
        try:
            await self.close_peer()
        except Exception:
            logger.exception("closing the peer connection failed")
        await self._closing.close()


def _hold_less_audio(pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
    """aiortc holds 4 received audio frames (80 ms) to smooth out network jitter, as a
    player must; the microphone feeds voice detection, which only needs them in order: one
    frame of hold is 60 ms sooner to notice the user speaking or falling silent."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if receiver.track is track:
            receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(
                capacity=MIC_JITTER_CAPACITY, prefetch=MIC_JITTER_PREFETCH
            )


def _aiortc_ice_server(server: IceServer) -> RTCIceServer:
    return RTCIceServer(urls=server.urls, username=server.username, credential=server.credential)


def _prefer_codec(transceiver: Any, mime_type: str) -> None:
    codecs = RTCRtpSender.getCapabilities("video").codecs
    preferred = [c for c in codecs if c.mimeType == mime_type]
    rest = [c for c in codecs if c.mimeType != mime_type]
    transceiver.setCodecPreferences(preferred + rest)


class WebRTCStreamer:
    """Creates every session's media and knows the open ones."""

    def __init__(self, settings: WebRTCSettings) -> None:
        self.settings = settings
        self._sessions: dict[str, MediaSession] = {}
        self.retired = ClockStats()  # ticks of closed sessions, so counters never go back
        restrict_host_addresses(settings.host_addresses)
        set_start_bitrate(settings.video_bitrate_kbps)
        tune_video_encoders()

    def open(
        self,
        session_id: str,
        idle: IdleSource,
        listener: MediaListener,
        on_cut_to_idle: Callable[[float], None] | None = None,
    ) -> MediaSession:
        """A new media session for `session_id` (its clock not yet running)."""
        media = MediaSession(session_id, self.settings, idle, listener, on_cut_to_idle)
        self._sessions[session_id] = media
        return media

    def get(self, session_id: str) -> MediaSession:
        media = self._sessions.get(session_id)
        if media is None:
            raise NoPeerError("no peer connection: send webrtc_offer first")
        return media

    def __iter__(self) -> Iterator[MediaSession]:
        return iter(list(self._sessions.values()))

    async def close(self, media: MediaSession) -> None:
        if self._sessions.get(media.session_id) is media:
            del self._sessions[media.session_id]
            stats = media.clock.stats
            self.retired.ticks_sent += stats.ticks_sent
            self.retired.speech_ticks += stats.speech_ticks
            self.retired.idle_ticks += stats.idle_ticks
            self.retired.skipped_ticks += stats.skipped_ticks
        await media.close()
