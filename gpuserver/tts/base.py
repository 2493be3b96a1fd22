"""The text-to-speech interface: text in, streamed 16 kHz mono int16 PCM + word timings out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np


class TTSError(RuntimeError):
    """Synthesis failed; the message is safe to show to the user."""


@dataclass(frozen=True)
class Word:
    """A word of the input text and where its audio starts.

    `start` counts samples at 16 kHz from the beginning of the `synthesize` call's audio.
    """

    text: str
    start: int


@dataclass(frozen=True)
class SpeechChunk:
    """A piece of synthesized speech: PCM (16 kHz mono int16) and the words starting in it."""

    pcm: np.ndarray
    words: tuple[Word, ...] = field(default=())


class TTSBackend(ABC):
    name: str

    @abstractmethod
    def synthesize(self, text: str) -> AsyncIterator[SpeechChunk]:
        """Stream speech for `text` as it is produced; the first chunk comes early.

        Chunk lengths are arbitrary. Word `start`s are relative to this call's first sample.
        Cancelling the iteration stops synthesis. Raises TTSError on failure.
        """

    @property
    def ready(self) -> bool:
        """False while the backend is still loading (reported by /healthz)."""
        return True

    async def aclose(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Release resources. Backends without resources need not override."""
