"""`chat` end to end: a real server, an OpenAI-compatible fake LLM, WebRTC on loopback.

The answer streams as text while the avatar already speaks its first sentence; LLM failures
become `llm_error` and the session goes on; an interrupt cancels the LLM request upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuserver.client import AvatarClient
from tests.conftest import ServerProcess, start_server
from tests.fakes.openai_server import STORY, FakeOpenAI, refused_base_url, run_fake_openai

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeOpenAI]:
    with run_fake_openai(FakeOpenAI(token_delay_s=0.05)) as fake:
        yield fake


def llm_server(workdir: Path, base_url: str, model: str) -> ServerProcess:
    env = {"GPUSERVER_LLM__BASE_URL": base_url, "GPUSERVER_LLM__MODEL": model}
    return start_server(workdir, "--llm", "openai", env=env)


@pytest.fixture(scope="module")
def story_server(
    fake_llm: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = llm_server(tmp_path_factory.mktemp("story"), fake_llm.base_url, "story")
    yield server
    server.stop()


def types_of(client: AvatarClient, turn_id: str) -> list[str]:
    return [m["type"] for _, m in client.messages if m.get("turn_id") == turn_id]


async def test_the_answer_streams_as_text_while_the_avatar_speaks_it(
    story_server: ServerProcess,
) -> None:
    async with AvatarClient(story_server.ws_url) as client:
        await client.start_media()
        ref = await client.send({"type": "chat", "text": "Hello, who are you?"})
        metrics = await client.wait_for("metrics", timeout=60)
        turn = metrics["turn_id"]
        started = client.of_type("speech_started")[0]
        stopped = client.of_type("speech_stopped")[0]
        text = client.of_type("text")[0]
        loud = [a for a in client.media.audio if a.rms > 300]

    events = types_of(client, turn)
    deltas = [m["delta"] for m in client.of_type("llm_text")]
    # Causal order: text deltas, speech starts, the whole text, speech ends, metrics.
    assert events[0] == "llm_text"
    assert events.index("speech_started") < events.index("speech_stopped")
    assert max(i for i, kind in enumerate(events) if kind == "llm_text") < events.index("text")
    assert events.index("text") < events.index("speech_stopped") < events.index("metrics")
    assert events[-1] == "metrics"
    assert "".join(deltas) == text["content"]
    assert text["content"].strip() == STORY
    assert {m["ref"] for _, m in client.messages if m.get("turn_id") == turn} == {ref}
    # Speaking frames arrived between speech_started and speech_stopped.
    assert client.arrival_of(started) <= loud[0].arrival
    assert loud[-1].arrival <= client.arrival_of(stopped) + 0.5
    # Sentence streaming: the first frame left long before the LLM finished.
    assert metrics["llm_first_token_ms"] <= metrics["tts_first_audio_ms"]
    assert metrics["tts_first_audio_ms"] <= metrics["first_frame_ms"]
    assert metrics["first_frame_ms"] < metrics["llm_total_ms"]
    assert metrics["spoken_ms"] > 3000
    assert not metrics["interrupted"]


async def test_the_history_carries_the_previous_answer(
    story_server: ServerProcess, fake_llm: FakeOpenAI
) -> None:
    async with AvatarClient(story_server.ws_url) as client:
        await client.send({"type": "chat", "text": "First question"})
        await client.wait_for("metrics", timeout=60)
        requests, seen = len(fake_llm.requests), len(client.messages)
        await client.send({"type": "chat", "text": "Second question"})
        await client.wait_for("metrics", after=seen, timeout=60)
    messages = fake_llm.requests[requests][2]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "First question"
    assert messages[2]["content"] == STORY
    assert messages[3]["content"] == "Second question"


async def test_a_dead_llm_is_an_llm_error_and_the_session_goes_on(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = llm_server(tmp_path_factory.mktemp("dead"), refused_base_url(), "any")
    try:
        async with AvatarClient(server.ws_url) as client:
            ref = await client.send({"type": "chat", "text": "Anyone there?"})
            error = await client.wait_for("error", timeout=30)
            await client.wait_for("metrics", timeout=30)
            await client.send({"type": "ping", "t": 1})
            assert (await client.wait_for("pong"))["t"] == 1
    finally:
        server.stop()
    assert (error["code"], error["ref"]) == ("llm_error", ref)
    assert "connect" in error["message"].lower()


async def test_an_interrupt_cancels_the_llm_request_upstream(
    fake_llm: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = llm_server(tmp_path_factory.mktemp("slow"), fake_llm.base_url, "slow")
    fake_llm.disconnected.clear()
    try:
        async with AvatarClient(server.ws_url) as client:
            await client.start_media()
            await client.send({"type": "chat", "text": "Talk forever."})
            await client.wait_for("speech_started", timeout=30)
            await client.send({"type": "interrupt"})
            interrupted = await client.wait_for("interrupted")
            stopped = await client.wait_for("speech_stopped")
            assert await asyncio.to_thread(fake_llm.disconnected.wait, 10)
    finally:
        server.stop()
    answer = "".join(m["delta"] for m in client.of_type("llm_text")).strip()
    assert stopped["interrupted"] is True
    assert interrupted["heard_text"].startswith("word")
    assert answer.startswith(interrupted["heard_text"])
