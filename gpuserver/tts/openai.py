"""The `openai` TTS: any OpenAI-compatible `POST {base_url}/audio/speech` with a streamed body.

Works with OpenAI, Kokoro-FastAPI, openedai-speech and the like. `response_format` "pcm" is raw
s16le mono at `pcm_sample_rate` (24 kHz is OpenAI's and Kokoro's convention); "wav" is parsed
incrementally from its RIFF header, whose length fields are often bogus in streamed WAV, so the
data chunk simply runs to the end of the response. Audio is downmixed, resampled to 16 kHz
int16 as it arrives and yielded chunk by chunk.

Word timings. The speech API reports none, so `_WordPacer` estimates them: each word starts
after the characters before it (punctuation counting extra, for pauses) at an assumed
speaking rate scaled by `speed`, and is only emitted once that much audio exists. Words still
pending when the audio ends (the voice was faster than assumed) are spread evenly over the
final chunk; a short tail of audio is held back until the end so that final chunk exists.
The estimates feed `heard_text` on interrupt, where being off by a word is acceptable.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np
import soxr

from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.openai_compat import (
    PROBE_TIMEOUT_S,
    WaitBudget,
    bearer_headers,
    http_error,
    probe_models,
    transport_error,
)
from gpuserver.tts.base import SpeechChunk, TTSBackend, TTSError, Voice, VoiceNotFoundError, Word

log = logging.getLogger(__name__)

ResponseFormat = Literal["pcm", "wav"]

_SERVICE = "TTS server"
_DEFAULT_VOICE = "alloy"
# OpenAI's documented voices, shown when a server cannot list its own.
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
)  # fmt: skip
_CHARS_PER_SECOND = 14.0  # ~150 words per minute of English at speed 1.0
_PAUSE_CHARS = {",": 2, ";": 2, ":": 2, ".": 5, "!": 5, "?": 5}  # a pause, in characters' time
_HOLD_SAMPLES = SAMPLE_RATE // 5  # 200 ms kept back for the words that outlast the estimate
_MAX_WAV_HEADER = 1 << 20  # bogus chunk sizes must not make us buffer forever
_WAVE_PCM = 1
_WAVE_FLOAT = 3
_WAVE_EXTENSIBLE = 0xFFFE
_WORD = re.compile(r"\S+")


class OpenAITTS(TTSBackend):
    """Streams speech from an OpenAI-compatible server as 16 kHz mono int16 with estimated words.

    `timeout_s` bounds connecting and every wait for more audio; `total_timeout_s` bounds all
    the waiting for one synthesis (a server trickling bytes never hits `timeout_s`).
    `voice=None` means "alloy".
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        voice: str | None = None,
        api_key: str | None = None,
        speed: float = 1.0,
        response_format: ResponseFormat = "pcm",
        pcm_sample_rate: int = 24_000,
        timeout_s: float = 30.0,
        total_timeout_s: float = 60.0,
    ) -> None:
        if response_format not in ("pcm", "wav"):
            raise TTSError(f"Unsupported TTS response_format {response_format!r}: use pcm or wav.")
        self._base_url = base_url
        self._url = base_url.rstrip("/") + "/audio/speech"
        self._model = model
        self._voice = voice or _DEFAULT_VOICE
        self._speed = speed
        self._format: ResponseFormat = response_format
        self._pcm_rate = pcm_sample_rate
        self._timeout_s = timeout_s
        self._total_timeout_s = total_timeout_s
        self._client = httpx.AsyncClient(
            headers=bearer_headers(api_key), timeout=httpx.Timeout(timeout_s)
        )

    async def voices(self) -> list[Voice]:
        """The server's own list (`GET /audio/voices`, as Kokoro-FastAPI serves it), else
        OpenAI's documented voices."""
        listed = await self._listed_voices()
        return [Voice(name, name) for name in (listed or OPENAI_VOICES)]

    async def check_voice(self, voice: str) -> None:
        listed = await self._listed_voices()
        if listed and voice not in listed:
            raise VoiceNotFoundError(
                f"The {_SERVICE} has no voice {voice!r}; use one of: {', '.join(listed)}."
            )

    async def _listed_voices(self) -> list[str]:
        """The voices the server lists, or [] when it cannot say (no route, unreachable)."""
        try:
            response = await self._client.get(
                self._base_url.rstrip("/") + "/audio/voices", timeout=PROBE_TIMEOUT_S
            )
            voices = response.json().get("voices") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return []
        if not isinstance(voices, list):
            return []
        # Kokoro lists names; other servers list {"id"|"name": ...} objects.
        names = [v.get("id") or v.get("name") if isinstance(v, dict) else v for v in voices]
        return [name for name in names if isinstance(name, str) and name]

    async def synthesize(self, text: str, voice: str | None = None) -> AsyncIterator[SpeechChunk]:
        if not text.strip():
            return
        body = {
            "model": self._model,
            "input": text,
            "voice": voice or self._voice,
            "response_format": self._format,
            "speed": self._speed,
        }
        decoder = _PCMDecoder(self._pcm_rate) if self._format == "pcm" else _WavDecoder()
        assembler = _Assembler(decoder, _WordPacer(text, self._speed))
        budget = WaitBudget(self._total_timeout_s)
        request = self._client.build_request("POST", self._url, json=body)
        try:
            response = await budget.wait(self._client.send(request, stream=True))
            try:
                if (error := await budget.wait(http_error(_SERVICE, response))) is not None:
                    raise TTSError(error)
                async with aclosing(budget.iterate(response.aiter_bytes())) as pieces:
                    async for data in pieces:
                        if (chunk := assembler.feed(data)) is not None:
                            yield chunk
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise TTSError(transport_error(_SERVICE, self._url, exc, self._timeout_s)) from exc
        except TimeoutError:
            log.warning("the %s at %s ran past tts.total_timeout_s", _SERVICE, self._url)
            raise TTSError(
                f"The {_SERVICE} did not finish the speech within {budget.seconds:g} s."
            ) from None
        if (chunk := assembler.finish()) is not None:
            yield chunk

    async def probe(self) -> str | None:
        # No model check: speech servers often list only their chat models, or none.
        return await probe_models(self._client, self._base_url, _SERVICE)

    async def aclose(self) -> None:
        await self._client.aclose()


class _Frames:
    """Interleaved little-endian frames to float32 mono, keeping partial frames between calls."""

    def __init__(self, channels: int, dtype: np.dtype[Any], scale: float) -> None:
        self._channels = channels
        self._dtype = dtype
        self._scale = scale
        self._frame_bytes = channels * dtype.itemsize
        self._pending = b""

    def decode(self, data: bytes) -> np.ndarray:
        data = self._pending + data
        usable = len(data) - len(data) % self._frame_bytes
        self._pending = data[usable:]
        frames = np.frombuffer(data[:usable], dtype=self._dtype).reshape(-1, self._channels)
        mono = frames.mean(axis=1, dtype=np.float64) if self._channels > 1 else frames[:, 0]
        return (mono / self._scale).astype(np.float32)


_INT16 = (np.dtype("<i2"), 32768.0)
_FLOAT32 = (np.dtype("<f4"), 1.0)


class _PCMDecoder:
    """Raw s16le mono at a known rate."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate: int | None = sample_rate
        self._frames = _Frames(1, *_INT16)

    def decode(self, data: bytes) -> np.ndarray:
        return self._frames.decode(data)

    def finish(self) -> None:
        """Nothing can be left incomplete but half a sample, which is dropped."""


@dataclass(frozen=True)
class _WavFormat:
    sample_rate: int
    frames: _Frames


class _WavDecoder:
    """A streamed WAV: buffers until the data chunk starts, then decodes samples as they come."""

    def __init__(self) -> None:
        self.sample_rate: int | None = None
        self._header = b""
        self._frames: _Frames | None = None

    def decode(self, data: bytes) -> np.ndarray:
        if self._frames is None:
            self._header += data
            parsed = _parse_wav_header(self._header)
            if parsed is None:
                if len(self._header) > _MAX_WAV_HEADER:
                    raise TTSError(f"The {_SERVICE} sent a WAV header longer than 1 MiB.")
                return np.zeros(0, dtype=np.float32)
            wav, offset = parsed
            self.sample_rate, self._frames = wav.sample_rate, wav.frames
            data, self._header = self._header[offset:], b""
        return self._frames.decode(data)

    def finish(self) -> None:
        if self._frames is None and self._header:
            raise TTSError(f"The {_SERVICE} ended the response inside the WAV header.")


def _parse_wav_header(buffer: bytes) -> tuple[_WavFormat, int] | None:
    """The format and the offset of the sample data, or None until more bytes arrive.

    Only the fmt chunk's contents are trusted: RIFF and data sizes are ignored.
    """
    if len(buffer) < 12:
        return None
    if buffer[:4] != b"RIFF" or buffer[8:12] != b"WAVE":
        raise TTSError(f"The {_SERVICE} did not send WAV audio (response_format wav).")
    position, wav = 12, None
    while len(buffer) >= position + 8:
        chunk_id = buffer[position : position + 4]
        size = int.from_bytes(buffer[position + 4 : position + 8], "little")
        body = position + 8
        if chunk_id == b"data":
            if wav is None:
                raise TTSError(f"The {_SERVICE} sent WAV data before its format.")
            return wav, body
        if len(buffer) < body + size:
            return None
        if chunk_id == b"fmt ":
            wav = _parse_fmt(buffer[body : body + size])
        position = body + size + (size & 1)  # chunks are padded to even lengths
    return None


def _parse_fmt(fmt: bytes) -> _WavFormat:
    if len(fmt) < 16:
        raise TTSError(f"The {_SERVICE} sent a truncated WAV format chunk.")
    tag = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    sample_rate = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == _WAVE_EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the tag
    if channels < 1 or sample_rate < 1:
        raise TTSError(f"The {_SERVICE} sent WAV audio of {channels} channels at {sample_rate} Hz.")
    if (tag, bits) == (_WAVE_PCM, 16):
        return _WavFormat(sample_rate, _Frames(channels, *_INT16))
    if (tag, bits) == (_WAVE_FLOAT, 32):
        return _WavFormat(sample_rate, _Frames(channels, *_FLOAT32))
    raise TTSError(
        f"The {_SERVICE} sent WAV audio as format {tag} with {bits}-bit samples; "
        "only 16-bit PCM and 32-bit float are supported."
    )


class _WordPacer:
    """Estimated word starts (see the module doc), handed out as the audio reaches them."""

    def __init__(self, text: str, speed: float) -> None:
        samples_per_char = SAMPLE_RATE / (_CHARS_PER_SECOND * speed)
        self._pending: deque[Word] = deque()
        chars = 0
        for match in _WORD.finditer(text):
            word = match.group()
            self._pending.append(Word(word, round(chars * samples_per_char)))
            chars += len(word) + 1 + _PAUSE_CHARS.get(word[-1], 0)

    def take(self, start: int, end: int) -> list[Word]:
        """The words estimated to start before `end`, none before `start`."""
        words = []
        while self._pending and self._pending[0].start < end:
            word = self._pending.popleft()
            words.append(Word(word.text, max(word.start, start)))
        return words

    def take_rest(self, start: int, end: int) -> list[Word]:
        """Every remaining word within [start, end): the late ones spread evenly to the end."""
        words = self.take(start, end)
        floor = words[-1].start if words else start
        late = len(self._pending)
        for index in range(late):
            word = self._pending.popleft()
            words.append(Word(word.text, floor + (end - floor) * (index + 1) // (late + 1)))
        return words


class _Assembler:
    """Bytes of the response to 16 kHz SpeechChunks with words, holding back a short tail."""

    def __init__(self, decoder: _PCMDecoder | _WavDecoder, pacer: _WordPacer) -> None:
        self._decoder = decoder
        self._pacer = pacer
        self._resampler: soxr.ResampleStream | None = None
        self._pcm = np.zeros(0, dtype=PCM_DTYPE)  # resampled, not yet emitted
        self._emitted = 0  # samples emitted so far

    def feed(self, data: bytes) -> SpeechChunk | None:
        samples = self._decoder.decode(data)
        if self._resampler is None and self._decoder.sample_rate is not None:
            self._resampler = soxr.ResampleStream(
                self._decoder.sample_rate, SAMPLE_RATE, 1, dtype="float32"
            )
        if self._resampler is not None and len(samples):
            self._append(self._resampler.resample_chunk(samples))
        return self._take(len(self._pcm) - _HOLD_SAMPLES, final=False)

    def finish(self) -> SpeechChunk | None:
        self._decoder.finish()
        if self._resampler is not None:
            self._append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if self._emitted + len(self._pcm) == 0:
            log.warning("the %s returned no audio", _SERVICE)
        return self._take(len(self._pcm), final=True)

    def _append(self, samples: np.ndarray) -> None:
        if len(samples):
            pcm = np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(PCM_DTYPE)
            self._pcm = np.concatenate([self._pcm, pcm])

    def _take(self, count: int, *, final: bool) -> SpeechChunk | None:
        if count <= 0:
            return None
        start, end = self._emitted, self._emitted + count
        words = self._pacer.take_rest(start, end) if final else self._pacer.take(start, end)
        pcm, self._pcm = self._pcm[:count], self._pcm[count:]
        self._emitted = end
        return SpeechChunk(pcm=pcm, words=tuple(words))
