"""The espeak-ng backend: audio, word timings, streaming, cancellation and serialization."""

from __future__ import annotations

import asyncio
import sys
import threading

import numpy as np
import pytest

from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.tts import espeak
from gpuserver.tts.base import SpeechChunk, TTSError
from gpuserver.tts.espeak import EspeakTTS, auto_voice

ENGLISH = "Hello world, this is a simple speech test."
CHINESE = "你好，欢迎使用数字人。"
LONG = " ".join(f"This is sentence number {i}, spoken to test streaming." for i in range(40))


async def collect(tts: EspeakTTS, text: str) -> list[SpeechChunk]:
    return [chunk async for chunk in tts.synthesize(text)]


def joined(chunks: list[SpeechChunk]) -> np.ndarray:
    return np.concatenate([chunk.pcm for chunk in chunks])


def envelope(pcm: np.ndarray) -> np.ndarray:
    frames = len(pcm) // 320
    return np.sqrt((pcm[: frames * 320].astype(np.float64).reshape(frames, 320) ** 2).mean(axis=1))


def assert_same_speech(got: list[SpeechChunk], expected: list[SpeechChunk]) -> None:
    """Same utterance: espeak is not bit-exact across calls (its pitch-flutter phase is a
    static that carries over), so compare words, length and loudness envelope instead."""
    got_pcm, expected_pcm = joined(got), joined(expected)
    assert abs(len(got_pcm) - len(expected_pcm)) < 0.01 * len(expected_pcm)
    got_words = [w for c in got for w in c.words]
    expected_words = [w for c in expected for w in c.words]
    assert [w.text for w in got_words] == [w.text for w in expected_words]
    assert all(abs(a.start - b.start) < 160 for a, b in zip(got_words, expected_words, strict=True))
    a, b = envelope(got_pcm), envelope(expected_pcm)
    frames = min(len(a), len(b))
    assert np.corrcoef(a[:frames], b[:frames])[0, 1] > 0.99


def espeak_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("espeak-ng")]


def test_auto_voice_picks_mandarin_only_for_chinese_text() -> None:
    assert auto_voice(CHINESE) == "cmn"
    assert auto_voice("Say 你好 to the avatar") == "cmn"
    assert auto_voice(ENGLISH) == "en-us"


def test_missing_espeakng_loader_raises_tts_error_with_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # makes the import fail
    with pytest.raises(TTSError, match="pip install espeakng-loader"):
        espeak._load_library()


@pytest.mark.parametrize("speed", [0.0, -1.0, float("nan")])
def test_non_positive_speed_raises_tts_error(speed: float) -> None:
    with pytest.raises(TTSError, match="speed"):
        EspeakTTS(speed=speed)


def test_unknown_voice_raises_tts_error_at_construction() -> None:
    with pytest.raises(TTSError, match="no-such-voice"):
        EspeakTTS(voice="no-such-voice")


async def test_english_sentence_gives_audible_16khz_int16_speech() -> None:
    chunks = await collect(EspeakTTS(), ENGLISH)
    assert all(chunk.pcm.dtype == PCM_DTYPE and chunk.pcm.ndim == 1 for chunk in chunks)
    pcm = joined(chunks)
    assert 0.3 < len(pcm) / SAMPLE_RATE < 10
    assert np.abs(pcm.astype(np.int32)).max() > 1000


async def test_chinese_text_with_auto_voice_gives_audible_speech() -> None:
    pcm = joined(await collect(EspeakTTS(), CHINESE))
    assert 0.3 < len(pcm) / SAMPLE_RATE < 10
    assert np.abs(pcm.astype(np.int32)).max() > 1000


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, "Call 123 now, 你好 world!"])
async def test_words_are_monotonic_start_in_their_chunk_and_follow_the_text(text: str) -> None:
    chunks = await collect(EspeakTTS(), text)
    offset, previous_start, cursor, words = 0, -1, 0, []
    for chunk in chunks:
        for word in chunk.words:
            assert offset <= word.start < offset + len(chunk.pcm)
            assert word.start > previous_start
            found = text.find(word.text, cursor)
            assert word.text
            assert found >= cursor, f"{word.text!r} not in {text!r} after index {cursor}"
            previous_start, cursor = word.start, found + len(word.text)
            words.append(word.text)
        offset += len(chunk.pcm)
    assert len(words) >= 3


async def test_word_texts_match_english_words_and_whole_chinese_words() -> None:
    english = [w.text for c in await collect(EspeakTTS(), ENGLISH) for w in c.words]
    assert english == ["Hello", "world", "this", "is", "a", "simple", "speech", "test"]
    chinese = [w.text for c in await collect(EspeakTTS(), CHINESE) for w in c.words]
    assert chinese[:2] == ["你好", "欢迎"]  # espeak reports each with length 1
    assert "".join(chinese) == "你好欢迎使用数字人"


async def test_faster_speed_gives_shorter_audio() -> None:
    normal = joined(await collect(EspeakTTS(speed=1.0), ENGLISH))
    fast = joined(await collect(EspeakTTS(speed=1.5), ENGLISH))
    assert len(fast) < 0.85 * len(normal)


@pytest.mark.parametrize("text", ["", "   \n\t "])
async def test_empty_text_yields_nothing(text: str) -> None:
    assert await collect(EspeakTTS(), text) == []


async def test_a_long_text_is_synthesized_only_a_little_ahead_of_its_reader() -> None:
    engine = espeak._get_engine()
    stream = EspeakTTS(max_buffered_s=0.5).synthesize(LONG)
    first = await anext(stream)
    assert len(first.pcm) > 0
    await asyncio.sleep(0.3)  # time enough to synthesize all of it, were it allowed to
    assert engine.pending_pieces > 5
    rest = [chunk async for chunk in stream]
    assert len(rest) > 10
    assert len(joined([first, *rest])) / SAMPLE_RATE > 30
    assert engine.pending_pieces == 0


def test_long_texts_are_cut_into_whole_sentences_where_possible() -> None:
    pieces = espeak.split_pieces(LONG, max_chars=120)
    assert "".join(pieces) == LONG
    assert all(len(piece) <= 120 for piece in pieces)
    assert all(piece.rstrip().endswith(".") for piece in pieces)
    run_on = "word " * 100 + "你好" * 100
    pieces = espeak.split_pieces(run_on, max_chars=120)
    assert "".join(pieces) == run_on and all(len(piece) <= 120 for piece in pieces)


async def test_a_second_user_is_heard_while_the_first_users_long_text_waits_for_its_reader() -> (
    None
):
    """One espeak thread serves everyone: a reader that stalls must not hold it."""
    tts = EspeakTTS(max_buffered_s=0.5)
    alone = await collect(tts, ENGLISH)
    stalled = tts.synthesize(LONG)
    await anext(stalled)  # ...and then it stops reading
    async with asyncio.timeout(30):
        second = await collect(tts, ENGLISH)
    assert_same_speech(second, alone)
    assert espeak._get_engine().pending_pieces > 5  # the first one is still far from done
    await stalled.aclose()


async def test_concurrent_readers_are_served_in_turns() -> None:
    tts = EspeakTTS(max_buffered_s=0.5)
    arrivals: list[str] = []

    async def read(name: str, text: str) -> int:
        samples = 0
        async for chunk in tts.synthesize(text):
            arrivals.append(name)
            samples += len(chunk.pcm)
        arrivals.append(f"{name} end")
        return samples

    first = asyncio.create_task(read("a", LONG))
    await asyncio.sleep(0)
    second_samples = await read("b", LONG)
    first_samples = await first
    assert first_samples == pytest.approx(second_samples, rel=0.01)
    # b started after a, yet its speech began long before a's was all synthesized
    assert arrivals.index("b") < len(arrivals) // 4
    assert arrivals.index("a end") > len(arrivals) // 2


async def test_closing_the_stream_mid_utterance_aborts_it_and_the_next_call_works() -> None:
    tts = EspeakTTS(max_buffered_s=0.5)
    reference = await collect(tts, ENGLISH)
    engine = espeak._get_engine()
    aborted = engine.aborted_utterances

    stream = tts.synthesize(LONG)
    await anext(stream)
    await stream.aclose()

    assert_same_speech(await collect(tts, ENGLISH), reference)
    assert engine.aborted_utterances == aborted + 1
    assert not engine.synthesizing
    assert len(espeak_threads()) == 1


async def test_cancelling_the_consuming_task_aborts_it_and_the_next_call_works() -> None:
    tts = EspeakTTS(max_buffered_s=0.5)
    reference = await collect(tts, ENGLISH)
    engine = espeak._get_engine()
    aborted = engine.aborted_utterances
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in tts.synthesize(LONG):
            got_first.set()

    task = asyncio.create_task(consume())
    await got_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert_same_speech(await collect(tts, ENGLISH), reference)
    assert engine.aborted_utterances == aborted + 1
    assert len(espeak_threads()) == 1


async def test_concurrent_calls_are_serialized_and_each_get_their_own_audio() -> None:
    english, chinese = EspeakTTS(max_buffered_s=0.2), EspeakTTS(speed=1.3, max_buffered_s=0.2)
    alone_en = await collect(english, ENGLISH)
    alone_zh = await collect(chinese, CHINESE)

    together_en, together_zh = await asyncio.gather(
        collect(english, ENGLISH), collect(chinese, CHINESE)
    )

    assert_same_speech(together_en, alone_en)
    assert_same_speech(together_zh, alone_zh)
    assert len(espeak_threads()) == 1
