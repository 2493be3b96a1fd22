"""The open sessions of one server process, and whether it still admits new ones.

A session whose socket dropped is *detached*: it still holds its place (and its media, which
may still be playing to a connected peer) for a grace period, and a reconnect that names it
with its resume key picks it up again; past the grace period it is closed. A reconnect may
also come before the server noticed the old socket was dead (a phone changing networks):
then the old connection hands the session over and ends.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Literal

from gpuserver.session import Session
from gpuserver.tasks import TaskOwner

logger = logging.getLogger(__name__)

HandOver = Callable[[], None]  # ends a connection whose session another one takes over
RefusalCode = Literal["busy", "shutting_down"]
Refusal = tuple[RefusalCode, str]  # the error code and the reason to tell the client


class SessionRegistry:
    def __init__(self, capacity: int, per_address: int) -> None:
        self.capacity = capacity
        self.per_address = per_address
        self.shutting_down = False
        self._sessions: dict[str, Session] = {}
        self._addresses: dict[str, str] = {}  # session id -> client address
        self._detached: dict[str, asyncio.TimerHandle] = {}  # session id -> its expiry
        self._holders: dict[str, HandOver] = {}  # session id -> its connection, if attached
        self._closing = TaskOwner("expired-sessions")

    def refusal(self, address: str) -> Refusal | None:
        """Why a new session from `address` cannot be admitted now, or None if it can."""
        if self.shutting_down:
            return "shutting_down", "the server is shutting down"
        if len(self._sessions) >= self.capacity:
            return "busy", "the server is at capacity; try again later"
        if sum(held == address for held in self._addresses.values()) >= self.per_address:
            return "busy", f"this address already holds {self.per_address} sessions"
        return None

    def add(self, session: Session, address: str, holder: HandOver) -> None:
        self._sessions[session.id] = session
        self._addresses[session.id] = address
        self._holders[session.id] = holder

    def detach(self, session: Session, grace_s: float) -> None:
        """Keep `session` for `grace_s` for its client to resume it, then close it."""
        self._holders.pop(session.id, None)
        loop = asyncio.get_running_loop()
        self._detached[session.id] = loop.call_later(grace_s, self._expire, session)

    def resume(self, session_id: str, key: str, address: str, holder: HandOver) -> Session | None:
        """Session `session_id` if `key` is its resume key, now held by `holder`."""
        session = self._sessions.get(session_id)
        if session is None or not hmac.compare_digest(key.encode(), session.resume_key.encode()):
            return None
        if (expiry := self._detached.pop(session_id, None)) is not None:
            expiry.cancel()
        elif (previous := self._holders.get(session_id)) is not None:
            previous()
        self._holders[session_id] = holder
        self._addresses[session_id] = address
        return session

    def _expire(self, session: Session) -> None:
        self._detached.pop(session.id, None)
        logger.info("session %s was not resumed in time: closing it", session.id)
        self.discard(session)
        self._closing.start(session.close(), f"close-{session.id}")

    def discard(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            del self._addresses[session.id]
            self._holders.pop(session.id, None)
            if (expiry := self._detached.pop(session.id, None)) is not None:
                expiry.cancel()

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    async def close(self) -> None:
        """Close every session, attached or not; never raises."""
        sessions = list(self._sessions.values())
        for session in sessions:
            self.discard(session)
        await asyncio.gather(*(session.close() for session in sessions))
        await self._closing.close()
