"""Cutting streamed text into speakable chunks: early first chunk, clean sentence ends."""

from __future__ import annotations

import pytest

from gpuserver.text_chunker import SentenceChunker, chunk_stream, split_text


def stream(text: str, step: int = 3, **options: int) -> list[str]:
    """Feed `text` in small deltas, like an LLM does."""
    chunker = SentenceChunker(**options)
    chunks: list[str] = []
    for i in range(0, len(text), step):
        chunks += chunker.push(text[i : i + step])
    return chunks + chunker.flush()


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_english_sentences_are_cut_at_their_ends(step: int) -> None:
    text = "Hello there. How are you today? I am fine! Thanks."
    assert stream(text, step) == ["Hello there.", " How are you today?", " I am fine!", " Thanks."]


def test_chinese_sentences_are_cut_at_full_width_punctuation() -> None:
    text = "你好。今天天气很好！你想聊什么？我们开始吧；好的"
    assert stream(text) == ["你好。", "今天天气很好！", "你想聊什么？", "我们开始吧；", "好的"]


def test_mixed_chinese_and_english() -> None:
    chunks = stream("我在用 WebRTC. It works well。然后呢？")
    assert chunks == ["我在用 WebRTC.", " It works well。", "然后呢？"]


def test_numbers_urls_abbreviations_and_initials_are_never_cut() -> None:
    text = (
        "Pi is 3.14 and it costs $3,000 today. Dr. Smith met J. Doe at 5 p.m. yesterday. "
        "See https://example.com/a.b?x=1. Mail me at a.b@example.org now."
    )
    chunks = stream(text, step=2, first_max_chars=500)
    assert chunks == [
        "Pi is 3.14 and it costs $3,000 today.",
        " Dr. Smith met J. Doe at 5 p.m. yesterday.",
        " See https://example.com/a.b?x=1.",
        " Mail me at a.b@example.org now.",
    ]


def test_closing_quotes_stay_with_their_sentence() -> None:
    assert stream('He said "stop." Then left.') == ['He said "stop."', " Then left."]
    assert stream("他说：“走吧。”然后走了。", first_max_chars=500) == [
        "他说：“走吧。”",
        "然后走了。",
    ]


def test_the_first_chunk_is_cut_early_at_a_comma() -> None:
    chunks = stream("Well, that is a really interesting question, let me think about it.")
    assert chunks[0] == "Well, that is a really interesting question,"
    assert chunks[1:] == [" let me think about it."]


def test_the_first_chunk_is_capped_when_there_is_no_punctuation() -> None:
    text = "word " * 40 + "end."
    chunks = stream(text, first_max_chars=60)
    assert len(chunks[0]) <= 60
    assert chunks[0].endswith(" ")  # cut between words, not inside one
    assert "".join(chunks) == text


def test_chunks_concatenate_back_to_the_input() -> None:
    text = "One. Two, three! 四五六。Seven? Eight... nine\nten"
    assert "".join(stream(text)) == text
    assert "".join(split_text(text)) == text


def test_whitespace_only_tail_is_dropped() -> None:
    assert stream("Done.   ") == ["Done."]


async def test_chunk_stream_cuts_an_async_delta_stream() -> None:
    async def deltas():
        for piece in ["Hi", " there", ". Bye", "."]:
            yield piece

    assert [c async for c in chunk_stream(deltas())] == ["Hi there.", " Bye."]
