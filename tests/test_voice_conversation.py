"""A conversation by voice: the user talks into the peer connection, the avatar answers.

A real aiortc client offers its microphone on the same peer connection that receives the
avatar, and plays speech made by the project's espeak-ng; the server (in-process) detects
it with silero-vad, sends the utterance as a WAV to a fake OpenAI-compatible transcription
server on loopback, and runs the transcript as a chat turn (echo LLM, espeak, warp engine).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gpuserver.client import AvatarClient
from gpuserver.config import Settings
from gpuserver.media import SAMPLE_RATE
from gpuserver.voice.pcm_track import PCMTrack
from tests.conftest import loopback_settings, serve_in_process
from tests.fakes.openai_server import FakeOpenAI, run_fake_openai
from tests.voice_fixtures import Speech, low_noise, question, silence

__all__ = ["question"]  # the fixture

pytestmark = pytest.mark.slow

TRANSCRIPT = "What is the capital of France?"
LONG = "This answer goes on for a while, so that the user can talk over it. " * 4


@pytest.fixture
def asr_server() -> Iterator[FakeOpenAI]:
    with run_fake_openai(FakeOpenAI(transcript=TRANSCRIPT, transcribe_delay_s=0.1)) as fake:
        yield fake


def voice_settings(workdir: Path, fake: FakeOpenAI, **asr: object) -> Settings:
    return loopback_settings(
        workdir, asr={"backend": "openai", "base_url": fake.base_url, "model": "whisper-1", **asr}
    )


@contextlib.asynccontextmanager
async def talking(settings: Settings) -> AsyncIterator[tuple[AvatarClient, PCMTrack]]:
    """A client receiving the avatar and sending its microphone, on a server with `settings`."""
    async with (
        serve_in_process(settings) as server,
        AvatarClient(server.ws_url, microphone=True) as client,
    ):
        await client.start_media()
        assert client.microphone is not None
        yield client, client.microphone


def kinds(client: AvatarClient, after: int = 0) -> list[str]:
    return [message["type"] for _, message in client.messages[after:]]


async def test_a_spoken_question_is_transcribed_answered_and_spoken(
    tmp_path: Path, asr_server: FakeOpenAI, question: Speech
) -> None:
    async with talking(voice_settings(tmp_path, asr_server)) as (client, microphone):
        assert client.session["voice"] == {"asr": "openai", "barge_in": True}
        await microphone.play(question.pcm)
        transcript = await client.wait_for("user_transcript", timeout=20)
        stopped = await client.wait_for("speech_stopped", timeout=30)
        metrics = await client.wait_for("metrics", timeout=10)
    order = [k for k in kinds(client) if k.startswith("user_") or k in ("text", "metrics")]
    assert order == [
        "user_speech_started",
        "user_speech_stopped",
        "user_transcript",
        "text",
        "metrics",
    ]
    assert transcript == {"type": "user_transcript", "text": TRANSCRIPT, "final": True}
    assert client.of_type("text")[0]["content"] == TRANSCRIPT  # the echo LLM answered it
    assert stopped["interrupted"] is False
    assert metrics["asr_ms"] is not None and metrics["asr_ms"] >= 100  # the fake's delay
    assert metrics["speech_end_to_first_frame_ms"] > 0
    (upload,) = asr_server.transcriptions
    assert (upload.sample_rate, upload.channels, upload.sample_width) == (SAMPLE_RATE, 1, 2)
    spoken_s = (question.end - question.start) / SAMPLE_RATE
    assert abs(upload.duration_s - spoken_s) <= 0.3


async def test_talking_over_the_avatar_interrupts_it_and_the_question_is_answered(
    tmp_path: Path, asr_server: FakeOpenAI, question: Speech
) -> None:
    async with talking(voice_settings(tmp_path, asr_server)) as (client, microphone):
        ref = await client.send({"type": "speak", "text": LONG})
        await client.wait_for("speech_started", timeout=20)
        await asyncio.sleep(1.0)
        await microphone.play(question.pcm)
        interrupted = await client.wait_for("interrupted", timeout=20)
        answer = await client.wait_for(
            "speech_stopped", where=lambda m: m["ref"] is None, timeout=30
        )
    assert interrupted["ref"] == ref
    order = kinds(client)
    # Barge-in comes first: sooner than the utterance's start, long before its transcript.
    assert order.index("interrupted") <= order.index("user_speech_started")
    assert order.index("interrupted") < order.index("user_transcript")
    assert answer["interrupted"] is False
    assert client.of_type("text")[-1]["content"] == TRANSCRIPT


@pytest.mark.parametrize(
    "heard", [pytest.param(silence(4.0), id="silence"), pytest.param(low_noise(4.0), id="noise")]
)
async def test_silence_or_low_noise_on_the_microphone_neither_talks_nor_interrupts(
    tmp_path: Path, asr_server: FakeOpenAI, heard: object
) -> None:
    async with talking(voice_settings(tmp_path, asr_server)) as (client, microphone):
        await client.send({"type": "speak", "text": "One short answer to listen to."})
        await client.wait_for("speech_started", timeout=20)
        await microphone.play(heard)  # type: ignore[arg-type]
        stopped = await client.wait_for("speech_stopped", timeout=30)
    assert stopped["interrupted"] is False
    assert not [k for k in kinds(client) if k.startswith("user_") or k == "interrupted"]
    assert not asr_server.transcriptions


async def test_without_speech_recognition_a_microphone_is_ignored(
    tmp_path: Path, question: Speech
) -> None:
    async with talking(loopback_settings(tmp_path)) as (client, microphone):
        assert client.session["voice"] == {"asr": None, "barge_in": True}
        await microphone.play(question.pcm)
        await client.send({"type": "ping", "t": 1})
        await client.wait_for("pong")
    assert not [k for k in kinds(client) if k.startswith("user_") or k == "error"]
