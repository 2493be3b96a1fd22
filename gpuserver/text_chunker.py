"""Cuts streamed LLM text into speakable chunks, so TTS can start after the first sentence.

Chunks end at sentence ends in English and Chinese (。！？；… and .!? with care for
abbreviations and initials; a '.' counts only before whitespace, so decimals, URLs and
e-mail addresses are never cut). The first chunk of a turn is cut early
at a clause boundary (a comma) or a length cap, because it decides how soon speech starts.
Concatenating the chunks gives back the input text exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

_CJK_ENDS = "。！？；…"
_LATIN_ENDS = ".!?;"
_CLOSERS = "\"'”’)]}）」』】》"
_CLAUSE_CJK = "，、：,"
_ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd", "co",
        "no", "fig", "e.g", "i.e", "approx", "dept", "est", "mt", "a.m", "p.m", "u.s", "u.k",
    }
)  # fmt: skip


class SentenceChunker:
    def __init__(self, first_max_chars: int = 60, first_min_chars: int = 8, max_chars: int = 240):
        self.first_max_chars = first_max_chars
        self.first_min_chars = first_min_chars
        self.max_chars = max_chars
        self._buffer = ""
        self._emitted = 0

    def push(self, text: str) -> list[str]:
        """Add streamed text; return the chunks that are complete now."""
        self._buffer += text
        chunks = []
        while (cut := self._find_cut()) is not None:
            chunks.append(self._take(cut))
        return chunks

    def flush(self) -> list[str]:
        """End of the stream: whatever is left is the last chunk."""
        if not self._buffer.strip():
            self._buffer = ""
            return []
        return [self._take(len(self._buffer))]

    def _take(self, end: int) -> str:
        chunk, self._buffer = self._buffer[:end], self._buffer[end:]
        self._emitted += 1
        return chunk

    def _find_cut(self) -> int | None:
        text = self._buffer
        for i, char in enumerate(text):
            if char in _CJK_ENDS or char == "\n":
                return _after_closers(text, i + 1)
            if char in _LATIN_ENDS and self._latin_sentence_end(text, i):
                return _after_closers(text, i + 1)
        limit = self.first_max_chars if self._emitted == 0 else self.max_chars
        if self._emitted == 0:
            clause = _first_clause_end(text, self.first_min_chars)
            if clause is not None:
                return clause
        if len(text) > limit:
            return _last_space_before(text, limit) or limit
        return None

    @staticmethod
    def _latin_sentence_end(text: str, i: int) -> bool:
        end = _after_closers(text, i + 1)
        if end >= len(text):
            return False  # wait for the next character: "3." may become "3.14"
        if not text[end].isspace():
            return False  # "3.14", "e.g.x", "example.com"
        if text[i] != ".":
            return True
        word = text[:i].split()[-1] if text[:i].split() else ""
        if word.lower().rstrip(".") in _ABBREVIATIONS:
            return False
        # A single capital ("J. Smith") is an initial, not a sentence.
        return not (len(word) == 1 and word.isupper())


def _after_closers(text: str, end: int) -> int:
    while end < len(text) and (text[end] in _CLOSERS or text[end] in _CJK_ENDS + "!?"):
        end += 1
    return end


def _first_clause_end(text: str, min_chars: int) -> int | None:
    for i, char in enumerate(text):
        if i + 1 < min_chars or char not in _CLAUSE_CJK:
            continue
        # Latin commas only before a space: never inside "3,000".
        if char == "," and (i + 1 >= len(text) or not text[i + 1].isspace()):
            continue
        return i + 1
    return None


def _last_space_before(text: str, limit: int) -> int | None:
    cut = text.rfind(" ", 0, limit)
    return cut + 1 if cut > 0 else None


async def chunk_stream(
    deltas: AsyncIterable[str], chunker: SentenceChunker | None = None
) -> AsyncIterator[str]:
    """Speakable chunks from a stream of text deltas."""
    chunker = chunker or SentenceChunker()
    async for delta in deltas:
        for chunk in chunker.push(delta):
            yield chunk
    for chunk in chunker.flush():
        yield chunk


def split_text(text: str) -> list[str]:
    """Speakable chunks of a whole text (speak turns)."""
    chunker = SentenceChunker()
    return chunker.push(text) + chunker.flush()
