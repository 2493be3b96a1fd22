"""The `openai` ASR against the fake transcription server on loopback.

The utterance goes up as a 16 kHz mono 16-bit WAV; failures become ASRErrors with a message
for the user that never names the server's address.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpuserver.asr import create_asr
from gpuserver.asr.base import ASRError
from gpuserver.asr.openai import OpenAIASR
from gpuserver.config import ASRSettings
from gpuserver.media import SAMPLE_RATE
from tests.fakes.openai_server import API_KEY, FakeOpenAI, refused_base_url, run_fake_openai
from tests.voice_fixtures import Speech, question

__all__ = ["question"]


@pytest.fixture
def fake() -> FakeOpenAI:
    with run_fake_openai() as running:
        yield running


async def test_utterance_is_uploaded_as_16khz_mono_wav_and_its_text_returned(
    fake: FakeOpenAI, question: Speech
) -> None:
    asr = OpenAIASR(fake.base_url, "whisper-1", api_key=API_KEY, language="en")
    try:
        text = await asr.transcribe(question.pcm)
    finally:
        await asr.aclose()

    assert text == fake.transcript
    (heard,) = fake.transcriptions
    assert (heard.sample_rate, heard.channels, heard.sample_width) == (SAMPLE_RATE, 1, 2)
    assert np.array_equal(heard.pcm, question.pcm)
    assert (heard.model, heard.language) == ("whisper-1", "en")
    _, headers, _ = fake.requests[-1]
    assert headers["authorization"] == f"Bearer {API_KEY}"


async def test_language_per_call_overrides_the_configured_one_and_none_sends_none(
    fake: FakeOpenAI,
) -> None:
    asr = OpenAIASR(fake.base_url, "whisper-1")
    try:
        await asr.transcribe(np.zeros(1600, np.int16))
        await asr.transcribe(np.zeros(1600, np.int16), language="fr")
    finally:
        await asr.aclose()
    assert [heard.language for heard in fake.transcriptions] == [None, "fr"]


async def test_text_is_stripped(fake: FakeOpenAI) -> None:
    fake.transcript = "  Paris, please.\n"
    asr = OpenAIASR(fake.base_url, "whisper-1")
    try:
        assert await asr.transcribe(np.zeros(1600, np.int16)) == "Paris, please."
    finally:
        await asr.aclose()


async def test_a_server_error_becomes_asr_error_and_its_words_go_only_to_the_log(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail_transcriptions = 1
    asr = OpenAIASR(fake.base_url, "whisper-1")
    try:
        with pytest.raises(ASRError, match=r"HTTP 500") as error:
            await asr.transcribe(np.zeros(1600, np.int16))
        assert "127.0.0.1" not in str(error.value)
        assert "The model crashed" not in str(error.value)
        assert "The model crashed" in caplog.text
        assert await asr.transcribe(np.zeros(1600, np.int16)) == fake.transcript  # goes on
    finally:
        await asr.aclose()


async def test_unreachable_server_becomes_asr_error_without_its_address() -> None:
    asr = OpenAIASR(refused_base_url(), "whisper-1")
    try:
        with pytest.raises(ASRError, match="Cannot reach the speech recognition server") as error:
            await asr.transcribe(np.zeros(1600, np.int16))
    finally:
        await asr.aclose()
    assert "127.0.0.1" not in str(error.value) and "http" not in str(error.value)


async def test_slow_server_times_out_as_asr_error(fake: FakeOpenAI) -> None:
    fake.transcribe_delay_s = 2.0
    asr = OpenAIASR(fake.base_url, "whisper-1", timeout_s=0.2)
    try:
        with pytest.raises(ASRError, match=r"did not answer within 0\.2 s"):
            await asr.transcribe(np.zeros(1600, np.int16))
    finally:
        await asr.aclose()


async def test_stereo_or_float_audio_is_refused_before_any_request(fake: FakeOpenAI) -> None:
    asr = OpenAIASR(fake.base_url, "whisper-1")
    try:
        for bad in (np.zeros((1600, 2), np.int16), np.zeros(1600, np.float32)):
            with pytest.raises(ASRError, match="mono 16-bit"):
                await asr.transcribe(bad)
    finally:
        await asr.aclose()
    assert fake.transcriptions == []


def test_backend_none_means_no_voice_input() -> None:
    assert create_asr(ASRSettings()) is None


async def test_backend_openai_is_built_from_settings(fake: FakeOpenAI) -> None:
    settings = ASRSettings(backend="openai", base_url=fake.base_url, api_key=API_KEY, language="en")
    asr = create_asr(settings)
    assert isinstance(asr, OpenAIASR) and asr.ready
    try:
        assert await asr.transcribe(np.zeros(1600, np.int16)) == fake.transcript
    finally:
        await asr.aclose()
    assert fake.transcriptions[0].language == "en"
