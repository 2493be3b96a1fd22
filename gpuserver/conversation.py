"""A session's conversation history, bounded by turns and characters."""

from __future__ import annotations

from collections import deque

from gpuserver.llm.base import ChatMessage


class ConversationHistory:
    def __init__(self, system_prompt: str, max_turns: int = 20, max_chars: int = 8000) -> None:
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.max_chars = max_chars
        self._messages: deque[ChatMessage] = deque()

    def messages_for(self, user_text: str) -> list[ChatMessage]:
        """What to send the LLM for a new user message: system prompt, history, the message."""
        system = (
            [ChatMessage(role="system", content=self.system_prompt)] if self.system_prompt else []
        )
        return [*system, *self._messages, ChatMessage(role="user", content=user_text)]

    def add_user(self, text: str) -> None:
        self._append(ChatMessage(role="user", content=text))

    def add_assistant(self, text: str) -> None:
        if text.strip():
            self._append(ChatMessage(role="assistant", content=text.strip()))

    @property
    def messages(self) -> list[ChatMessage]:
        return list(self._messages)

    def _append(self, message: ChatMessage) -> None:
        self._messages.append(message)
        while self._messages and (
            sum(m.role == "user" for m in self._messages) > self.max_turns
            or sum(len(m.content) for m in self._messages) > self.max_chars
        ):
            self._messages.popleft()
