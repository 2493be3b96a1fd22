"""Where Ray Serve sends a connection: its own replica when it names one, else the least loaded.

`SessionRouter` runs inside Serve's proxy (and in any process that calls the deployment
through a handle). It ranks the replicas for each request:

1. the replica the request names — `?replica=ID` on `/ws` or any HTTP route (a reconnect
   passes the `replica` of its `session` greeting), or the `replica` keyword of a handle
   call — or else the replica holding the session a reconnect resumes (`?session_id=`, as
   the replicas last reported their sessions: a session younger than
   `SESSIONS_REPORT_S` may not be known yet), while that replica is running;
2. then every replica, least loaded first: load = requests on it (each open WebSocket is
   one) + sessions parked for resume without a socket (reported by the replica).

The load is what this router routed itself, counted from the moment it ranks a replica
first until the request completes. Serve's own figures lag both ways: a request counts only
once it has reached its replica (a burst ranked on them would all go to one replica), and a
replica's report can still include requests whose end the router has already seen. With one
proxy (`proxy_location = "HeadOnly"`) this count is exact; with a proxy per node each one
places by what it routed, and replicas still refuse beyond their capacity.

Serve takes the first rank whose replica is under `max_ongoing_requests`. Whether the
cluster is full is not decided here: replicas take a few requests beyond their session
capacity, so with every replica full a connection still reaches the least-loaded one, which
answers `busy` at once (Ray would queue it instead of refusing it).
"""

from __future__ import annotations

import pickle
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

ROUTE_PARAM = "replica"
SESSION_PARAM = "session_id"
QUERY_KEYS = (ROUTE_PARAM, SESSION_PARAM)
# What replicas report for routing; Serve asks them every SESSIONS_REPORT_S.
PARKED_STAT = "parked_sessions"
SESSIONS_STAT = "sessions"
SESSIONS_REPORT_S = 1.0
# A request ranked but never sent (its client left while it was routed) stops counting.
UNSENT_HOLD_S = 5.0


def rank_replicas(
    replica_ids: Sequence[str], loads: Mapping[str, int], key: str | None
) -> list[list[str]]:
    """Singleton ranks: the keyed replica first (if running), then by load, ties in order."""
    by_load = sorted(replica_ids, key=lambda replica_id: loads.get(replica_id, 0))
    if key in replica_ids:
        by_load.remove(key)
        by_load.insert(0, key)
    return [[replica_id] for replica_id in by_load]


def routing_key(
    request: PendingRequest | None, replica_sessions: Callable[[], Mapping[str, str]]
) -> str | None:
    """The replica a request asks for: by `?replica=` (or the `replica` keyword of a handle
    call), else the one holding the session of `?session_id=` (`replica_sessions` maps
    session ids to replicas)."""
    if request is None:
        return None
    key = request.kwargs.get(ROUTE_PARAM)
    if isinstance(key, str):
        return key
    if not request.metadata.is_http_request or not request.args:
        return None
    raw = request.args[0]
    # The proxy sends the ASGI scope pickled; skip unpickling when no key can be in it.
    if not isinstance(raw, bytes) or not any(f"{n}=".encode() in raw for n in QUERY_KEYS):
        return None
    scope: dict[str, Any] = pickle.loads(raw).asgi_scope
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if replica := query.get(ROUTE_PARAM):
        return replica[0]
    if session := query.get(SESSION_PARAM):
        return replica_sessions().get(session[0])
    return None


@dataclass(slots=True)
class _Hold:
    """A request this router routed, counted on its replica until it completes."""

    replica: ReplicaID
    since: float
    sent: bool = False


class SessionRouter(RequestRouter):
    """Affinity by routing key, then least-loaded (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holds: dict[str, _Hold] = {}  # by internal request id

    def _own_loads(self) -> Counter[str]:
        now = time.monotonic()
        for request_id, hold in list(self._holds.items()):
            if not hold.sent and now - hold.since > UNSENT_HOLD_S:
                del self._holds[request_id]
        return Counter(hold.replica.unique_id for hold in self._holds.values())

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        own = self._own_loads()
        loads = {
            replica_id: own[replica_id] + int(replica.routing_stats.get(PARKED_STAT, 0))
            for replica_id, replica in by_id.items()
        }

        def replica_sessions() -> dict[str, str]:
            return {
                session: replica_id
                for replica_id, replica in by_id.items()
                for session in replica.routing_stats.get(SESSIONS_STAT, ())
            }

        key = routing_key(pending_request, replica_sessions)
        ranks = rank_replicas(list(by_id), loads, key)
        if pending_request is not None:
            # Every replica was offered: if none can take it now, back off before retrying.
            pending_request.routing_context.should_backoff = True
            if ranks:
                first = by_id[ranks[0][0]].replica_id
                self._holds[pending_request.metadata.internal_request_id] = _Hold(
                    first, time.monotonic()
                )
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        # Accepted, maybe by a replica ranked lower than the first.
        hold = _Hold(replica_id, time.monotonic(), sent=True)
        self._holds[pending_request.metadata.internal_request_id] = hold

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        hold = self._holds.get(internal_request_id)
        if hold is not None and hold.replica == replica_id:
            del self._holds[internal_request_id]
