"""The `echo` LLM: answers with the user's own text (tests, apps that drive speech)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence

from gpuserver.llm.base import ChatMessage, LLMBackend

_PIECES = re.compile(r"\S+\s*|\s+")


class EchoLLM(LLMBackend):
    name = "echo"

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        key: str = "",
        on_queued: Callable[[int], None] | None = None,
    ) -> AsyncIterator[str]:
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        # Word by word, like a real stream, so streaming paths are exercised.
        for piece in _PIECES.findall(last_user):
            yield piece
            await asyncio.sleep(0)
