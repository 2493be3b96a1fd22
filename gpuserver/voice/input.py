"""Voice input of one session: mic track -> 16 kHz -> VAD -> endpointing -> ASR -> events.

Two tasks, both owned here (`aclose` cancels and awaits them):
- the listener reads the track, runs each chunk through the stream's VAD (on the VAD thread)
  and the endpointer, keeps the audio an utterance may still need, reports the start and the
  end of speech at once, and queues each finished utterance for recognition;
- the recogniser transcribes utterances one at a time, in order, while listening goes on.
Queues are bounded: at most `max_pending` utterances wait for the recogniser and `max_events`
events for the consumer; a full queue makes its producer wait, so nothing is dropped.

Per utterance the events are SpeechStarted, then SpeechStopped, then one final Transcript
(text "" when nothing was recognised) or a VoiceError when recognition failed; the next
utterance's events may come before the previous one's transcript. Events end when the track
ends (after the last transcript) or at `aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from aiortc.mediastreams import MediaStreamTrack

from gpuserver.asr.base import ASRBackend, ASRError
from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.voice.endpointing import EndpointConfig, Endpointer, SpeechEnd, SpeechStart
from gpuserver.voice.mic import mic_pcm
from gpuserver.voice.vad import WINDOW_MS, WINDOW_SAMPLES, SileroVAD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechStarted:
    """The user started speaking `t` seconds into the mic stream (detected at `detected_at`,
    loop time, `min_speech_ms` of voice later)."""

    t: float
    detected_at: float


@dataclass(frozen=True)
class SpeechStopped:
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


VoiceEvent = SpeechStarted | SpeechStopped | Transcript | VoiceError

_END = object()


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

    Set `avatar_speaking` while the avatar's voice plays (it arms the echo guard). `language`
    overrides the recogniser's configured one. Call `start()` inside the event loop,
    `aclose()` when done.
    """

    def __init__(
        self,
        track: MediaStreamTrack,
        *,
        asr: ASRBackend,
        vad: SileroVAD,
        config: EndpointConfig,
        language: str | None = None,
        max_pending: int = 2,
        max_events: int = 32,
    ) -> None:
        self.avatar_speaking = False
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
        self._utterances: asyncio.Queue[np.ndarray | object] = asyncio.Queue(max_pending)
        self._events: asyncio.Queue[VoiceEvent | object] = asyncio.Queue(max_events)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._listen(), name="voice-listen"),
            asyncio.create_task(self._recognise(), name="voice-recognise"),
        ]

    async def events(self) -> AsyncIterator[VoiceEvent]:
        """The events, in order, until the track ends or `aclose()`; iterate it once."""
        while (event := await self._events.get()) is not _END:
            assert isinstance(event, VoiceEvent)
            yield event

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._events.empty():  # whatever was not read is moot now
            self._events.get_nowait()
        self._events.put_nowait(_END)

    async def _listen(self) -> None:
        try:
            async for pcm in mic_pcm(self._track):
                self._recording.append(pcm)
                for window in await self._vad.process(pcm):
                    endpoint = self._endpointer.push(window, avatar_speaking=self.avatar_speaking)
                    await self._on(endpoint)
                if not self._endpointer.in_speech:
                    self._recording.keep_from(self._recording.end - self._lookback)
            await self._on(self._endpointer.flush())
        except Exception:
            log.exception("voice input failed")
            await self._emit(VoiceError("Voice input failed."))
        await self._utterances.put(_END)

    async def _on(self, endpoint: SpeechStart | SpeechEnd | None) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(endpoint, SpeechStart):
            await self._emit(SpeechStarted(endpoint.start / SAMPLE_RATE, loop.time()))
        elif isinstance(endpoint, SpeechEnd):
            behind = (self._recording.end - endpoint.end) / SAMPLE_RATE
            await self._emit(SpeechStopped(endpoint.duration_ms, loop.time() - behind))
            utterance = self._recording.slice(endpoint.start - self._pad, endpoint.end + self._pad)
            await self._utterances.put(utterance)

    async def _recognise(self) -> None:
        loop = asyncio.get_running_loop()
        while (utterance := await self._utterances.get()) is not _END:
            assert isinstance(utterance, np.ndarray)
            started = loop.time()
            try:
                text = await self._asr.transcribe(utterance, language=self._language)
            except ASRError as exc:
                await self._emit(VoiceError(str(exc)))
                continue
            except Exception:
                log.exception("speech recognition failed")
                await self._emit(VoiceError("Speech recognition failed."))
                continue
            await self._emit(Transcript(text, True, (loop.time() - started) * 1000))
        await self._emit(_END)

    async def _emit(self, event: VoiceEvent | object) -> None:
        await self._events.put(event)
