"""A Session is one WebSocket's conversation: its turns, its history, its media.

A turn is one answer being produced and spoken (`chat`: LLM -> speech; `speak`: speech
only). Its task runs the pipeline; the media clock reports back what actually played
(`speech_started`, `turn_played`), and `interrupt` cancels every turn at once, keeping in the
history only what the listener heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gpuserver.conversation import ConversationHistory
from gpuserver.engines.base import PreparedAvatar
from gpuserver.llm.base import LLMError
from gpuserver.media import TICK_SECONDS
from gpuserver.protocol import (
    AvatarChanged,
    Chat,
    Error,
    IceServerInfo,
    Interrupted,
    LLMText,
    Metrics,
    ServerMessage,
    Speak,
    SpeechStarted,
    SpeechStopped,
    Text,
    VoiceChanged,
    WebRTCAnswer,
    WebRTCIceCandidate,
    WebRTCOffer,
)
from gpuserver.sdp import SdpError
from gpuserver.services import Services
from gpuserver.speech_timeline import SpeechTimeline
from gpuserver.text_chunker import chunk_stream
from gpuserver.tts.base import TTSError
from gpuserver.webrtc_streamer import MediaSession

logger = logging.getLogger(__name__)

Send = Callable[[ServerMessage], None]


@dataclass(eq=False)
class Turn:
    id: str
    ref: str | None
    kind: Literal["chat", "speak"]
    arrived: float = field(default_factory=time.monotonic)
    timeline: SpeechTimeline = field(default_factory=SpeechTimeline)
    # Set once the turn's last tick is queued: a `speak` with queue=true starts after it.
    produced: asyncio.Event = field(default_factory=asyncio.Event)
    # Resolved with the number of ticks played when the media clock reaches the turn's end.
    played: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None
    speaking: bool = False
    llm_first_token_at: float | None = None
    llm_done_at: float | None = None
    first_frame_at: float | None = None

    def since_arrival_ms(self, moment: float | None) -> float | None:
        return None if moment is None else round((moment - self.arrived) * 1000, 1)

    def metrics(self, ticks: int, interrupted: bool) -> Metrics:
        return Metrics(
            turn_id=self.id,
            ref=self.ref,
            llm_first_token_ms=self.since_arrival_ms(self.llm_first_token_at),
            llm_total_ms=self.since_arrival_ms(self.llm_done_at),
            tts_first_audio_ms=self.since_arrival_ms(self.timeline.first_audio_at),
            first_frame_ms=self.since_arrival_ms(self.first_frame_at),
            spoken_ms=round(ticks * TICK_SECONDS * 1000, 1),
            interrupted=interrupted,
        )


class Session:
    def __init__(self, session_id: str, services: Services, send: Send, avatar: PreparedAvatar):
        self.id = session_id
        self.services = services
        self._send = send
        self._avatar = avatar
        llm = services.settings.llm
        self.history = ConversationHistory(llm.system_prompt, llm.history_turns, llm.history_chars)
        self._turns: list[Turn] = []
        self._signalling = asyncio.Lock()
        self._media: MediaSession | None = None
        self.voice: str | None = None  # TTS voice chosen with set_voice; None: the default

    @property
    def avatar_id(self) -> str:
        return self._avatar.avatar_id

    @property
    def turns(self) -> list[Turn]:
        return list(self._turns)

    def notify(self, message: ServerMessage) -> None:
        """Send a message to this session's client (never waits on the network)."""
        self._send(message)

    def _idle_frame(self, tick: int) -> np.ndarray:
        return self._avatar.idle_frame(tick)

    # --- signalling ----------------------------------------------------------------------

    def expect_peer(self) -> MediaSession:
        """Open the session's media as soon as an offer arrives, so a `speak` sent right
        after the offer queues speech for the connection being set up."""
        if self._media is None:
            self._media = self.services.streamer.open(self.id, self._idle_frame, self)
        return self._media

    async def accept_offer(self, message: WebRTCOffer) -> None:
        media = self.expect_peer()
        async with self._signalling:
            ice_servers = self.services.settings.ice_servers_for(self.id)
            try:
                answer = await media.accept_offer(message.sdp, ice_servers)
            except SdpError:
                if media.peer is None:  # a first offer failed: there is still no peer
                    await self._drop_media()
                raise
        self._send(WebRTCAnswer(sdp=answer))

    async def _drop_media(self) -> None:
        self.interrupt()
        self._media = None
        await self.services.streamer.close(self.id)

    async def add_ice_candidate(self, message: WebRTCIceCandidate) -> None:
        async with self._signalling:
            media = self.services.streamer.get(self.id)
            candidate = message.candidate
            if candidate is None:
                await media.add_ice_candidate("", None, None)
            else:
                await media.add_ice_candidate(
                    candidate.candidate, candidate.sdpMid, candidate.sdpMLineIndex
                )

    @property
    def has_peer(self) -> bool:
        return self._media is not None

    @property
    def peer_state(self) -> str:
        """The peer connection's state, "none" before any offer or after close_peer."""
        peer = self._media.peer if self._media else None
        return peer.pc.connectionState if peer else "none"

    @property
    def speaking_turn(self) -> str | None:
        return self._media.clock.speaking_turn if self._media else None

    async def close_peer(self) -> None:
        """Drop the peer connection but keep the session and its queued speech."""
        if self._media is not None:
            async with self._signalling:
                await self._media.close_peer()

    def ice_servers(self) -> list[IceServerInfo]:
        return [
            IceServerInfo(**server.model_dump())
            for server in self.services.settings.ice_servers_for(self.id)
        ]

    # --- turns ---------------------------------------------------------------------------

    def chat(self, message: Chat) -> Turn:
        """Answer with the LLM; speak the answer when a peer is connected."""
        self.interrupt()
        turn = Turn(_new_turn_id(), message.id, "chat")
        return self._start(turn, self._run_chat(turn, message.text))

    def speak(self, message: Speak) -> Turn:
        """Speak `message.text` verbatim; after what is queued if `queue`, else interrupting."""
        previous = self._turns[-1] if message.queue and self._turns else None
        if not message.queue:
            self.interrupt()
        turn = Turn(_new_turn_id(), message.id, "speak")
        return self._start(turn, self._run_speak(turn, message.text, previous))

    def _start(self, turn: Turn, work: Coroutine[Any, Any, None]) -> Turn:
        self._turns.append(turn)
        turn.task = asyncio.create_task(work, name=f"{turn.kind}-{turn.id}")
        turn.task.add_done_callback(lambda task: self._turn_failed(turn, task))
        logger.info("turn %s (%s) started", turn.id, turn.kind)
        return turn

    def _turn_failed(self, turn: Turn, task: asyncio.Task[None]) -> None:
        """A bug, not a user error: report it, and let playback and later turns go on."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("turn %s failed", turn.id, exc_info=task.exception())
        self._send(Error(code="internal", message="the turn failed", ref=turn.ref))
        if turn in self._turns:
            self._turns.remove(turn)
        turn.produced.set()

    async def _run_chat(self, turn: Turn, user_text: str) -> None:
        messages = self.history.messages_for(user_text)
        self.history.add_user(user_text)
        chunks: asyncio.Queue[str | None] = asyncio.Queue()  # small text: unbounded is fine
        speaking = self.has_peer
        stream_to_speech = self.services.settings.llm.stream_to_speech
        answer: list[str] = []
        llm_failed = False

        async def generate() -> None:
            nonlocal llm_failed
            held: list[str] = []
            try:
                deltas = self._llm_deltas(turn, messages, answer)
                async for chunk in chunk_stream(deltas):
                    (chunks.put_nowait if stream_to_speech else held.append)(chunk)
                for chunk in held:  # not streaming: speech starts once the answer is whole
                    chunks.put_nowait(chunk)
            except LLMError as exc:
                llm_failed = True
                self._error("llm_error", str(exc), turn.ref)
            finally:
                chunks.put_nowait(None)
            turn.llm_done_at = time.monotonic()
            self._send(Text(turn_id=turn.id, ref=turn.ref, content="".join(answer)))

        async with asyncio.TaskGroup() as group:
            group.create_task(generate())
            if speaking:
                group.create_task(self._produce_speech(turn, _drain(chunks)))
        if not llm_failed:
            self.history.add_assistant("".join(answer))
        await self._finish(turn, speaking)

    async def _llm_deltas(
        self, turn: Turn, messages: list, answer: list[str]
    ) -> AsyncIterator[str]:
        async for delta in self.services.ai.llm.stream(messages):
            if not delta:
                continue
            if turn.llm_first_token_at is None:
                turn.llm_first_token_at = time.monotonic()
            answer.append(delta)
            self._send(LLMText(turn_id=turn.id, ref=turn.ref, delta=delta))
            yield delta

    async def _run_speak(self, turn: Turn, text: str, previous: Turn | None) -> None:
        if previous is not None:
            await previous.produced.wait()
        await self._produce_speech(turn, text)
        self.history.add_assistant(text)
        await self._finish(turn, speaking=True)

    async def _produce_speech(self, turn: Turn, text: str | AsyncIterator[str]) -> None:
        try:
            await self.services.ai.generate_video_stream(
                text,
                self.avatar_id,
                self.id,
                turn_id=turn.id,
                timeline=turn.timeline,
                voice=self.voice,
            )
        except TTSError as exc:
            self._error("tts_error", str(exc), turn.ref)
            if not isinstance(text, str):
                async for _ in text:  # keep the LLM side flowing: text still streams
                    pass
        finally:
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                await self.services.streamer.end_turn(self.id, turn.id)
            turn.produced.set()

    async def _finish(self, turn: Turn, speaking: bool) -> None:
        ticks = await turn.played if speaking else 0
        self._turns.remove(turn)
        metrics = turn.metrics(ticks, interrupted=False)
        self._send(metrics)
        _log_metrics(turn, metrics)

    def interrupt(self) -> None:
        """Barge-in: stop every turn now. A no-op when nothing is going on."""
        turns = [turn for turn in self._turns if not turn.played.done()]
        if not turns:
            return
        position = self.services.streamer.clear(self.id)
        for turn in turns:
            assert turn.task is not None
            turn.task.cancel()
            self._turns.remove(turn)
            playing = position is not None and position.turn_id == turn.id
            samples = position.samples_played if playing and position else 0
            heard = turn.timeline.heard_text(samples)
            self._send(Interrupted(turn_id=turn.id, ref=turn.ref, heard_text=heard))
            if turn.speaking:
                self._send(SpeechStopped(turn_id=turn.id, ref=turn.ref, interrupted=True))
            if turn.kind == "chat" or heard:
                self.history.add_assistant(heard)
            ticks = position.ticks_played if playing and position else 0
            metrics = turn.metrics(ticks, interrupted=True)
            self._send(metrics)
            _log_metrics(turn, metrics)

    # --- PlaybackListener (called by the media clock) ------------------------------------

    def speech_started(self, turn_id: str) -> None:
        turn = self._find(turn_id)
        if turn is None:
            return
        turn.speaking = True
        turn.first_frame_at = time.monotonic()
        self._send(SpeechStarted(turn_id=turn.id, ref=turn.ref))

    def turn_played(self, turn_id: str, ticks: int) -> None:
        turn = self._find(turn_id)
        if turn is None:
            return
        if ticks:
            self._send(SpeechStopped(turn_id=turn.id, ref=turn.ref, interrupted=False))
        turn.played.set_result(ticks)

    def _find(self, turn_id: str) -> Turn | None:
        return next((turn for turn in self._turns if turn.id == turn_id), None)

    # --- avatar & lifecycle --------------------------------------------------------------

    async def set_avatar(self, avatar_id: str) -> None:
        self._avatar = await self.services.avatars.prepared(avatar_id)
        self._send(AvatarChanged(avatar_id=avatar_id))

    async def set_voice(self, voice: str | None) -> None:
        """Speak later turns in `voice` (None: the server's default); raises
        VoiceNotFoundError for a voice the TTS does not have."""
        if voice is not None:
            await self.services.ai.tts.check_voice(voice)
        self.voice = voice
        self._send(VoiceChanged(voice=voice))

    def _error(
        self, code: Literal["llm_error", "tts_error"], message: str, ref: str | None
    ) -> None:
        logger.warning("%s: %s", code, message)
        self._send(Error(code=code, message=message, ref=ref))

    async def close(self) -> None:
        tasks = [turn.task for turn in self._turns if turn.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._turns.clear()
        self._media = None
        await self.services.streamer.close(self.id)


async def _drain(chunks: asyncio.Queue[str | None]) -> AsyncIterator[str]:
    while (chunk := await chunks.get()) is not None:
        yield chunk


def _new_turn_id() -> str:
    return uuid.uuid4().hex[:12]


def _log_metrics(turn: Turn, metrics: Metrics) -> None:
    logger.info(
        "turn %s %s: llm_first_token=%s ms tts_first_audio=%s ms first_frame=%s ms spoken=%s ms%s",
        turn.id,
        turn.kind,
        metrics.llm_first_token_ms,
        metrics.tts_first_audio_ms,
        metrics.first_frame_ms,
        metrics.spoken_ms,
        " (interrupted)" if metrics.interrupted else "",
    )
