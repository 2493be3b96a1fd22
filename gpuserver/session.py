"""A Session is one WebSocket's conversation: its turns, its history, its media.

A turn is one answer being produced and spoken (`chat`: LLM -> speech; `speak`: speech
only); its speech is a `SpeechPipeline`. The media clock reports back what actually played
(`speech_started`, `turn_played`), and `interrupt` cancels every turn at once, keeping in the
history only what the listener heard. The session speaks the protocol only through the
message models of `gpuserver.protocol`.

Every task of a session (its media clock, its turns) belongs to its `TaskOwner`: a crash is a
server fault, reported as `error internal` before the session is ended by its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from aiortc.mediastreams import MediaStreamTrack

from gpuserver.conversation import ConversationHistory
from gpuserver.engines.base import PreparedAvatar
from gpuserver.llm.base import ChatMessage, LLMError
from gpuserver.media import TICK_SECONDS
from gpuserver.protocol import (
    AvatarChanged,
    Chat,
    Error,
    IceServerInfo,
    Interrupted,
    LLMText,
    Metrics,
    Queued,
    ServerMessage,
    Speak,
    SpeechStarted,
    SpeechStopped,
    Text,
    UserSpeechStarted,
    UserSpeechStopped,
    UserTranscript,
    VoiceChanged,
    WebRTCAnswer,
    WebRTCIceCandidate,
    WebRTCOffer,
)
from gpuserver.services import Services
from gpuserver.speech_pipeline import SpeechPipeline
from gpuserver.speech_timeline import SpeechTimeline
from gpuserver.tasks import TaskOwner
from gpuserver.text_chunker import chunk_stream, split_text
from gpuserver.tts.base import TTSError
from gpuserver.voice.input import (
    Transcript,
    UserBargedIn,
    UserStartedTalking,
    UserStoppedTalking,
    VoiceError,
    VoiceEvent,
    VoiceInput,
)
from gpuserver.webrtc_streamer import MediaSession, NoPeerError

logger = logging.getLogger(__name__)

Send = Callable[[ServerMessage], None]
# How long speech waits for a new offer after the client's peer connection went away.
REOFFER_GRACE_S = 2.0


@dataclass(eq=False)
class Turn:
    id: str
    ref: str | None
    kind: Literal["chat", "speak"]
    avatar: PreparedAvatar
    arrived: float = field(default_factory=time.monotonic)
    timeline: SpeechTimeline = field(default_factory=SpeechTimeline)
    # Set once the turn has queued all it will (or failed): a queued `speak` starts after it.
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
    heard: Heard | None = None  # a turn asked by voice: when the user stopped talking

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
            asr_ms=self.heard.asr_ms if self.heard else None,
            speech_end_to_first_frame_ms=(
                round((self.first_frame_at - self.heard.speech_ended_at) * 1000, 1)
                if self.heard and self.first_frame_at is not None
                else None
            ),
        )


@dataclass(frozen=True)
class Heard:
    """How a voice turn's question was heard: when the speech ended, how long recognition took."""

    speech_ended_at: float  # time.monotonic()
    asr_ms: float


class Session:
    def __init__(
        self,
        session_id: str,
        services: Services,
        send: Send,
        avatar: PreparedAvatar,
        on_fatal: Callable[[], None],
    ) -> None:
        """`send` queues a message to the client; `on_fatal` ends the connection after a
        server fault (the session is then closed by its owner)."""
        self.id = session_id
        self.resume_key = secrets.token_urlsafe(16)
        self.services = services
        self._send = send
        self._on_fatal = on_fatal
        self._avatar = avatar  # the avatar of the next turn
        self._idle_avatar = avatar  # drawn between turns: switches only when no turn speaks
        llm = services.settings.llm
        self.history = ConversationHistory(llm.system_prompt, llm.history_turns, llm.history_chars)
        self._turns: list[Turn] = []
        self._tasks = TaskOwner(f"session-{session_id}", on_crash=self._crashed)
        self._media: MediaSession | None = None
        self._reoffer_grace: asyncio.TimerHandle | None = None
        self._speech_ended_at = 0.0  # when the user last stopped talking (time.monotonic())
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

    def attach(self, send: Send, on_fatal: Callable[[], None]) -> None:
        """Talk through a new connection (a resumed session)."""
        self._send, self._on_fatal = send, on_fatal

    def detach(self) -> None:
        """The connection is gone: turns go on, their messages go nowhere until `attach`."""
        self._send, self._on_fatal = _nowhere, self._crashed_detached

    def _crashed_detached(self) -> None:
        logger.warning("a detached session hit a server fault; it ends when its grace does")

    def _crashed(self, task_name: str, error: BaseException) -> None:
        self._send(Error(code="internal", message="internal server error; the session ends"))
        self._on_fatal()

    # --- signalling ----------------------------------------------------------------------

    @property
    def has_media(self) -> bool:
        """An offer was received: the session has media (its peer may still be connecting),
        so speech can be queued for it."""
        return self._media is not None

    @property
    def peer_state(self) -> str:
        """The peer connection's state: "none" before any offer or after `close_peer`."""
        return self._media.peer_state if self._media else "none"

    @property
    def speaking_turn(self) -> str | None:
        return self._media.clock.speaking_turn if self._media else None

    @property
    def media(self) -> MediaSession | None:
        return self._media

    def _idle_frame(self, phase: int) -> np.ndarray:
        return self._idle_avatar.idle_frame(phase)

    async def accept_offer(self, message: WebRTCOffer) -> None:
        """Answer the offer. The first accepted one opens the session's media and starts its
        clock; later ones replace the peer connection and keep clock and queued speech."""
        ice_servers = self.services.settings.ice_servers_for(self.id)
        media = self._media
        if media is not None:
            answer = await media.accept_offer(message.sdp, ice_servers)
        else:
            streamer, telemetry = self.services.streamer, self.services.telemetry
            media = streamer.open(
                self.id, self._idle_frame, self, telemetry.interrupt_to_idle.observe
            )
            try:
                answer = await media.accept_offer(message.sdp, ice_servers)
            except BaseException:
                await asyncio.shield(streamer.close(media))
                raise
            self._media = media
            self._tasks.start(media.clock.run(), "media-clock")
        self._send(WebRTCAnswer(sdp=answer, ref=message.id))

    def peer_lost(self, reason: str, failed: bool) -> None:
        """The client's peer connection failed or was closed. Speech waits for a new offer
        for a moment (a client renegotiating closes its old peer first); past that, what
        was speaking is cut — nobody hears it."""
        if failed:
            self._send(Error(code="peer_failed", message=f"{reason}; send a new webrtc_offer"))
        if self.speaking_turn is not None and self._reoffer_grace is None:
            loop = asyncio.get_running_loop()
            self._reoffer_grace = loop.call_later(REOFFER_GRACE_S, self._cut_unheard)

    def _cut_unheard(self) -> None:
        self._reoffer_grace = None
        if self.peer_state == "none":
            logger.info("no new offer after the peer went away: cutting the turns")
            self.interrupt()

    async def add_ice_candidate(self, message: WebRTCIceCandidate) -> None:
        if self._media is None:
            raise NoPeerError("no peer connection: send webrtc_offer before candidates")
        candidate = message.candidate
        if candidate is None:
            await self._media.add_ice_candidate("", None, None)
        else:
            await self._media.add_ice_candidate(
                candidate.candidate, candidate.sdpMid, candidate.sdpMLineIndex
            )

    async def close_peer(self) -> None:
        """Drop the peer connection but keep the session and its queued speech."""
        if self._media is not None:
            await self._media.close_peer()

    def ice_servers(self) -> list[IceServerInfo]:
        return [
            IceServerInfo(**server.model_dump())
            for server in self.services.settings.ice_servers_for(self.id)
        ]

    # --- turns ---------------------------------------------------------------------------

    def chat(self, message: Chat) -> Turn:
        """Answer with the LLM; speak the answer when the session has media."""
        self.interrupt()
        turn = self._new_turn(message.id, "chat")
        return self._start(turn, self._run_chat(turn, message.text))

    def speak(self, message: Speak) -> Turn:
        """Speak `message.text` verbatim; after what is queued if `queue`, else interrupting."""
        if self._media is None:
            raise NoPeerError("no peer connection: send webrtc_offer before speak")
        previous = self._turns[-1] if message.queue and self._turns else None
        if not message.queue:
            self.interrupt()
        turn = self._new_turn(message.id, "speak")
        return self._start(turn, self._run_speak(turn, message.text, previous))

    def _new_turn(self, ref: str | None, kind: Literal["chat", "speak"]) -> Turn:
        self.services.telemetry.turns.labels(kind).inc()
        return Turn(uuid.uuid4().hex[:12], ref, kind, self._avatar)

    def _start(self, turn: Turn, work: Coroutine[Any, Any, None]) -> Turn:
        self._turns.append(turn)
        turn.task = self._tasks.start(work, f"{turn.kind}-{turn.id}")
        logger.info("turn %s (%s) started", turn.id, turn.kind)
        return turn

    async def _run_chat(self, turn: Turn, user_text: str) -> None:
        messages = self.history.messages_for(user_text)
        self.history.add_user(user_text)
        chunks: asyncio.Queue[str | None] = asyncio.Queue()  # small text: unbounded is fine
        media = self._media
        answer: list[str] = []
        llm_failed = False

        async def generate() -> None:
            nonlocal llm_failed
            stream_to_speech = self.services.settings.llm.stream_to_speech
            held: list[str] = []
            deltas = self._llm_deltas(turn, messages, answer)
            sentences = chunk_stream(deltas)
            try:
                async with contextlib.aclosing(deltas), contextlib.aclosing(sentences):
                    async for chunk in sentences:
                        (chunks.put_nowait if stream_to_speech else held.append)(chunk)
                for chunk in held:  # not streaming: speech starts once the answer is whole
                    chunks.put_nowait(chunk)
            except LLMError as exc:
                llm_failed = True
                self._error("llm_error", str(exc), turn.ref)
            finally:
                chunks.put_nowait(None)
            turn.llm_done_at = time.monotonic()
            logger.info("turn %s: answer complete (%d chars)", turn.id, len("".join(answer)))
            self._send(Text(turn_id=turn.id, ref=turn.ref, content="".join(answer)))

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(generate())
                if media is not None:
                    group.create_task(self._produce_speech(turn, media, _drain(chunks)))
        finally:
            turn.produced.set()
        if not llm_failed:
            self.history.add_assistant("".join(answer))
        await self._finish(turn, spoken=media is not None)

    async def _llm_deltas(
        self, turn: Turn, messages: list[ChatMessage], answer: list[str]
    ) -> AsyncIterator[str]:
        # Closed explicitly: an interrupt stops generation now, not when collected.
        def queued(ahead: int) -> None:
            self._send(Queued(turn_id=turn.id, ref=turn.ref, ahead=ahead))

        stream = self.services.ai.llm.stream(messages, key=self.id, on_queued=queued)
        async with contextlib.aclosing(stream) as deltas:
            async for delta in deltas:
                if not delta:
                    continue
                if turn.llm_first_token_at is None:
                    turn.llm_first_token_at = time.monotonic()
                    elapsed = turn.llm_first_token_at - turn.arrived
                    self.services.telemetry.llm_first_token.observe(elapsed)
                    logger.info("turn %s: first LLM token after %.0f ms", turn.id, elapsed * 1000)
                answer.append(delta)
                self._send(LLMText(turn_id=turn.id, ref=turn.ref, delta=delta))
                yield delta

    async def _run_speak(self, turn: Turn, text: str, previous: Turn | None) -> None:
        if previous is not None:
            await previous.produced.wait()
        media = self._media
        assert media is not None  # speak() checked it; media only goes away on close
        try:
            await self._produce_speech(turn, media, _iterate(split_text(text)))
        finally:
            turn.produced.set()
        self.history.add_assistant(text)
        await self._finish(turn, spoken=True)

    async def _produce_speech(
        self, turn: Turn, media: MediaSession, chunks: AsyncIterable[str]
    ) -> None:
        services = self.services
        pipeline = SpeechPipeline(
            services.ai.tts, services.avatars.engine, turn.avatar, media.clock, turn.id,
            turn.timeline, self.voice,
        )  # fmt: skip
        try:
            await pipeline.speak(chunks)
        except TTSError as exc:
            self._error("tts_error", str(exc), turn.ref)
            async for _ in chunks:  # keep the LLM side flowing: text still streams
                pass
        if (first_audio := turn.timeline.first_audio_at) is not None:
            services.telemetry.tts_first_audio.observe(first_audio - turn.arrived)
        logger.info("turn %s: speech queued", turn.id)

    async def _finish(self, turn: Turn, spoken: bool) -> None:
        ticks = await turn.played if spoken else 0
        self._turns.remove(turn)
        self._end_turn(turn, ticks, interrupted=False)

    def _end_turn(self, turn: Turn, ticks: int, interrupted: bool) -> None:
        metrics = turn.metrics(ticks, interrupted)
        self._send(metrics)
        logger.info(
            "turn %s %s: llm_first_token=%s ms tts_first_audio=%s ms first_frame=%s ms "
            "spoken=%s ms%s",
            turn.id,
            turn.kind,
            metrics.llm_first_token_ms,
            metrics.tts_first_audio_ms,
            metrics.first_frame_ms,
            metrics.spoken_ms,
            " (interrupted)" if interrupted else "",
        )
        if not self._turns:
            self._idle_avatar = self._avatar

    def interrupt(self) -> None:
        """Barge-in: stop every turn now. A no-op when nothing is going on."""
        turns = [turn for turn in self._turns if not turn.played.done()]
        if not turns:
            return
        position = self._media.interrupt() if self._media else None
        for turn in turns:
            assert turn.task is not None
            turn.task.cancel()
            self._turns.remove(turn)
            playing = position is not None and position.turn_id == turn.id
            heard = turn.timeline.heard_text(position.samples_played if playing else 0)
            self._send(Interrupted(turn_id=turn.id, ref=turn.ref, heard_text=heard))
            if turn.speaking:
                self._send(SpeechStopped(turn_id=turn.id, ref=turn.ref, interrupted=True))
            if turn.kind == "chat" or heard:
                self.history.add_assistant(heard)
            self.services.telemetry.interrupts.inc()
            logger.info("turn %s: interrupted after %r", turn.id, heard[-40:])
            self._end_turn(turn, position.ticks_played if playing else 0, interrupted=True)

    # --- voice input ---------------------------------------------------------------------

    def microphone(self, track: MediaStreamTrack) -> None:
        """The peer sends the user's microphone: listen to it, if voice input is configured."""
        listening = self.services.ai.listening
        if listening is None:
            logger.info("the client sends its microphone, but asr.backend is none: not listening")
            return
        voice = VoiceInput(
            track,
            asr=listening.asr,
            vad=listening.vad,
            config=listening.endpoints,
            avatar_speaking=lambda: self.speaking_turn is not None,
        )
        self._tasks.start(self._listen(voice), "voice")

    async def _listen(self, voice: VoiceInput) -> None:
        """Until the microphone track ends (its peer replaced or closed)."""
        voice.start()
        try:
            async for event in voice.events():
                self._heard(event)
        finally:
            await voice.aclose()

    def _heard(self, event: VoiceEvent) -> None:
        match event:
            case UserBargedIn():
                self._barge_in()
            case UserStartedTalking(t=t):
                self._send(UserSpeechStarted(t=round(t, 3)))
                self._barge_in()
            case UserStoppedTalking(duration_ms=duration_ms, ended_at=ended_at):
                self._speech_ended_at = ended_at
                self._send(UserSpeechStopped(duration_ms=duration_ms))
            case Transcript(text=text, asr_ms=asr_ms):
                self._send(UserTranscript(text=text, final=True))
                if text.strip():  # the transcript runs as a chat turn
                    turn = self.chat(Chat(type="chat", text=text))
                    turn.heard = Heard(self._speech_ended_at, asr_ms)
            case VoiceError(message=message):
                self._error("asr_error", message, None)

    def _barge_in(self) -> None:
        """The user talks while a turn is on: it stops, as on `interrupt` (when enabled)."""
        if self._turns and self.services.settings.asr.barge_in:
            logger.info("the user talks over the avatar: barge-in")
            self.interrupt()

    # --- PlaybackListener (called by the media clock) ------------------------------------

    def speech_started(self, turn_id: str) -> None:
        turn = self._find(turn_id)
        if turn is None:
            return
        turn.speaking = True
        turn.first_frame_at = time.monotonic()
        self.services.telemetry.first_frame.observe(turn.first_frame_at - turn.arrived)
        logger.info("turn %s: speech started", turn.id)
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
        """Speak the next turns with `avatar_id`; the turn speaking now finishes as it is."""
        self._avatar = await self.services.avatars.prepared(avatar_id)
        if not self._turns:
            self._idle_avatar = self._avatar
        self._send(AvatarChanged(avatar_id=avatar_id))

    async def set_voice(self, voice: str | None) -> None:
        """Speak later turns in `voice` (None: the server's default); raises
        VoiceNotFoundError for a voice the TTS does not have."""
        if voice is not None:
            await self.services.ai.tts.check_voice(voice)
        self.voice = voice
        self._send(VoiceChanged(voice=voice))

    def _error(
        self, code: Literal["llm_error", "tts_error", "asr_error"], message: str, ref: str | None
    ) -> None:
        logger.warning("%s: %r", code, message)
        self._send(Error(code=code, message=message, ref=ref))

    async def close(self) -> None:
        """Stop every task of the session and its media; never raises."""
        if self._reoffer_grace is not None:
            self._reoffer_grace.cancel()
        await self._tasks.close()
        self._turns.clear()
        media, self._media = self._media, None
        if media is not None:
            await self.services.streamer.close(media)


def _nowhere(message: ServerMessage) -> None:
    pass


async def _drain(chunks: asyncio.Queue[str | None]) -> AsyncIterator[str]:
    while (chunk := await chunks.get()) is not None:
        yield chunk


async def _iterate(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item
