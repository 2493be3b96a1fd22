"""The open sessions of one server process, and whether it still admits new ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from gpuserver.session import Session

Refusal = Literal["busy", "shutting_down"]


class SessionRegistry:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.shutting_down = False
        self._sessions: dict[str, Session] = {}

    def refusal(self) -> Refusal | None:
        """Why a new session cannot be admitted now, or None if it can."""
        if self.shutting_down:
            return "shutting_down"
        if len(self._sessions) >= self.capacity:
            return "busy"
        return None

    def add(self, session: Session) -> None:
        self._sessions[session.id] = session

    def discard(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)
