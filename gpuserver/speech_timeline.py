"""Where each spoken word sits in a turn's audio, to know what the listener actually heard.

A turn's audio is its chunks (sentences) laid end to end, each padded to whole ticks. When a
turn is interrupted after N samples left the media clock, `heard_text(N)` is the text up to
the last word whose audio had started by then.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass, field


@dataclass
class _Segment:
    text: str
    start: int  # sample offset of the segment in the turn
    word_starts: list[int] = field(default_factory=list)  # absolute sample offsets
    word_ends: list[int] = field(default_factory=list)  # char offsets into `text`
    cursor: int = 0  # where the next word is searched for in `text`


class SpeechTimeline:
    def __init__(self) -> None:
        self._segments: list[_Segment] = []
        self.first_audio_at: float | None = None  # time.monotonic() of the first PCM

    def begin_segment(self, text: str, start_sample: int) -> None:
        self._segments.append(_Segment(text, start_sample))

    def add_word(self, word: str, start_sample: int) -> None:
        """Record a word of the current segment starting at `start_sample` (segment-relative)."""
        segment = self._segments[-1]
        found = segment.text.find(word, segment.cursor) if word else -1
        if found < 0:
            return  # the TTS normalised the word (numbers, symbols): keep the previous end
        segment.cursor = found + len(word)
        segment.word_starts.append(segment.start + start_sample)
        segment.word_ends.append(segment.cursor)

    def audio_started(self) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self._segments).strip()

    def heard_text(self, samples_played: int) -> str:
        heard = []
        for index, segment in enumerate(self._segments):
            if segment.start >= samples_played:
                break
            following = self._segments[index + 1 : index + 2]
            if following and following[0].start <= samples_played:
                heard.append(segment.text)
                continue
            words = bisect_right(segment.word_starts, samples_played)
            if words:
                heard.append(segment.text[: segment.word_ends[words - 1]])
            break
        return "".join(heard).strip()
