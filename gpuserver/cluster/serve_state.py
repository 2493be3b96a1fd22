"""What Serve's controller knows about the cluster's replicas: their node and their state.

The controller's instance details are what Ray's dashboard and REST API show; replicas ask
for them to learn that they are being stopped, `/api/cluster` to list them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import ray
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

APP_NAME = "gpuserver"
DEPLOYMENT_NAME = "gpuserver"


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    replica: str
    node_id: str | None
    node_ip: str | None
    # STARTING, UPDATING, RECOVERING, RUNNING, PENDING_MIGRATION, STOPPING
    state: str


@dataclass(frozen=True, slots=True)
class AppView:
    # DEPLOYING, RUNNING, DEPLOY_FAILED, DELETING, ...
    status: str
    # None while the deployment is not listed (e.g. the app is being deleted)
    replicas: list[ReplicaInfo] | None


def _name(state: Any) -> str:
    return str(getattr(state, "value", state))


class ServeState:
    def __init__(self) -> None:
        self._controller: Any = None

    async def app(self) -> AppView | None:
        """The app as Serve's controller lists it; None while it lists no such app (deleted,
        or the controller is recovering)."""
        if self._controller is None:
            # A blocking lookup in the GCS, once.
            self._controller = await asyncio.to_thread(
                ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE
            )
        details = await self._controller.get_serve_instance_details.remote()
        application = details.get("applications", {}).get(APP_NAME)
        if application is None:
            return None
        deployment = application.get("deployments", {}).get(DEPLOYMENT_NAME)
        replicas = None
        if deployment is not None:
            replicas = [
                ReplicaInfo(
                    replica=entry["replica_id"],
                    node_id=entry.get("node_id"),
                    node_ip=entry.get("node_ip"),
                    state=_name(entry.get("state")),
                )
                for entry in deployment.get("replicas", [])
            ]
        return AppView(_name(application.get("status")), replicas)
