"""Where Ray Serve sends a connection: its own replica when it names one, else the least loaded.

`SessionRouter` runs inside Serve's proxy (and in any process that calls the deployment
through a handle). It ranks the replicas for each request:

1. the replica named by the request's routing key — `?replica=ID` on `/ws` or any HTTP
   route (a reconnect passes the `replica` of its `session` greeting), or the `replica`
   keyword of a handle call — while that replica is running;
2. then every replica, least loaded first: load = ongoing requests (each open WebSocket is
   one) + sessions parked for resume without a socket (reported by the replica).

Serve takes the first rank whose replica is under `max_ongoing_requests`. Whether the
cluster is full is not decided here: replicas take a few requests beyond their session
capacity, so with every replica full a connection still reaches the least-loaded one, which
answers `busy` at once (Ray would queue it instead of refusing it).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTE_PARAM = "replica"
PARKED_STAT = "parked_sessions"


def rank_replicas(
    replica_ids: Sequence[str], loads: Mapping[str, int], key: str | None
) -> list[list[str]]:
    """Singleton ranks: the keyed replica first (if running), then by load, ties in order."""
    by_load = sorted(replica_ids, key=lambda replica_id: loads.get(replica_id, 0))
    if key in replica_ids:
        by_load.remove(key)
        by_load.insert(0, key)
    return [[replica_id] for replica_id in by_load]


def routing_key(request: PendingRequest | None) -> str | None:
    """The replica a request asks for: `?replica=` of an HTTP/WebSocket request, or a kwarg."""
    if request is None:
        return None
    key = request.kwargs.get(ROUTE_PARAM)
    if isinstance(key, str):
        return key
    if not request.metadata.is_http_request or not request.args:
        return None
    raw = request.args[0]
    # The proxy sends the ASGI scope pickled; skip unpickling when no key can be in it.
    if not isinstance(raw, bytes) or f"{ROUTE_PARAM}=".encode() not in raw:
        return None
    scope: dict[str, Any] = pickle.loads(raw).asgi_scope
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(ROUTE_PARAM)
    return values[0] if values else None


class SessionRouter(RequestRouter):
    """Affinity by routing key, then least-loaded (see the module docstring)."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        cache = self.replica_queue_len_cache
        unknown = [r for r in candidate_replicas if cache.get(r.replica_id) is None]
        if unknown:
            # A stale load would send a session to a full replica (busy) while another has
            # room: ask the replicas we have no recent figure for before ranking.
            await self._probe_queue_lens(unknown, 0)
        loads = {
            replica_id: (cache.get(replica.replica_id) or 0)
            + int(replica.routing_stats.get(PARKED_STAT, 0))
            for replica_id, replica in by_id.items()
        }
        if pending_request is not None:
            # Every replica was offered: if none can take it now, back off before retrying.
            pending_request.routing_context.should_backoff = True
        ranks = rank_replicas(list(by_id), loads, routing_key(pending_request))
        if ranks:
            # Count the connection on its replica now: Serve counts it only once sent, and
            # the connections of a burst would all be ranked on the same stale loads.
            chosen = by_id[ranks[0][0]].replica_id
            cache.update(chosen, (cache.get(chosen) or 0) + 1)
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]
