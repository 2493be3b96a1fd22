"""Voice input of one session: mic track -> 16 kHz -> VAD -> endpointing -> ASR -> events.

Tasks, all owned here (`aclose` cancels and awaits them):
- the listener reads the track, runs each chunk through the stream's VAD (on the VAD thread)
  and the endpointer, keeps the audio an utterance may still need, reports barge-ins and
  the start and end of speech at once, and starts transcribing each utterance — already at
  its first pause (`early_transcribe_ms`); if the user goes on, that transcription is
  dropped and the longer utterance transcribed at its end;
- one transcription task per utterance;
- the reporter hands out the transcriptions in the order their utterances ended.
Queues are bounded: at most `max_pending` utterances wait to be reported and `max_events`
events for the consumer; a full queue makes its producer wait, so nothing is dropped.

Per utterance the events are UserStartedTalking (after UserBargedIn, when the user talks
over the avatar), then UserStoppedTalking, then one final Transcript (text "" when nothing
was recognised) or a VoiceError when recognition failed; the next utterance's events may
come before the previous one's transcript. Events end when the track ends (after the last
transcript) or at `aclose`."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
from aiortc.mediastreams import MediaStreamTrack

from gpuserver.asr.base import ASRBackend, ASRError
from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.tasks import TaskOwner
from gpuserver.voice.endpointing import (
    BargeIn,
    Endpoint,
    EndpointConfig,
    Endpointer,
    SpeechEnd,
    SpeechPause,
    SpeechStart,
)
from gpuserver.voice.mic import mic_pcm
from gpuserver.voice.vad import WINDOW_MS, WINDOW_SAMPLES, SileroVAD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserStartedTalking:
    """The user started speaking `t` seconds into the mic stream (detected at `detected_at`,
    loop time, `min_speech_ms` of voice later)."""

    t: float
    detected_at: float


@dataclass(frozen=True)
class UserBargedIn:
    """The user's voice over the avatar's, `t` seconds into the mic stream: not yet an
    utterance (that is UserStartedTalking, `min_speech_ms` in), but enough to stop talking."""

    t: float


@dataclass(frozen=True)
class UserStoppedTalking:
    """The user stopped speaking; `ended_at` is the loop time the speech ended (estimated from
    the stream position: `end_silence_ms` before it was detected)."""

    duration_ms: int
    ended_at: float


@dataclass(frozen=True)
class Transcript:
    """What the user said; `asr_ms` is the recogniser's time for it."""

    text: str
    final: bool
    asr_ms: float


@dataclass(frozen=True)
class VoiceError:
    """Recognition of an utterance failed; the message is safe to show to the user."""

    message: str


VoiceEvent = UserStartedTalking | UserBargedIn | UserStoppedTalking | Transcript | VoiceError

_END = object()


@dataclass(frozen=True, eq=False)
class _Recognition:
    """An utterance being transcribed."""

    start: int
    end: int
    task: asyncio.Task[Transcript | VoiceError]


class _Recording:
    """The stream's recent audio by absolute sample position, trimmed as it becomes useless."""

    def __init__(self) -> None:
        self._start = 0  # position of self._pcm[0]
        self._pcm = np.zeros(0, dtype=PCM_DTYPE)

    @property
    def end(self) -> int:
        return self._start + len(self._pcm)

    def append(self, pcm: np.ndarray) -> None:
        self._pcm = np.concatenate([self._pcm, pcm])

    def slice(self, start: int, end: int) -> np.ndarray:
        begin = max(start - self._start, 0)
        return self._pcm[begin : max(end - self._start, begin)].copy()

    def keep_from(self, position: int) -> None:
        drop = min(max(position - self._start, 0), len(self._pcm))
        self._pcm, self._start = self._pcm[drop:], self._start + drop


class VoiceInput:
    """Listens to one microphone track; `events()` reports what the user says.

    `avatar_speaking()` tells whether the avatar's voice is playing (it arms the echo guard).
    `language` overrides the recogniser's configured one. Call `start()` inside the event
    loop, `aclose()` when done.
    """

    def __init__(
        self,
        track: MediaStreamTrack,
        *,
        asr: ASRBackend,
        vad: SileroVAD,
        config: EndpointConfig,
        avatar_speaking: Callable[[], bool] = lambda: False,
        language: str | None = None,
        max_pending: int = 2,
        max_events: int = 32,
    ) -> None:
        self._avatar_speaking = avatar_speaking
        self._track = track
        self._asr = asr
        self._vad = vad.stream()
        self._endpointer = Endpointer(config)
        self._language = language
        self._pad = config.pad_ms * SAMPLE_RATE // 1000
        # Audio kept while idle: the longest onset run (voice windows with single-window dips
        # between them), the pad before it and the VAD's partial window.
        onset_windows = math.ceil(config.min_speech_ms / WINDOW_MS)
        self._lookback = 2 * onset_windows * WINDOW_SAMPLES + self._pad
        self._recording = _Recording()
        self._utterances: asyncio.Queue[_Recognition | object] = asyncio.Queue(max_pending)
        self._early: _Recognition | None = None  # transcribing since the latest pause
        self._events: asyncio.Queue[VoiceEvent | object] = asyncio.Queue(max_events)
        self._tasks = TaskOwner("voice")
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._tasks.start(self._listen(), "listen")
        self._tasks.start(self._recognise(), "recognise")

    async def events(self) -> AsyncIterator[VoiceEvent]:
        """The events, in order, until the track ends or `aclose()`; iterate it once."""
        while (event := await self._events.get()) is not _END:
            assert isinstance(event, VoiceEvent)
            yield event

    async def aclose(self) -> None:
        await self._tasks.close()
        while not self._events.empty():  # whatever was not read is moot now
            self._events.get_nowait()
        self._events.put_nowait(_END)

    async def _listen(self) -> None:
        try:
            async for pcm in mic_pcm(self._track):
                self._recording.append(pcm)
                for window in await self._vad.process(pcm):
                    speaking = self._avatar_speaking()
                    endpoint = self._endpointer.push(window, avatar_speaking=speaking)
                    await self._on(endpoint)
                if not self._endpointer.in_speech:
                    self._recording.keep_from(self._recording.end - self._lookback)
            await self._on(self._endpointer.flush())
        except Exception:
            log.exception("voice input failed")
            await self._emit(VoiceError("Voice input failed."))
        await self._utterances.put(_END)

    async def _on(self, endpoint: Endpoint | None) -> None:
        loop = asyncio.get_running_loop()
        match endpoint:
            case BargeIn(start=start):
                await self._emit(UserBargedIn(start / SAMPLE_RATE))
            case SpeechStart(start=start):
                await self._emit(UserStartedTalking(start / SAMPLE_RATE, loop.time()))
            case SpeechPause(start=start, end=end):
                self._drop_early()
                self._early = self._recognition(start, end)
            case SpeechEnd(start=start, end=end):
                behind = (self._recording.end - end) / SAMPLE_RATE
                await self._emit(UserStoppedTalking(endpoint.duration_ms, loop.time() - behind))
                early, self._early = self._early, None
                if early is not None and (early.start, early.end) == (start, end):
                    recognition = early  # the user said no more after the pause
                else:
                    if early is not None:
                        early.task.cancel()
                    recognition = self._recognition(start, end)
                await self._utterances.put(recognition)

    def _recognition(self, start: int, end: int) -> _Recognition:
        """Start transcribing the utterance [start, end) (with its pads)."""
        pcm = self._recording.slice(start - self._pad, end + self._pad)
        task = self._tasks.start(self._transcribe(pcm), "transcribe")
        return _Recognition(start, end, task)

    def _drop_early(self) -> None:
        """The user went on after a pause: that early transcription is of no use."""
        if self._early is not None:
            self._early.task.cancel()
            self._early = None

    async def _transcribe(self, pcm: np.ndarray) -> Transcript | VoiceError:
        started = asyncio.get_running_loop().time()
        try:
            text = await self._asr.transcribe(pcm, language=self._language)
        except ASRError as exc:
            return VoiceError(str(exc))
        except Exception:
            log.exception("speech recognition failed")
            return VoiceError("Speech recognition failed.")
        return Transcript(text, True, (asyncio.get_running_loop().time() - started) * 1000)

    async def _recognise(self) -> None:
        """Report recognitions in the order their utterances ended."""
        while (recognition := await self._utterances.get()) is not _END:
            assert isinstance(recognition, _Recognition)
            await self._emit(await recognition.task)
        await self._emit(_END)

    async def _emit(self, event: VoiceEvent | object) -> None:
        await self._events.put(event)
