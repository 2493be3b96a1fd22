"""The `openai` LLM against a fake OpenAI-compatible server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from gpuserver.llm.base import ChatMessage, LLMError
from gpuserver.llm.openai import OpenAILLM
from gpuserver.openai_compat import SSEDecoder
from tests.fakes.openai_server import (
    ANSWER,
    ANSWER_PIECES,
    API_KEY,
    STORY,
    FakeOpenAI,
    refused_base_url,
    run_fake_openai,
)

MakeLLM = Callable[..., OpenAILLM]
MESSAGES = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="Say hello."),
]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with run_fake_openai() as running:
        yield running


@pytest.fixture
async def make_llm(fake: FakeOpenAI) -> AsyncIterator[MakeLLM]:
    created: list[OpenAILLM] = []

    def make(model: str, **options: Any) -> OpenAILLM:
        llm = OpenAILLM(fake.base_url, model, **options)
        created.append(llm)
        return llm

    yield make
    for llm in created:
        await llm.aclose()


async def collect(llm: OpenAILLM) -> list[str]:
    return [delta async for delta in llm.stream(MESSAGES)]


async def wait_for(event: threading.Event, timeout: float = 10.0) -> bool:
    """Wait (off the loop) for an event set by the fake server's thread."""
    return await asyncio.to_thread(event.wait, timeout)


def test_sse_decoder_handles_line_endings_comments_fields_and_split_pieces() -> None:
    decoder = SSEDecoder()
    pieces = ["\ufeffdata: a\r", "\n\r\n: ping\n\nevent: x\nid: 1\nretry: 5\ndata:b\ndata:  c\r\r"]
    pieces += ["data: \u2028x\x85y\n", "\ndata", ": tail"]
    events = [data for piece in pieces for data in decoder.feed(piece)] + decoder.close()
    assert events == ["a", "b\n c", "\u2028x\x85y", "tail"]


async def test_deltas_arrive_in_order_despite_keepalives_empty_choices_and_null_content(
    make_llm: MakeLLM,
) -> None:
    deltas = await collect(make_llm("chat"))
    assert deltas == list(ANSWER_PIECES)
    assert "".join(deltas) == ANSWER


async def test_request_carries_model_messages_stream_and_sampling_settings(
    make_llm: MakeLLM, fake: FakeOpenAI
) -> None:
    await collect(make_llm("chat", temperature=0.3, max_tokens=42))
    path, headers, body = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["model"] == "chat" and body["stream"] is True
    assert body["messages"] == [m.model_dump() for m in MESSAGES]
    assert body["temperature"] == 0.3 and body["max_tokens"] == 42
    assert "authorization" not in headers


async def test_api_key_is_sent_as_bearer_token(make_llm: MakeLLM, fake: FakeOpenAI) -> None:
    assert "".join(await collect(make_llm("auth", api_key=API_KEY))) == ANSWER
    assert fake.requests[-1][1]["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize(
    ("scenario", "options", "status", "detail"),
    [
        ("auth", {"api_key": "sk-wrong"}, "HTTP 401", "Incorrect API key provided"),
        ("error500", {}, "HTTP 500", "The model crashed"),
    ],
)
async def test_an_error_status_is_shown_to_users_and_the_servers_words_go_to_the_log(
    make_llm: MakeLLM,
    fake: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    scenario: str,
    options: dict[str, Any],
    status: str,
    detail: str,
) -> None:
    with pytest.raises(LLMError, match=status) as caught:
        await collect(make_llm(scenario, **options))
    assert detail not in str(caught.value)
    assert fake.base_url not in str(caught.value)
    assert detail in caplog.text


async def test_upstream_text_cannot_forge_a_log_line(
    make_llm: MakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(LLMError) as caught:
        await collect(make_llm("error-newline"))
    assert "forged" not in str(caught.value)
    assert "forged line" in caplog.text
    assert all("\n" not in record.getMessage() for record in caplog.records)


async def test_a_server_sending_only_keep_alives_fails_after_the_total_timeout(
    make_llm: MakeLLM, fake: FakeOpenAI
) -> None:
    fake.token_delay_s = 0.05  # keep-alives well inside the 5 s read timeout
    with pytest.raises(LLMError, match=r"did not finish the answer within 0\.5 s"):
        async with asyncio.timeout(30):
            await collect(make_llm("keepalive", timeout_s=5, total_timeout_s=0.5))
    assert await wait_for(fake.disconnected)


async def test_the_total_timeout_does_not_count_a_slow_reader(
    make_llm: MakeLLM, fake: FakeOpenAI
) -> None:
    fake.token_delay_s = 0.005
    received = []
    async for delta in make_llm("story", total_timeout_s=1.0).stream(MESSAGES):
        received.append(delta)
        await asyncio.sleep(0.05)  # ~30 words: the reader takes 1.5 s in all
    assert "".join(received).strip() == STORY


async def test_dropped_connection_mid_stream_gives_llm_error_after_the_first_deltas(
    make_llm: MakeLLM,
) -> None:
    received: list[str] = []

    async def consume() -> None:
        async for delta in make_llm("drop").stream(MESSAGES):
            received.append(delta)

    with pytest.raises(LLMError, match="broke off"):
        await consume()
    assert received == list(ANSWER_PIECES[:2])


async def test_stream_ending_without_done_or_finish_reason_is_an_error(
    make_llm: MakeLLM,
) -> None:
    with pytest.raises(LLMError, match="before it was complete"):
        await collect(make_llm("truncated"))


async def test_stream_with_finish_reason_but_no_done_is_complete(
    make_llm: MakeLLM,
) -> None:
    assert "".join(await collect(make_llm("no-done"))) == ANSWER


@pytest.mark.parametrize(
    ("scenario", "message"),
    [("bad-json", "invalid stream chunk"), ("stream-error", "reported an error")],
)
async def test_bad_chunks_give_llm_error(make_llm: MakeLLM, scenario: str, message: str) -> None:
    with pytest.raises(LLMError, match=message) as caught:
        await collect(make_llm(scenario))
    assert "Overloaded" not in str(caught.value) and "oops" not in str(caught.value)


async def test_connection_refused_gives_llm_error() -> None:
    llm = OpenAILLM(refused_base_url(), "chat")
    try:
        with pytest.raises(LLMError, match="Cannot connect"):
            await collect(llm)
    finally:
        await llm.aclose()


async def test_silent_server_times_out_with_llm_error(make_llm: MakeLLM, fake: FakeOpenAI) -> None:
    fake.token_delay_s = 5.0
    with pytest.raises(LLMError, match="timed out"):
        await collect(make_llm("slow", timeout_s=0.3))
    assert await wait_for(fake.disconnected)


async def test_closing_the_stream_early_disconnects_from_the_server(
    make_llm: MakeLLM, fake: FakeOpenAI
) -> None:
    async with contextlib.aclosing(make_llm("slow").stream(MESSAGES)) as stream:
        received = [await anext(stream) for _ in range(3)]
    assert received == [" word0", " word1", " word2"]
    assert await wait_for(fake.disconnected)
    assert fake.tokens_sent < 1000


async def test_cancelling_the_consumer_task_disconnects_from_the_server(
    make_llm: MakeLLM, fake: FakeOpenAI
) -> None:
    got_two = asyncio.Event()
    received: list[str] = []

    async def consume() -> None:
        async for delta in make_llm("slow").stream(MESSAGES):
            received.append(delta)
            if len(received) == 2:
                got_two.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_two.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_for(fake.disconnected)
