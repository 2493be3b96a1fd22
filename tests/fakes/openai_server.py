"""A fake OpenAI-compatible server: `/v1/chat/completions` (SSE), `/v1/audio/speech`,
`/v1/audio/transcriptions` and `/v1/models`.

It runs with uvicorn on 127.0.0.1 in a background thread (`run_fake_openai`). The request's
`model` picks the scenario (see CHAT_SCENARIOS and SPEECH_SCENARIOS); knobs and observations
live on the `FakeOpenAI` object shared with the test. Responses are written in small pieces
with pauses, so clients really see a stream.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import socket
import threading
import time
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

ANSWER_PIECES = ("Hello", " there", "!", " Ünïcödé", " 你好", " line\u2028sep", " works", ".")
ANSWER = "".join(ANSWER_PIECES)
API_KEY = "sk-test-key"
# Three sentences, streamed word by word `token_delay_s` apart (latency benchmarks, e2e).
STORY = (
    "Good morning, it is a pleasure to meet you today. "
    "I can answer questions about our products and help you place an order. "
    "What would you like to know first?"
)

# An upstream error whose text tries to forge a log line of ours.
FORGED_ERROR = "Model melted\n2026-01-01 00:00:00,000 ERROR   gpuserver.session [-] forged line"

CHAT_SCENARIOS = {
    "chat": "the answer with keep-alives, empty choices, null content, CRLF and multi-line data",
    "auth": "401 unless the Bearer token is API_KEY, else like chat",
    "slow": "endless tokens, `token_delay_s` apart; notes a client disconnect",
    "story": "STORY word by word, `token_delay_s` apart (the first after `first_token_delay_s` "
    "when set)",
    "error500": "HTTP 500 with an OpenAI-style JSON error",
    "drop": "two tokens, then the connection is cut",
    "truncated": "two tokens, then a clean end without [DONE] or finish_reason",
    "no-done": "the answer and a finish_reason, then a clean end without [DONE]",
    "bad-json": "a chunk that is not JSON",
    "stream-error": "a token, then an in-stream error object",
    "keepalive": "the role, then `: ping` keep-alives `token_delay_s` apart, never an answer",
    "error-newline": "HTTP 500 whose error message is FORGED_ERROR",
}
SPEECH_SCENARIOS = {
    "tts": "a sine tone, 0.25 s per input word, as pcm or wav per response_format",
    "bursts": "per input word a `burst_s` tone then silence up to `seconds_per_word` (lip-sync "
    "clapperboard); streaming pauses `stall_s` once `stall_after_s` of audio was sent",
    "gated": "like tts, but the second half waits for `release`; notes a client disconnect",
    "error500": "HTTP 500 with an OpenAI-style JSON error",
    "trickle": "two bytes of silence `token_delay_s` apart, forever",
    "error-newline": "HTTP 500 whose error message is FORGED_ERROR",
}

TRANSCRIPT = "What is the capital of France?"


class _CutConnection(Exception):
    """Raised inside a streaming body: uvicorn then drops the connection mid-response."""


@dataclass(frozen=True)
class Transcription:
    """One WAV upload to /audio/transcriptions, as the fake read it."""

    model: str
    language: str | None
    sample_rate: int
    channels: int
    sample_width: int
    pcm: np.ndarray  # the data chunk read as int16 (the samples, for a 16-bit upload)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.channels / self.sample_rate


@dataclass
class FakeOpenAI:
    """Scenario knobs and what the server saw; shared between the test and the server thread."""

    token_delay_s: float = 0.02
    first_token_delay_s: float | None = None
    chunk_delay_s: float = 0.002
    chunk_bytes: int = 1001  # odd, so pieces split samples and header fields
    tone_hz: float = 440.0
    tone_amplitude: float = 0.5
    seconds_per_word: float = 0.25
    burst_s: float = 0.16
    stall_after_s: float | None = None
    stall_s: float = 0.0
    pcm_rate: int = 24_000
    wav_rate: int = 22_050
    wav_channels: int = 2
    wav_float: bool = False
    base_url: str = ""
    # What GET /v1/models lists: every chat scenario unless set.
    models: list[str] = field(default_factory=lambda: list(CHAT_SCENARIOS))
    # What GET /v1/audio/voices lists (Kokoro-FastAPI's route); None: 404 like OpenAI.
    voices: list[str] | None = None
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    speech_done: threading.Event = field(default_factory=threading.Event)
    tokens_sent: int = 0
    model_listings: int = 0  # GET /v1/models requests (kept out of `requests`)
    # /audio/transcriptions: `transcript` after `transcribe_delay_s`; the next
    # `fail_transcriptions` requests answer HTTP 500 instead.
    transcript: str = TRANSCRIPT
    transcribe_delay_s: float = 0.0
    fail_transcriptions: int = 0
    transcriptions: list[Transcription] = field(default_factory=list)

    def tone(self, text: str, rate: int) -> np.ndarray:
        """The float tone the server speaks for `text` at `rate`."""
        seconds = len(text.split()) * self.seconds_per_word
        t = np.arange(round(seconds * rate)) / rate
        return self.tone_amplitude * np.sin(2 * math.pi * self.tone_hz * t)

    def bursts(self, text: str, rate: int) -> np.ndarray:
        """One `burst_s` tone at the start of each word's `seconds_per_word`."""
        word = np.zeros(round(self.seconds_per_word * rate))
        t = np.arange(round(self.burst_s * rate)) / rate
        word[: len(t)] = self.tone_amplitude * np.sin(2 * math.pi * self.tone_hz * t)
        return np.tile(word, len(text.split()))


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}


def _event(payload: dict[str, Any] | str, eol: str = "\n") -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}{eol}{eol}"


def _answer_events(finish: bool = True, done: bool = True) -> list[str]:
    events = [": connected", "\n\n", "retry: 3000\n\n"]
    events.append(_event(_chunk({"role": "assistant"}), "\r\n"))  # role only
    events.append(_event(_chunk({"role": "assistant", "content": None})))
    events.append(_event({"id": "chatcmpl-1", "choices": []}))
    for index, piece in enumerate(ANSWER_PIECES):
        if index == 2:
            events.append(": ping\r\n\r\n")
            # One JSON object over two data lines, with other fields around them.
            body = json.dumps(_chunk({"content": piece}))
            head, tail = body.split('"choices":')
            events.append(f'event: message\nid: 7\ndata: {head}"choices":\ndata: {tail}\n\n')
        else:
            events.append(_event(_chunk({"content": piece}), "\r\n" if index % 2 else "\n"))
    if finish:
        events.append(_event(_chunk({}, finish_reason="stop")))
        usage = {"prompt_tokens": 5, "completion_tokens": len(ANSWER_PIECES)}
        events.append(_event({"id": "chatcmpl-1", "choices": [], "usage": usage}))
    if done:
        events.append("data: [DONE]\n\n")
    return events


def _odd_pieces(text: str, size: int = 7) -> list[bytes]:
    """The stream cut every few bytes: lines, CRLFs and UTF-8 characters get split."""
    data = text.encode()
    return [data[i : i + size] for i in range(0, len(data), size)]


class _Server:
    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.fake.requests.append((request.url.path, dict(request.headers), body))
        scenario = body.get("model")
        if scenario == "error500":
            error = {"message": "The model crashed", "type": "server_error"}
            return JSONResponse({"error": error}, status_code=500)
        if scenario == "error-newline":
            return JSONResponse({"error": {"message": FORGED_ERROR}}, status_code=500)
        if scenario == "auth" and request.headers.get("authorization") != f"Bearer {API_KEY}":
            error = {"message": "Incorrect API key provided", "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=401)
        streams = {
            "chat": self._pieces(_answer_events()),
            "auth": self._pieces(_answer_events()),
            "no-done": self._pieces(_answer_events(done=False)),
            "slow": self._slow(),
            "keepalive": self._forever(_event(_chunk({"role": "assistant"})), ": ping\n\n"),
            "story": self._story(),
            "drop": self._cut_after_two(),
            "truncated": self._pieces(_answer_events(finish=False, done=False)[:8]),
            "bad-json": self._pieces([_event(_chunk({"content": "Hi"})), "data: {oops\n\n"]),
            "stream-error": self._pieces(
                [_event(_chunk({"content": "Hi"})), _event({"error": {"message": "Overloaded"}})]
            ),
        }
        if scenario not in streams:
            return JSONResponse({"error": {"message": f"no scenario {scenario}"}}, 404)
        return StreamingResponse(streams[scenario], media_type="text/event-stream")

    async def _pieces(self, events: list[str]) -> AsyncIterator[bytes]:
        for piece in _odd_pieces("".join(events)):
            yield piece
            await asyncio.sleep(0.001)

    async def _slow(self) -> AsyncIterator[bytes]:
        completed = False
        try:
            yield _event(_chunk({"role": "assistant"})).encode()
            for index in range(10_000):
                await asyncio.sleep(self.fake.token_delay_s)
                self.fake.tokens_sent += 1
                yield _event(_chunk({"content": f" word{index}"})).encode()
            completed = True
        finally:
            if not completed:
                self.fake.disconnected.set()

    async def _forever(self, first: str, again: str | bytes) -> AsyncIterator[bytes]:
        """`first`, then `again` every `token_delay_s` until the client goes away."""
        again = again.encode() if isinstance(again, str) else again
        try:
            yield first.encode()
            while True:
                await asyncio.sleep(self.fake.token_delay_s)
                yield again
        finally:
            self.fake.disconnected.set()

    async def _story(self) -> AsyncIterator[bytes]:
        yield _event(_chunk({"role": "assistant"})).encode()
        for index, word in enumerate(STORY.split(" ")):
            first = index == 0 and self.fake.first_token_delay_s is not None
            await asyncio.sleep(self.fake.first_token_delay_s if first else self.fake.token_delay_s)
            yield _event(_chunk({"content": word + " "})).encode()
        yield _event(_chunk({}, finish_reason="stop")).encode()
        yield b"data: [DONE]\n\n"

    async def _cut_after_two(self) -> AsyncIterator[bytes]:
        for piece in ANSWER_PIECES[:2]:
            yield _event(_chunk({"content": piece})).encode()
            await asyncio.sleep(0.01)
        raise _CutConnection

    async def voices(self, request: Request) -> Response:
        if self.fake.voices is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse({"voices": self.fake.voices})

    async def models(self, request: Request) -> Response:
        self.fake.model_listings += 1
        listing = [{"id": name, "object": "model", "owned_by": "fake"} for name in self.fake.models]
        return JSONResponse({"object": "list", "data": listing})

    async def speech(self, request: Request) -> Response:
        body = await request.json()
        self.fake.requests.append((request.url.path, dict(request.headers), body))
        scenario = body.get("model")
        if scenario == "error500":
            return JSONResponse({"error": {"message": "Voice not loaded"}}, status_code=500)
        if scenario == "error-newline":
            return JSONResponse({"error": {"message": FORGED_ERROR}}, status_code=500)
        if scenario == "trickle":
            return StreamingResponse(self._forever("", b"\0\0"), media_type="audio/pcm")
        audio_format = body.get("response_format", "mp3")
        if scenario == "bursts" and audio_format == "pcm":
            samples = self.fake.bursts(body["input"], self.fake.pcm_rate)
            stall_at = self.fake.stall_after_s
            stall_byte = None if stall_at is None else round(stall_at * self.fake.pcm_rate) * 2
            pcm = (samples * 32767).astype("<i2").tobytes()
            return StreamingResponse(self._audio(pcm, stall_at=stall_byte), media_type="audio/pcm")
        if audio_format == "pcm":
            audio, media_type = self._pcm(body["input"]), "audio/pcm"
        elif audio_format == "wav":
            audio, media_type = self._wav(body["input"]), "audio/wav"
        else:
            return JSONResponse({"error": {"message": f"no format {audio_format}"}}, 400)
        stream = self._audio(audio, gated=scenario == "gated")
        return StreamingResponse(stream, media_type=media_type)

    def _pcm(self, text: str) -> bytes:
        tone = self.fake.tone(text, self.fake.pcm_rate)
        return (tone * 32767).astype("<i2").tobytes()

    def _wav(self, text: str) -> bytes:
        """A streamed-style WAV: bogus RIFF/data sizes and an extra chunk before `fmt `."""
        fake = self.fake
        tone = np.repeat(fake.tone(text, fake.wav_rate)[:, None], fake.wav_channels, axis=1)
        samples = tone.astype("<f4") if fake.wav_float else (tone * 32767).astype("<i2")
        width = samples.itemsize
        fmt = b"".join(
            [
                (3 if fake.wav_float else 1).to_bytes(2, "little"),
                fake.wav_channels.to_bytes(2, "little"),
                fake.wav_rate.to_bytes(4, "little"),
                (fake.wav_rate * fake.wav_channels * width).to_bytes(4, "little"),
                (fake.wav_channels * width).to_bytes(2, "little"),
                (8 * width).to_bytes(2, "little"),
            ]
        )
        bogus = (0xFFFFFFFF).to_bytes(4, "little")
        info = b"INFOISFT\x05\x00\x00\x00fake\x00\x00"  # odd-sized: padded to even
        return b"".join(
            [
                b"RIFF" + bogus + b"WAVE",
                b"LIST" + len(info).to_bytes(4, "little") + info,
                b"fmt " + len(fmt).to_bytes(4, "little") + fmt,
                b"data" + bogus,
                samples.tobytes(),
            ]
        )

    async def _audio(
        self, audio: bytes, *, gated: bool = False, stall_at: int | None = None
    ) -> AsyncIterator[bytes]:
        size, half = self.fake.chunk_bytes, len(audio) // 2
        completed = False
        try:
            for offset in range(0, len(audio), size):
                # Polled: `release` is a threading.Event, set from the test's thread.
                while gated and offset >= half and not self.fake.release.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                if stall_at is not None and offset >= stall_at:
                    stall_at = None
                    await asyncio.sleep(self.fake.stall_s)
                yield audio[offset : offset + size]
                await asyncio.sleep(self.fake.chunk_delay_s)
            completed = True
            self.fake.speech_done.set()
        finally:
            if not completed:
                self.fake.disconnected.set()

    async def transcription(self, request: Request) -> Response:
        """Accepts 16 kHz mono 16-bit WAV only (what our client must send); 400 otherwise."""
        form = await request.form()
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        self.fake.requests.append((request.url.path, dict(request.headers), fields))
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return JSONResponse({"error": {"message": "the form has no `file`"}}, 400)
        try:
            with wave.open(io.BytesIO(await upload.read())) as wav:
                heard = Transcription(
                    model=fields.get("model", ""),
                    language=fields.get("language"),
                    sample_rate=wav.getframerate(),
                    channels=wav.getnchannels(),
                    sample_width=wav.getsampwidth(),
                    pcm=np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2"),
                )
        except (wave.Error, EOFError) as exc:
            return JSONResponse({"error": {"message": f"not a WAV file: {exc}"}}, 400)
        self.fake.transcriptions.append(heard)
        if (heard.sample_rate, heard.channels, heard.sample_width) != (16_000, 1, 2):
            return JSONResponse({"error": {"message": "expected 16 kHz mono 16-bit WAV"}}, 400)
        await asyncio.sleep(self.fake.transcribe_delay_s)
        if self.fake.fail_transcriptions > 0:
            self.fake.fail_transcriptions -= 1
            return JSONResponse({"error": {"message": "The model crashed"}}, status_code=500)
        if fields.get("response_format") == "text":
            return PlainTextResponse(self.fake.transcript + "\n")
        return JSONResponse({"text": self.fake.transcript})


def create_app(fake: FakeOpenAI) -> Starlette:
    server = _Server(fake)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/audio/speech", server.speech, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/v1/audio/voices", server.voices, methods=["GET"]),
            Route("/v1/audio/transcriptions", server.transcription, methods=["POST"]),
        ]
    )


def refused_base_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@contextmanager
def run_fake_openai(fake: FakeOpenAI | None = None, port: int = 0) -> Iterator[FakeOpenAI]:
    """Serve a FakeOpenAI on 127.0.0.1 (`port`, or a free one) for the duration of the block."""
    fake = fake or FakeOpenAI()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(
        create_app(fake),
        log_level="critical",  # the cut-connection scenario makes uvicorn log an exception
        lifespan="off",
        loop="asyncio",
        http="h11",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake OpenAI server did not start")
        time.sleep(0.01)
    fake.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def main() -> None:
    """Serve a fake on 127.0.0.1 from the command line (e.g. inside a network namespace,
    where a browser test's server can reach it): `python -m tests.fakes.openai_server`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transcript", default=TRANSCRIPT, help="what transcriptions say")
    args = parser.parse_args()
    with run_fake_openai(FakeOpenAI(transcript=args.transcript), port=args.port):
        threading.Event().wait()  # until the process is stopped


if __name__ == "__main__":
    main()
