"""`GET /api/cluster` (operators): every replica with its node, state, sessions and capacity.

Served by whichever replica the request reaches: it lists the replicas from Serve's
controller and asks each other running one for its sessions through a deployment handle
whose `replica` keyword routes the call to that replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from ray import serve
from starlette.datastructures import State

from gpuserver.api.http import _require_operator
from gpuserver.cluster.serve_state import APP_NAME, DEPLOYMENT_NAME, ReplicaInfo, ServeState

logger = logging.getLogger(__name__)
router = APIRouter()
REPORT_TIMEOUT_S = 2.0
_serve = ServeState()


def replica_report(state: State) -> dict[str, Any]:
    """The sessions of the replica whose app state this is."""
    sessions = state.sessions
    return {
        "replica": state.placement.replica,
        "sessions": len(sessions),
        "capacity": sessions.capacity,
        "shutting_down": sessions.shutting_down,
        "session_ids": [session.id for session in sessions],
    }


async def _report(handle: Any, info: ReplicaInfo, state: State) -> dict[str, Any] | None:
    if info.replica == state.placement.replica:
        return replica_report(state)
    if info.state != "RUNNING":
        return None
    try:
        report = await asyncio.wait_for(
            handle.report.remote(replica=info.replica), REPORT_TIMEOUT_S
        )
    except Exception:
        logger.warning("replica %s did not report its sessions", info.replica, exc_info=True)
        return None
    # The router falls back to another replica when this one is saturated.
    return report if report["replica"] == info.replica else None


@router.get("/api/cluster")
async def cluster(request: Request) -> dict[str, Any]:
    _require_operator(request)
    app = await _serve.app()
    replicas = (app.replicas if app is not None else None) or []
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, APP_NAME)
    state = request.app.state
    reports = await asyncio.gather(*(_report(handle, info, state) for info in replicas))
    listed = []
    for info, report in zip(replicas, reports, strict=True):
        entry: dict[str, Any] = {
            "replica": info.replica,
            "node_id": info.node_id,
            "node_ip": info.node_ip,
            "state": info.state,
            "sessions": None,
            "capacity": None,
            "shutting_down": None,
            "session_ids": [],
            "healthz": f"/healthz?replica={info.replica}",
            "metrics": f"/metrics?replica={info.replica}",
        }
        if report is not None:
            entry.update({k: v for k, v in report.items() if k != "replica"})
        listed.append(entry)
    return {
        "replicas": listed,
        "sessions": sum(e["sessions"] or 0 for e in listed),
        "capacity": sum(e["capacity"] or 0 for e in listed if not e["shutting_down"]),
    }
