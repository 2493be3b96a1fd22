"""The LLM interface: chat messages in, streamed text deltas out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict


class LLMError(RuntimeError):
    """Generation failed; the message is safe to show to the user."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class LLMBackend(ABC):
    name: str
    # Typical seconds from construction until `ready` (shown to users while it loads).
    load_estimate_s: ClassVar[float | None] = None

    @abstractmethod
    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        key: str = "",
        on_queued: Callable[[int], None] | None = None,
    ) -> AsyncIterator[str]:
        """Stream the assistant's answer to `messages` as text deltas.

        A backend that answers one request at a time serves the callers' `key`s (session
        ids) in turns and tells a waiting caller its place: `on_queued(n)` with n answers
        ahead, as it moves up, and 0 when its answer starts. Others ignore both.
        Cancelling the iteration stops generation (and any request behind it).
        Raises LLMError with a readable message on failure.
        """

    @property
    def ready(self) -> bool:
        """False while the backend is still loading (reported by /healthz)."""
        return True

    async def probe(self) -> str | None:
        """Can the backend answer now? None if so, else why not (readable by users).

        Asked at start and every `server.health_check_interval_s` once `ready`: backends
        that rely on another server check it here. The default trusts `ready`.
        """
        return None

    async def aclose(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Release models/connections. Backends without resources need not override."""
