"""The open sessions of one server process, and whether it still admits new ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from gpuserver.session import Session

RefusalCode = Literal["busy", "shutting_down"]
Refusal = tuple[RefusalCode, str]  # the error code and the reason to tell the client


class SessionRegistry:
    def __init__(self, capacity: int, per_address: int) -> None:
        self.capacity = capacity
        self.per_address = per_address
        self.shutting_down = False
        self._sessions: dict[str, Session] = {}
        self._addresses: dict[str, str] = {}  # session id -> client address

    def refusal(self, address: str) -> Refusal | None:
        """Why a new session from `address` cannot be admitted now, or None if it can."""
        if self.shutting_down:
            return "shutting_down", "the server is shutting down"
        if len(self._sessions) >= self.capacity:
            return "busy", "the server is at capacity; try again later"
        if sum(held == address for held in self._addresses.values()) >= self.per_address:
            return "busy", f"this address already holds {self.per_address} sessions"
        return None

    def add(self, session: Session, address: str) -> None:
        self._sessions[session.id] = session
        self._addresses[session.id] = address

    def discard(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            del self._addresses[session.id]

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)
