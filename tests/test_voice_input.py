"""VoiceInput end to end: mic track -> 16 kHz -> silero-vad -> endpointing -> ASR -> events.

Speech is espeak's "What is the capital of France?"; recognition is the fake transcription
server on loopback (which checks the WAV it gets). Most tests feed the decoded track as fast
as it is read; one sends it through a real aiortc peer connection in real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack

from gpuserver.asr.base import ASRBackend
from gpuserver.asr.openai import OpenAIASR
from gpuserver.media import SAMPLE_RATE
from gpuserver.voice.endpointing import EndpointConfig
from gpuserver.voice.input import (
    Transcript,
    UserBargedIn,
    UserStartedTalking,
    UserStoppedTalking,
    VoiceError,
    VoiceEvent,
    VoiceInput,
)
from gpuserver.voice.pcm_track import PCMTrack
from gpuserver.voice.vad import SileroVAD
from tests.fakes.openai_server import TRANSCRIPT, FakeOpenAI, run_fake_openai
from tests.voice_fixtures import (
    FramesTrack,
    Speech,
    low_noise,
    question,
    received_over_webrtc,
    silence,
)

__all__ = ["question"]

SPOKEN_TOLERANCE_S = 0.3


@pytest.fixture(scope="module")
def vad() -> Iterator[SileroVAD]:
    model = SileroVAD()
    yield model
    model.close()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with run_fake_openai() as running:
        yield running


@pytest.fixture
async def asr(fake: FakeOpenAI) -> AsyncIterator[ASRBackend]:
    backend = OpenAIASR(fake.base_url, "whisper-1", language="en")
    yield backend
    await backend.aclose()


async def listen(
    track: MediaStreamTrack,
    asr: ASRBackend,
    vad: SileroVAD,
    *,
    avatar_speaking: bool = False,
    config: EndpointConfig | None = None,
) -> list[VoiceEvent]:
    """Every event until the track ends."""
    voice = VoiceInput(
        track,
        asr=asr,
        vad=vad,
        config=config or EndpointConfig(),
        avatar_speaking=lambda: avatar_speaking,
    )
    voice.start()
    try:
        return [event async for event in voice.events()]
    finally:
        await voice.aclose()


def kinds(events: list[VoiceEvent]) -> list[type]:
    return [type(event) for event in events]


async def test_one_utterance_gives_started_stopped_and_one_final_transcript(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    events = await listen(FramesTrack(question.pcm), asr, vad)

    assert kinds(events) == [UserStartedTalking, UserStoppedTalking, Transcript]
    started, stopped, transcript = events
    assert isinstance(started, UserStartedTalking) and isinstance(stopped, UserStoppedTalking)
    assert started.t == pytest.approx(question.start / SAMPLE_RATE, abs=0.1)
    assert stopped.duration_ms == pytest.approx(question.spoken_s * 1000, abs=150)
    assert transcript == Transcript(TRANSCRIPT, final=True, asr_ms=transcript.asr_ms)
    (heard,) = fake.transcriptions
    assert (heard.sample_rate, heard.channels, heard.sample_width) == (SAMPLE_RATE, 1, 2)
    assert heard.duration_s == pytest.approx(question.spoken_s, abs=SPOKEN_TOLERANCE_S)
    assert heard.language == "en"


@pytest.mark.slow
async def test_speech_over_a_real_peer_connection_is_recognised(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    microphone = PCMTrack()
    async with received_over_webrtc(microphone) as remote:
        voice = VoiceInput(remote, asr=asr, vad=vad, config=EndpointConfig())
        voice.start()
        try:
            played = microphone.play(question.pcm)
            events: list[VoiceEvent] = []
            async with asyncio.timeout(15):
                async for event in voice.events():
                    events.append(event)
                    if isinstance(event, Transcript):
                        break
            speech_end = await played - (len(question.pcm) - question.end) / SAMPLE_RATE
        finally:
            await voice.aclose()

    assert kinds(events) == [UserStartedTalking, UserStoppedTalking, Transcript]
    stopped, transcript = events[1], events[2]
    assert isinstance(stopped, UserStoppedTalking) and isinstance(transcript, Transcript)
    assert transcript.text == TRANSCRIPT and transcript.final
    # The estimated end of speech is when the microphone's speech really ended (+ transport).
    assert 0 <= stopped.ended_at - speech_end < 0.5
    (heard,) = fake.transcriptions
    assert heard.duration_s == pytest.approx(question.spoken_s, abs=SPOKEN_TOLERANCE_S)


@pytest.mark.parametrize(
    "audio",
    [silence(4.0), low_noise(4.0, dbfs=-55), low_noise(4.0, dbfs=-40, seed=2)],
    ids=["silence", "noise-55dB", "noise-40dB"],
)
@pytest.mark.parametrize("avatar_speaking", [False, True], ids=["idle", "avatar-speaking"])
async def test_silence_and_low_noise_give_no_events(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, audio: np.ndarray, avatar_speaking: bool
) -> None:
    assert await listen(FramesTrack(audio), asr, vad, avatar_speaking=avatar_speaking) == []
    assert fake.transcriptions == []


async def test_echo_residue_while_the_avatar_speaks_is_not_the_user(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    """The avatar's own voice, 30 dB down after the browser's echo canceller."""
    residue = question.scaled(10 ** (-30 / 20))
    assert await listen(FramesTrack(residue.pcm), asr, vad, avatar_speaking=True) == []
    # Not a deaf microphone: the same residue counts when the avatar is silent.
    events = await listen(FramesTrack(residue.pcm), asr, vad)
    assert kinds(events) == [UserStartedTalking, UserStoppedTalking, Transcript]


async def test_the_user_talking_over_the_avatar_barges_in_before_the_utterance_starts(
    asr: ASRBackend, vad: SileroVAD, question: Speech
) -> None:
    events = await listen(FramesTrack(question.pcm), asr, vad, avatar_speaking=True)
    assert kinds(events) == [UserBargedIn, UserStartedTalking, UserStoppedTalking, Transcript]
    barged, started = events[0], events[1]
    assert isinstance(barged, UserBargedIn) and isinstance(started, UserStartedTalking)
    assert barged.t == started.t, "the same onset, reported sooner"


async def test_utterances_are_transcribed_in_order_while_listening_goes_on(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    fake.transcribe_delay_s = 0.3  # slower than the audio of the next utterance arrives
    events = await listen(FramesTrack(np.concatenate([question.pcm] * 3)), asr, vad)
    assert kinds(events).count(Transcript) == 3
    assert kinds(events)[:2] == [UserStartedTalking, UserStoppedTalking]
    assert len(fake.transcriptions) == 3


async def test_a_recognition_error_is_reported_and_the_next_utterance_works(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    fake.fail_transcriptions = 1
    events = await listen(FramesTrack(np.concatenate([question.pcm] * 2)), asr, vad)
    outcomes = [event for event in events if isinstance(event, Transcript | VoiceError)]
    assert kinds(outcomes) == [VoiceError, Transcript]
    error = outcomes[0]
    assert isinstance(error, VoiceError) and "HTTP 500" in error.message


async def test_a_track_ending_mid_utterance_still_gets_its_transcript(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    cut = question.pcm[: question.end - SAMPLE_RATE // 4]
    events = await listen(FramesTrack(cut), asr, vad)
    assert kinds(events) == [UserStartedTalking, UserStoppedTalking, Transcript]
    assert len(fake.transcriptions) == 1


async def test_long_speech_is_cut_into_utterances_of_at_most_max_utterance(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    speech = question.pcm[question.start : question.end]
    config = EndpointConfig(max_utterance_s=1.0)
    events = await listen(FramesTrack(speech), asr, vad, config=config)
    assert kinds(events).count(Transcript) == 2
    assert all(heard.duration_s <= 1.0 + 0.2 for heard in fake.transcriptions)


async def test_close_cancels_its_tasks_and_ends_the_events(
    asr: ASRBackend, vad: SileroVAD, question: Speech
) -> None:
    microphone = PCMTrack()  # a live track that never ends by itself
    voice = VoiceInput(microphone, asr=asr, vad=vad, config=EndpointConfig())
    voice.start()
    tasks = {task for task in asyncio.all_tasks() if task.get_name().startswith("voice:")}
    assert len(tasks) == 2
    reader = asyncio.create_task(anext(voice.events(), None))
    await asyncio.sleep(0.2)
    await voice.aclose()
    assert await asyncio.wait_for(reader, 1) is None
    assert all(task.done() for task in tasks)


async def test_an_utterance_is_transcribed_once_from_its_first_pause(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    """Transcription starts 250 ms into the silence, not 500: the user said no more."""
    events = await listen(FramesTrack(question.pcm), asr, vad)
    assert kinds(events) == [UserStartedTalking, UserStoppedTalking, Transcript]
    assert len(fake.transcriptions) == 1, "the early transcription was the one kept"


async def test_going_on_after_a_pause_transcribes_the_whole_utterance(
    asr: ASRBackend, vad: SileroVAD, fake: FakeOpenAI, question: Speech
) -> None:
    fake.transcribe_delay_s = 0.5  # the early transcription is still running when speech goes on
    pause = silence(0.35)  # past early_transcribe_ms, short of end_silence_ms
    spoken = question.pcm[question.start : question.end]
    events = await listen(
        FramesTrack(np.concatenate([spoken, pause, spoken, silence(1.0)])), asr, vad
    )
    assert kinds(events) == [UserStartedTalking, UserStoppedTalking, Transcript]
    stopped = events[1]
    assert isinstance(stopped, UserStoppedTalking)
    whole_s = (2 * len(spoken) + len(pause)) / 16_000
    assert abs(stopped.duration_ms / 1000 - whole_s) < 0.3
    assert abs(fake.transcriptions[-1].duration_s - whole_s) < 0.3, "one utterance, both parts"
