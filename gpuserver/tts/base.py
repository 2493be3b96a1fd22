"""The text-to-speech interface: text in, streamed 16 kHz mono int16 PCM + word timings out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np


class TTSError(RuntimeError):
    """Synthesis failed; the message is safe to show to the user."""


class VoiceNotFoundError(TTSError):
    """The backend has no such voice; the message lists the ones it has."""


@dataclass(frozen=True)
class Voice:
    """A voice `synthesize(voice=id)` accepts; `language` is a BCP 47-like code if known."""

    id: str
    name: str
    language: str | None = None


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
    def synthesize(self, text: str, voice: str | None = None) -> AsyncIterator[SpeechChunk]:
        """Stream speech for `text` as it is produced; the first chunk comes early.

        `voice` overrides the backend's configured voice (a session's choice). Chunk lengths
        are arbitrary. Word `start`s are relative to this call's first sample. Cancelling the
        iteration stops synthesis. Raises TTSError on failure.
        """

    async def voices(self) -> list[Voice]:
        """The voices this backend offers, as far as it knows (empty: it cannot tell)."""
        return []

    async def check_voice(self, voice: str) -> None:  # noqa: B027 - accepting is the default
        """Raise VoiceNotFoundError (listing the voices) if `voice` cannot be used.

        The default accepts any voice: backends that cannot list theirs let the synthesis
        request fail instead.
        """

    @property
    def ready(self) -> bool:
        """False while the backend is still loading (reported by /healthz)."""
        return True

    async def probe(self) -> str | None:
        """Can the backend speak now? None if so, else why not (readable by users).

        Asked at start and every `server.health_check_interval_s` once `ready`: backends
        that rely on another server check it here. The default trusts `ready`.
        """
        return None

    async def aclose(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Release resources. Backends without resources need not override."""
