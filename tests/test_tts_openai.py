"""The `openai` TTS against a fake OpenAI-compatible speech server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import pytest

from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.tts.base import SpeechChunk, TTSError
from gpuserver.tts.openai import OpenAITTS, _WavDecoder
from tests.fakes.openai_server import (
    API_KEY,
    FakeOpenAI,
    refused_base_url,
    run_fake_openai,
)

MakeTTS = Callable[..., OpenAITTS]
TEXT = "Hello there, this is a tone. It stands in for speech here."  # 12 words: 3 s


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with run_fake_openai() as running:
        yield running


@pytest.fixture
async def make_tts(fake: FakeOpenAI) -> AsyncIterator[MakeTTS]:
    created: list[OpenAITTS] = []

    def make(model: str = "tts", **options: Any) -> OpenAITTS:
        tts = OpenAITTS(fake.base_url, model, **options)
        created.append(tts)
        return tts

    yield make
    for tts in created:
        await tts.aclose()


async def collect(tts: OpenAITTS, text: str = TEXT) -> list[SpeechChunk]:
    return [chunk async for chunk in tts.synthesize(text)]


def joined(chunks: list[SpeechChunk]) -> np.ndarray:
    return np.concatenate([chunk.pcm for chunk in chunks])


def dominant_hz(pcm: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / SAMPLE_RATE)[spectrum.argmax()])


async def wait_for(event: threading.Event, timeout: float = 10.0) -> bool:
    """Wait (off the loop) for an event set by the fake server's thread."""
    return await asyncio.to_thread(event.wait, timeout)


@pytest.mark.parametrize(
    ("response_format", "server"),
    [
        ("pcm", {"pcm_rate": 24_000}),
        ("pcm", {"pcm_rate": 22_050}),
        ("wav", {"wav_rate": 22_050, "wav_channels": 2}),
        ("wav", {"wav_rate": 44_100, "wav_channels": 1, "wav_float": True}),
        ("wav", {"wav_rate": 16_000, "wav_channels": 1}),
    ],
)
async def test_audio_comes_out_as_16khz_int16_of_the_right_tone_and_duration(
    make_tts: MakeTTS, fake: FakeOpenAI, response_format: str, server: dict[str, Any]
) -> None:
    for name, value in server.items():
        setattr(fake, name, value)
    tts = make_tts(response_format=response_format, pcm_sample_rate=fake.pcm_rate)
    chunks = await collect(tts)
    assert all(chunk.pcm.dtype == PCM_DTYPE and chunk.pcm.ndim == 1 for chunk in chunks)
    pcm = joined(chunks)
    assert len(pcm) == pytest.approx(3.0 * SAMPLE_RATE, rel=0.005)
    assert dominant_hz(pcm) == pytest.approx(fake.tone_hz, abs=2)
    rms = np.sqrt(np.mean(pcm[1000:-1000].astype(np.float64) ** 2)) / 32768
    assert rms == pytest.approx(fake.tone_amplitude / np.sqrt(2), rel=0.03)


async def test_request_carries_model_input_voice_format_speed_and_bearer_key(
    make_tts: MakeTTS, fake: FakeOpenAI
) -> None:
    await collect(make_tts(api_key=API_KEY, speed=1.25))
    path, headers, body = fake.requests[-1]
    assert path == "/v1/audio/speech"
    assert body == {
        "model": "tts",
        "input": TEXT,
        "voice": "alloy",
        "response_format": "pcm",
        "speed": 1.25,
    }
    assert headers["authorization"] == f"Bearer {API_KEY}"


async def test_first_chunk_arrives_while_the_server_is_still_sending(
    make_tts: MakeTTS, fake: FakeOpenAI
) -> None:
    stream = make_tts("gated").synthesize(TEXT)
    first = await anext(stream)
    assert len(first.pcm) > 0
    assert not fake.speech_done.is_set()  # the server holds the second half back
    fake.release.set()
    rest = [chunk async for chunk in stream]
    assert len(joined([first, *rest])) == pytest.approx(3.0 * SAMPLE_RATE, rel=0.005)


async def test_closing_the_stream_early_disconnects_from_the_server(
    make_tts: MakeTTS, fake: FakeOpenAI
) -> None:
    async with contextlib.aclosing(make_tts("gated").synthesize(TEXT)) as stream:
        await anext(stream)
    assert await wait_for(fake.disconnected)
    assert not fake.speech_done.is_set()


@pytest.mark.parametrize("seconds_per_word", [0.05, 0.25, 1.0])
async def test_words_follow_the_text_monotonic_within_their_chunk_and_the_audio(
    make_tts: MakeTTS, fake: FakeOpenAI, seconds_per_word: float
) -> None:
    """Whether the voice is faster or slower than the pacer assumes."""
    fake.seconds_per_word = seconds_per_word
    chunks = await collect(make_tts())
    offset, starts, texts = 0, [], []
    for chunk in chunks:
        for word in chunk.words:
            assert offset <= word.start < offset + len(chunk.pcm)
            starts.append(word.start)
            texts.append(word.text)
        offset += len(chunk.pcm)
    assert texts == TEXT.split()
    assert starts == sorted(starts)
    assert starts[0] == 0 and starts[-1] > min(offset / 2, SAMPLE_RATE)  # spread, not piled up


async def test_words_come_progressively_with_the_audio(make_tts: MakeTTS, fake: FakeOpenAI) -> None:
    fake.seconds_per_word = 0.5  # a slow voice: 6 s for TEXT
    chunks = await collect(make_tts())
    with_words = [index for index, chunk in enumerate(chunks) if chunk.words]
    assert len(with_words) > 3
    assert with_words[-1] > len(chunks) / 2


async def test_faster_speed_setting_paces_words_faster(make_tts: MakeTTS) -> None:
    normal = [w.start for c in await collect(make_tts(speed=1.0)) for w in c.words]
    fast = [w.start for c in await collect(make_tts(speed=2.0)) for w in c.words]
    assert fast[5] < normal[5]


@pytest.mark.parametrize("text", ["", "  \n "])
async def test_empty_text_yields_nothing_and_sends_no_request(
    make_tts: MakeTTS, fake: FakeOpenAI, text: str
) -> None:
    assert await collect(make_tts(), text) == []
    assert fake.requests == []


async def test_an_error_status_is_shown_to_users_and_the_servers_words_go_to_the_log(
    make_tts: MakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(TTSError, match="HTTP 500") as caught:
        await collect(make_tts("error500"))
    assert "Voice not loaded" not in str(caught.value)
    assert "Voice not loaded" in caplog.text


async def test_upstream_text_cannot_forge_a_log_line(
    make_tts: MakeTTS, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(TTSError) as caught:
        await collect(make_tts("error-newline"))
    assert "forged" not in str(caught.value)
    assert "forged line" in caplog.text
    assert all("\n" not in record.getMessage() for record in caplog.records)


async def test_a_server_trickling_bytes_fails_after_the_total_timeout(
    make_tts: MakeTTS, fake: FakeOpenAI
) -> None:
    fake.token_delay_s = 0.05
    with pytest.raises(TTSError, match=r"did not finish the speech within 0\.5 s"):
        async with asyncio.timeout(30):
            await collect(make_tts("trickle", timeout_s=5, total_timeout_s=0.5))
    assert await wait_for(fake.disconnected)


async def test_connection_refused_gives_tts_error() -> None:
    tts = OpenAITTS(refused_base_url(), "tts")
    try:
        with pytest.raises(TTSError, match="Cannot connect"):
            await collect(tts)
    finally:
        await tts.aclose()


def _wav_header(fmt: bytes) -> bytes:
    return b"RIFF\xff\xff\xff\xffWAVEfmt " + len(fmt).to_bytes(4, "little") + fmt


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"ID3\x04 an mp3 stream", "did not send WAV"),
        (_wav_header(bytes.fromhex("0100 0100 401f0000 401f0000 0100 0800")), "8-bit"),
        (b"RIFF\x00\x00\x00\x00WAVEdata\x00\x00\x00\x00", "data before its format"),
    ],
)
def test_unusable_wav_streams_give_tts_error(data: bytes, message: str) -> None:
    with pytest.raises(TTSError, match=message):
        _WavDecoder().decode(data)


def test_wav_stream_ending_inside_its_header_gives_tts_error() -> None:
    decoder = _WavDecoder()
    assert len(decoder.decode(b"RIFF\xff\xff\xff\xffWAVEfmt ")) == 0
    with pytest.raises(TTSError, match="inside the WAV header"):
        decoder.finish()


def test_unsupported_response_format_is_refused() -> None:
    with pytest.raises(TTSError, match="response_format"):
        OpenAITTS("http://127.0.0.1:1/v1", "tts", response_format="mp3")  # type: ignore[arg-type]
