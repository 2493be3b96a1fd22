"""The speech-recognition interface: one utterance of 16 kHz mono int16 PCM in, its text out."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class ASRError(RuntimeError):
    """Recognition failed; the message is safe to show to the user (no internal addresses)."""


class ASRBackend(ABC):
    name: str

    @abstractmethod
    async def transcribe(self, pcm: np.ndarray, *, language: str | None = None) -> str:
        """The text spoken in `pcm` (16 kHz mono int16, one utterance), stripped; "" if none.

        `language` (ISO-639-1, e.g. "en") overrides the backend's configured language; None
        keeps it (and a backend without one detects the language). Cancelling the call
        abandons the request. Raises ASRError on failure.
        """

    @property
    def ready(self) -> bool:
        """False while the backend is still loading (reported by /healthz)."""
        return True

    async def aclose(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Release resources. Backends without resources need not override."""
