"""The default TTS backend: libespeak-ng 1.52 (from the `espeakng-loader` wheel) via ctypes.

Threading model. libespeak-ng is a process-global, non-thread-safe singleton, so one module-level
`_Engine` owns it together with a single-thread executor: every espeak call (initialize, voice,
rate, synth) runs on that one worker thread. In AUDIO_OUTPUT_SYNCHRONOUS mode `espeak_Synth`
runs a whole text on the worker, calling our synth callback with each ~100 ms buffer; the
callback resamples 22.05 kHz to 16 kHz, attaches word timings and hands finished chunks to
the consumer's event loop through a `_Handoff`. When the consumer stops iterating, the
handoff is cancelled and the callback returns 1, which makes espeak abort and reset.

Fairness. Every session shares that one thread, so an utterance is synthesized in pieces
(sentences, at most `MAX_PIECE_CHARS`), one `espeak_Synth` each, and the open utterances are
served a piece at a time in turns. An utterance whose consumer has `max_buffered_s` of audio
unread sits out until it reads on: a long answer never runs far ahead of its listener while
another session waits for its first words (espeak makes ~10 s of speech in ~40 ms here).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import re
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.tts.base import (
    SpeechChunk,
    TTSBackend,
    TTSError,
    Voice,
    VoiceNotFoundError,
    Word,
)

log = logging.getLogger(__name__)

# From speak_lib.h (espeak-ng 1.52, API revision 12).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it a missing data dir calls exit() in-process
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_PARAM_RATE = 1
_EE_OK = 0
_RATE_NORMAL = 175
_RATE_MIN = 80
_RATE_MAX = 450

_BUFFER_MS = 100  # espeak's callback buffer: small, so the first chunk comes early
_VOICE_NAME_MAX = 59  # espeak copies the name into a 60-byte buffer
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
MAX_PIECE_CHARS = 160  # ~11 s of English speech, ~40 ms of the espeak thread
_SENTENCE_END = re.compile(r"[.!?;:]+[\"')\]]*\s+|[。！？；]+")
_BREAK = re.compile(r"[,，、]\s*|\s+")


class _EventId(ctypes.Union):
    _fields_ = (
        ("number", ctypes.c_int),  # WORD and SENTENCE events
        ("name", ctypes.c_char_p),  # MARK and PLAY events
        ("string", ctypes.c_char * 8),  # PHONEME events
    )


class _Event(ctypes.Structure):
    """espeak_EVENT: 40 bytes on 64-bit, `id` at offset 32 after the pointer's padding."""

    _fields_ = (
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters (code points for UTF-8)
        ("length", ctypes.c_int),  # in characters
        ("audio_position", ctypes.c_int),  # ms from the start of this utterance's audio
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    )


class _Voice(ctypes.Structure):
    """espeak_VOICE. `languages` is a run of (priority byte, NUL-terminated code), then 0."""

    _fields_ = (
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),  # the voice file, e.g. b"gmw/en-US"
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    )


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

_END = object()  # the handoff's end-of-utterance marker


def _load_library() -> tuple[ctypes.CDLL, str]:
    """Load libespeak-ng from the espeakng-loader wheel and declare the functions we call."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise TTSError(
            "The espeak TTS needs libespeak-ng: `pip install espeakng-loader` "
            "(GPL-3.0, an optional dependency: `pip install 'gpuserver[espeak]'`)."
        ) from exc
    try:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data_path = espeakng_loader.get_data_path()
    except (OSError, RuntimeError) as exc:
        raise TTSError(f"Cannot load libespeak-ng from espeakng-loader: {exc}") from exc
    lib.espeak_Initialize.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = (_SynthCallback,)
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = (ctypes.c_char_p,)
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = (
        ctypes.c_char_p,  # text
        ctypes.c_size_t,  # size
        ctypes.c_uint,  # position
        ctypes.c_int,  # position_type
        ctypes.c_uint,  # end_position
        ctypes.c_uint,  # flags
        ctypes.c_void_p,  # unique_identifier
        ctypes.c_void_p,  # user_data
    )
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_ListVoices.argtypes = (ctypes.c_void_p,)
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    return lib, data_path


def _is_cjk(char: str) -> bool:
    return _CJK.match(char) is not None


def auto_voice(text: str) -> str:
    """The voice for `voice=None`: Mandarin (which also reads embedded English) for Chinese."""
    return "cmn" if _CJK.search(text) else "en-us"


def _rate_for(speed: float) -> int:
    if not math.isfinite(speed) or speed <= 0:
        raise TTSError(f"TTS speed must be a positive number, not {speed!r}.")
    rate = round(_RATE_NORMAL * speed)
    clamped = min(max(rate, _RATE_MIN), _RATE_MAX)
    if clamped != rate:
        log.warning("espeak rate %d wpm (speed %.2f) clamped to %d wpm", rate, speed, clamped)
    return clamped


def _encode_voice(voice: str) -> bytes:
    if not voice or len(voice) > _VOICE_NAME_MAX or not voice.isascii() or "\0" in voice:
        raise TTSError(f"Invalid espeak-ng voice name {voice!r}.")
    return voice.encode("ascii")


def split_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """`text` cut into consecutive pieces of whole sentences, each at most `max_chars` long
    where a sentence allows (a longer one is cut at a comma or space, else hard)."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        window = text[start : start + max_chars]
        cut = _last_end(_SENTENCE_END, window) or _last_end(_BREAK, window) or max_chars
        pieces.append(text[start : start + cut])
        start += cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _last_end(pattern: re.Pattern[str], window: str) -> int:
    """The end of the last match of `pattern` in `window` (0 if none)."""
    ends = [match.end() for match in pattern.finditer(window)]
    return ends[-1] if ends else 0


class _Handoff:
    """A bridge from the espeak worker thread to one consumer on its event loop.

    It counts the audio handed over but not yet read: the engine serves this consumer again
    only while that stays under `max_samples`, and `get` wakes the engine when it drops
    under. Handing over never blocks the worker; the event loop never blocks either.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_samples: int, wake: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._lock = threading.Lock()
        self._max_samples = max_samples
        self._wake = wake
        self._unread = 0
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def behind(self) -> bool:
        """True while the consumer has `max_samples` or more of audio to read."""
        return self._unread >= self._max_samples

    def put(self, chunk: SpeechChunk) -> bool:
        """Worker side: deliver a chunk. False if the consumer has gone."""
        if self._cancelled:
            return False
        with self._lock:
            self._unread += len(chunk.pcm)
        return self._send(chunk)

    def finish(self, error: TTSError | None) -> None:
        """Worker side: the last item."""
        self._send(_END if error is None else error)

    def cancel(self) -> None:
        """Either side: the consumer has gone."""
        self._cancelled = True
        self._wake()  # so the engine drops the utterance now

    async def get(self) -> Any:
        """Consumer side: the next SpeechChunk, TTSError or `_END`."""
        item = await self._queue.get()
        if isinstance(item, SpeechChunk):
            with self._lock:
                self._unread -= len(item.pcm)
            if not self.behind:
                self._wake()
        return item

    def _send(self, item: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody will read
            self._cancelled = True
            return False
        return True


@dataclass
class _OpenWord:
    """The latest word event: its text may run on until the next word starts."""

    begin: int  # 0-based character index into the text
    end: int  # begin + the length espeak reported
    start: int  # sample at 16 kHz


class _Assembler:
    """Turns espeak's 22.05 kHz buffers and word events into 16 kHz SpeechChunks.

    Chunks end where the latest word starts: that word's text is only known once the next
    word event arrives (espeak reports a Chinese word such as 你好 with length 1), and holding
    its audio keeps every Word in the chunk it starts in.
    """

    def __init__(self, text: str, in_rate: int, first_sample: int = 0) -> None:
        self._text = text
        self._resampler = soxr.ResampleStream(in_rate, SAMPLE_RATE, 1, dtype="int16")
        self._pcm = np.zeros(0, dtype=PCM_DTYPE)  # resampled, not yet emitted
        self._first_sample = first_sample  # where this text starts in the utterance
        self._emitted = first_sample  # samples emitted so far (utterance time)
        self._words: list[Word] = []  # complete words not yet emitted
        self._open: _OpenWord | None = None

    def add_word(self, text_position: int, length: int, audio_ms: int) -> None:
        begin = text_position - 1
        if not 0 <= begin < len(self._text):
            return
        if self._open is not None and begin < self._open.end:
            return  # a sub-word of a token espeak expanded, e.g. the "twenty" of "123"
        floor = self._open.start if self._open is not None else self._emitted
        start = max(self._first_sample + audio_ms * SAMPLE_RATE // 1000, floor)
        self._close_open_word(next_begin=begin)
        self._open = _OpenWord(begin, begin + max(length, 1), start)

    def add_audio(self, pcm: np.ndarray) -> SpeechChunk | None:
        self._append(self._resampler.resample_chunk(pcm))
        return self._take(hold_from=self._open.start if self._open is not None else None)

    @property
    def end(self) -> int:
        """The utterance sample after everything this assembler has taken in."""
        return self._emitted + len(self._pcm)

    def finish(self) -> SpeechChunk | None:
        self._append(self._resampler.resample_chunk(np.zeros(0, dtype=PCM_DTYPE), last=True))
        self._close_open_word(next_begin=len(self._text))
        total = self._emitted + len(self._pcm)
        if any(word.start >= total for word in self._words):
            log.debug("dropping word events past the end of the audio (%d samples)", total)
            self._words = [word for word in self._words if word.start < total]
        return self._take(hold_from=None)

    def _append(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self._pcm = np.concatenate([self._pcm, pcm])

    def _close_open_word(self, next_begin: int) -> None:
        word = self._open
        if word is None:
            return
        end = word.end
        while end < next_begin and _is_cjk(self._text[end]):
            end += 1
        self._words.append(Word(self._text[word.begin : end], word.start))
        self._open = None

    def _take(self, hold_from: int | None) -> SpeechChunk | None:
        end = self._emitted + len(self._pcm)
        if hold_from is not None:
            end = min(end, hold_from)
        count = end - self._emitted
        if count <= 0:
            return None
        words = tuple(word for word in self._words if word.start < end)
        self._words = self._words[len(words) :]
        pcm, self._pcm = self._pcm[:count], self._pcm[count:]
        self._emitted = end
        return SpeechChunk(pcm=pcm, words=words)


@dataclass(eq=False)
class _Utterance:
    pieces: deque[str]  # still to synthesize, in order
    voice: str
    rate: int
    handoff: _Handoff
    samples: int = 0  # synthesized so far: where the next piece starts
    assembler: _Assembler | None = field(default=None, repr=False)  # of the piece in progress
    error: BaseException | None = None  # raised in the callback, re-raised after the synth


class _Engine:
    """The process's one libespeak-ng and the one thread allowed to call it.

    Open utterances wait in `_open`; the worker takes one piece of the first that may go
    (its consumer is not behind), moves it to the back, and comes back for the next piece
    as a new job, so voice checks and every session get their turn.
    """

    def __init__(self) -> None:
        self._lib, data_path = _load_library()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak-ng")
        self._callback = _SynthCallback(self._on_synth)  # kept alive as long as espeak uses it
        self._voice: str | None = None  # the voice espeak has loaded
        self._job: _Utterance | None = None
        self._lock = threading.Lock()  # guards _open and _serving
        self._open: deque[_Utterance] = deque()
        self._serving = False  # a piece job is queued or running
        self.synthesizing = False  # True while espeak_Synth runs (for tests and diagnostics)
        self.aborted_utterances = 0  # utterances cut short because their consumer went away
        try:
            self._sample_rate = self._executor.submit(self._initialize, data_path).result()
        except BaseException:
            self._executor.shutdown(wait=False)  # no engine, so no worker either
            raise

    def check_voice(self, voice: str) -> Future[None]:
        """Fails with VoiceNotFoundError, listing the voices, if espeak does not know `voice`.

        espeak resolves voice ids, names and variants ("en-us+f3") itself, so it is asked
        rather than the list (the check waits for the utterance in progress)."""
        return self._executor.submit(self._check_voice, voice)

    def voices(self) -> Future[list[Voice]]:
        return self._executor.submit(self._list_voices)

    def open(self, utterance: _Utterance) -> None:
        with self._lock:
            self._open.append(utterance)
        self.wake()

    def wake(self) -> None:
        """Any thread: make sure a piece job runs if an utterance may go on."""
        with self._lock:
            if self._serving or not any(self._ready(u) for u in self._open):
                return
            self._serving = True
        self._executor.submit(self._serve_one)

    @property
    def pending_pieces(self) -> int:
        """Pieces of open utterances not synthesized yet (for tests and diagnostics)."""
        with self._lock:
            return sum(len(u.pieces) for u in self._open)

    @staticmethod
    def _ready(utterance: _Utterance) -> bool:
        handoff = utterance.handoff
        return handoff.cancelled or not handoff.behind

    # Everything below runs on the worker thread.

    def _initialize(self, data_path: str) -> int:
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data_path.encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise TTSError(f"libespeak-ng failed to initialize with data at {data_path}.")
        self._lib.espeak_SetSynthCallback(self._callback)
        log.debug("libespeak-ng initialized: %d Hz, data %s", rate, data_path)
        return rate

    def _check_voice(self, voice: str) -> None:
        try:
            self._select_voice(voice)
        except TTSError:
            ids = ", ".join(v.id for v in self._list_voices())
            raise VoiceNotFoundError(
                f"Unknown espeak-ng voice {voice!r}; use one of: {ids} "
                "(`gpuserver voices` shows their names)."
            ) from None

    def _list_voices(self) -> list[Voice]:
        """Every installed voice; its id is the voice file's name ("en-us", "cmn", "fr")."""
        found = []
        entries = self._lib.espeak_ListVoices(None)
        index = 0
        while entries[index]:
            entry = entries[index].contents
            identifier = (entry.identifier or b"").decode("utf-8", "replace")
            name = (entry.name or b"").decode("utf-8", "replace")
            found.append(Voice(identifier.rsplit("/", 1)[-1].lower(), name, _first_language(entry)))
            index += 1
        return found

    def _select_voice(self, voice: str) -> None:
        if voice == self._voice:
            return
        self._voice = None  # a failed load may leave espeak's voice half-changed
        if self._lib.espeak_SetVoiceByName(_encode_voice(voice)) != _EE_OK:
            raise TTSError(f"Unknown espeak-ng voice {voice!r} (try e.g. 'en-us', 'cmn', 'de').")
        self._voice = voice

    def _serve_one(self) -> None:
        """One piece of the next utterance in turn, then the next job (if any may go)."""
        with self._lock:
            utterance = next((u for u in self._open if self._ready(u)), None)
            if utterance is not None:
                self._open.remove(utterance)
                self._open.append(utterance)  # to the back of the line
        try:
            if utterance is not None:
                self._speak_piece(utterance)
        finally:
            with self._lock:
                self._serving = False
            self.wake()

    def _speak_piece(self, utterance: _Utterance) -> None:
        error: TTSError | None = None
        try:
            if not utterance.handoff.cancelled:
                self._synthesize(utterance, utterance.pieces.popleft())
        except TTSError as exc:
            error = exc
        except Exception:
            log.exception("espeak-ng synthesis failed")
            error = TTSError("espeak-ng synthesis failed.")
        cancelled = utterance.handoff.cancelled
        if cancelled or error is not None or not utterance.pieces:
            with self._lock:
                self._open.remove(utterance)
            if cancelled and error is None:
                self.aborted_utterances += 1
            utterance.handoff.finish(error)

    def _synthesize(self, utterance: _Utterance, text: str) -> None:
        self._select_voice(utterance.voice)
        self._lib.espeak_SetParameter(_PARAM_RATE, utterance.rate, 0)
        assembler = _Assembler(text, self._sample_rate, utterance.samples)
        utterance.assembler = assembler
        # Both replacements keep one character per character, so word positions stay valid.
        data = text.replace("\0", " ").encode("utf-8", errors="replace")
        self._job, self.synthesizing = utterance, True
        try:
            status = self._lib.espeak_Synth(
                data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
        finally:
            self._job, self.synthesizing = None, False
        if utterance.error is not None:
            raise utterance.error
        if utterance.handoff.cancelled:
            return
        if status != _EE_OK:
            raise TTSError(f"espeak-ng could not synthesize the text (status {status}).")
        tail = assembler.finish()
        if tail is not None:
            utterance.handoff.put(tail)
        utterance.samples = assembler.end

    def _on_synth(
        self,
        wav: ctypes._Pointer[ctypes.c_short],
        count: int,
        events: ctypes._Pointer[_Event],
    ) -> int:
        """espeak's synth callback: 0 continues, 1 aborts. It must never raise into C."""
        job = self._job
        if job is None or job.assembler is None or job.handoff.cancelled:
            return 1
        try:
            self._read_events(job.assembler, events)
            if count > 0 and wav:
                # soxr copies what it reads, so a view of espeak's reused buffer is enough.
                chunk = job.assembler.add_audio(np.ctypeslib.as_array(wav, shape=(count,)))
                if chunk is not None and not job.handoff.put(chunk):
                    return 1
        except Exception as exc:
            job.error = exc
            return 1
        return 0

    @staticmethod
    def _read_events(assembler: _Assembler, events: ctypes._Pointer[_Event]) -> None:
        if not events:
            return
        index = 0
        while (event := events[index]).type != _EVENT_LIST_TERMINATED:
            if event.type == _EVENT_WORD:
                assembler.add_word(event.text_position, event.length, event.audio_position)
            index += 1


def _first_language(voice: _Voice) -> str | None:
    """The voice's main language code (the first of its languages)."""
    if not voice.languages or ctypes.c_ubyte.from_address(voice.languages).value == 0:
        return None
    return ctypes.string_at(voice.languages + 1).decode("ascii", "replace")


_engine: _Engine | None = None
_engine_lock = threading.Lock()


def _get_engine() -> _Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _Engine()
        return _engine


class EspeakTTS(TTSBackend):
    """espeak-ng speech, streamed as 16 kHz mono int16 with per-word timings.

    `voice=None` picks "cmn" for text with Chinese characters, else "en-us". `speed` scales
    espeak's default 175 words per minute. Once `max_buffered_s` of audio waits unread,
    this utterance sits out (others are served) until its consumer reads on.
    """

    name = "espeak"

    def __init__(
        self, voice: str | None = None, speed: float = 1.0, *, max_buffered_s: float = 2.0
    ) -> None:
        self._rate = _rate_for(speed)
        self._max_samples = max(1, int(max_buffered_s * SAMPLE_RATE))
        self._engine = _get_engine()
        if voice is not None:
            self._engine.check_voice(voice).result()
        self._voice = voice

    async def voices(self) -> list[Voice]:
        return await asyncio.wrap_future(self._engine.voices())

    async def check_voice(self, voice: str) -> None:
        await asyncio.wrap_future(self._engine.check_voice(voice))

    async def synthesize(self, text: str, voice: str | None = None) -> AsyncIterator[SpeechChunk]:
        if not text.strip():
            return
        handoff = _Handoff(asyncio.get_running_loop(), self._max_samples, self._engine.wake)
        voice = voice or self._voice or auto_voice(text)
        self._engine.open(_Utterance(deque(split_pieces(text)), voice, self._rate, handoff))
        try:
            while (item := await handoff.get()) is not _END:
                if isinstance(item, TTSError):
                    raise item
                yield item
        finally:
            handoff.cancel()  # a no-op after the end; otherwise makes espeak abort
