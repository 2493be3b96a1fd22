"""TTS voices: listed by the backend, checked before use, chosen per session with `set_voice`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gpuserver.client import AvatarClient
from gpuserver.tts.base import Voice, VoiceNotFoundError
from gpuserver.tts.espeak import EspeakTTS
from gpuserver.tts.openai import OPENAI_VOICES, OpenAITTS
from tests.conftest import ServerProcess, start_server
from tests.fakes.openai_server import FakeOpenAI, run_fake_openai


async def test_espeak_lists_its_voices_by_the_ids_tts_voice_takes() -> None:
    voices = await EspeakTTS().voices()
    assert Voice("en-us", "English (America)", "en-us") in voices
    assert {"cmn", "de", "fr", "en"} <= {voice.id for voice in voices}
    assert len({voice.id for voice in voices}) == len(voices), "ids are unique"
    for voice in voices[:5]:
        EspeakTTS(voice=voice.id)  # each id is accepted as tts.voice


async def test_espeak_accepts_names_and_variants_and_refuses_others_with_the_list() -> None:
    tts = EspeakTTS()
    await tts.check_voice("en-us+f3")
    await tts.check_voice("English (America)")
    with pytest.raises(VoiceNotFoundError, match=r"'xyzzy'; use one of: af, .*cmn, .*en-us, "):
        await tts.check_voice("xyzzy")
    with pytest.raises(VoiceNotFoundError):
        EspeakTTS(voice="xyzzy")


async def test_an_openai_speech_server_lists_its_own_voices_or_openais() -> None:
    with run_fake_openai() as fake:
        tts = OpenAITTS(fake.base_url, "tts")
        try:
            assert [voice.id for voice in await tts.voices()] == list(OPENAI_VOICES)
            await tts.check_voice("anything")  # a server that cannot list them decides itself
            fake.voices = ["af_bella", "am_adam"]  # Kokoro-FastAPI's /v1/audio/voices
            assert [voice.id for voice in await tts.voices()] == ["af_bella", "am_adam"]
            with pytest.raises(VoiceNotFoundError, match=r"no voice 'alloy'.*af_bella, am_adam"):
                await tts.check_voice("alloy")
        finally:
            await tts.aclose()


def test_the_voices_route_lists_the_voices_for_the_page(server: ServerProcess) -> None:
    body = httpx.get(f"{server.http_url}/api/voices").json()
    assert body["backend"] == "espeak" and body["default"] is None
    assert {"id": "en-us", "name": "English (America)", "language": "en-us"} in body["voices"]


async def test_set_voice_is_confirmed_or_refused_with_voice_not_found(
    server: ServerProcess,
) -> None:
    async with AvatarClient(server.ws_url) as client:
        assert client.session["tts_voice"] is None
        await client.send({"type": "set_voice", "voice": "de", "id": "v1"})
        assert (await client.wait_for("voice"))["voice"] == "de"
        count = len(client.messages)
        await client.send({"type": "set_voice", "voice": "xyzzy", "id": "v2"})
        error = await client.wait_for("error", after=count)
        assert (error["code"], error["ref"]) == ("voice_not_found", "v2")
        assert "en-us" in error["message"]
        count = len(client.messages)
        await client.send({"type": "set_voice", "voice": None})
        assert (await client.wait_for("voice", after=count))["voice"] is None


# --- the chosen voice reaches the speech server --------------------------------------


@pytest.fixture(scope="module")
def speech_server() -> Iterator[FakeOpenAI]:
    with run_fake_openai(FakeOpenAI(voices=["af_bella", "am_adam"])) as fake:
        yield fake


@pytest.fixture(scope="module")
def openai_tts_server(
    speech_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {"GPUSERVER_TTS__BASE_URL": speech_server.base_url, "GPUSERVER_TTS__MODEL": "tts"}
    running = start_server(
        tmp_path_factory.mktemp("voices"), "--llm", "echo", "--tts", "openai", env=env
    )
    yield running
    running.stop()


def voices_spoken(fake: FakeOpenAI) -> list[str]:
    return [body["voice"] for path, _, body in fake.requests if path.endswith("/audio/speech")]


@pytest.mark.slow
async def test_each_session_speaks_in_the_voice_it_chose(
    openai_tts_server: ServerProcess, speech_server: FakeOpenAI
) -> None:
    async with AvatarClient(openai_tts_server.ws_url) as client:
        await client.start_media()
        await client.send({"type": "set_voice", "voice": "am_adam"})
        await client.wait_for("voice")
        await client.send({"type": "speak", "text": "Hello there."})
        await client.wait_for("metrics", timeout=30)
        assert voices_spoken(speech_server)[-1] == "am_adam"

        await client.send({"type": "set_voice", "voice": None})
        await client.wait_for("voice", where=lambda m: m["voice"] is None)
        count = len(client.messages)
        await client.send({"type": "speak", "text": "And again."})
        await client.wait_for("metrics", after=count, timeout=30)
        assert voices_spoken(speech_server)[-1] == "alloy", "the server's default"
