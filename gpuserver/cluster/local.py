"""A throwaway Ray cluster on this machine: N nodes with pretend GPUs, all on 127.0.0.1.

For development and tests. The first node is the head (Serve's controller and proxy run
there); every node declares `gpus_per_node` GPUs whether or not it has them, so replicas
are placed one per pretend GPU. Nothing listens beyond loopback: node IPs are 127.0.0.1,
the dashboard is off, usage stats are off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import gpuserver

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Small object stores: the cluster moves settings and messages, not tensors.
OBJECT_STORE_BYTES = 100 * 1024 * 1024
# Ray reports usage to its servers unless told not to.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def ray_environment() -> dict[str, str]:
    """Environment for every Ray process: no usage reports, this checkout importable."""
    source_root = str(Path(gpuserver.__file__).resolve().parent.parent)
    inherited = os.environ.get("PYTHONPATH")
    path = source_root if not inherited else f"{source_root}{os.pathsep}{inherited}"
    return {**RAY_ENV, "PYTHONPATH": path}


class LocalCluster:
    def __init__(self, nodes: int, gpus_per_node: int) -> None:
        self.nodes = nodes
        self.gpus_per_node = gpus_per_node
        self._cluster: Any = None

    def start(self) -> str:
        """Start the nodes (the raylets inherit this process's environment); the GCS address."""
        from ray.cluster_utils import Cluster

        os.environ.update(ray_environment())
        node: dict[str, Any] = {
            "num_cpus": self.gpus_per_node,  # a replica takes one CPU and one GPU
            "num_gpus": self.gpus_per_node,
            "node_ip_address": LOOPBACK,
            "object_store_memory": OBJECT_STORE_BYTES,
        }
        self._cluster = Cluster(
            initialize_head=True,
            head_node_args={**node, "include_dashboard": False},
            shutdown_at_exit=False,
        )
        for _ in range(self.nodes - 1):
            self._cluster.add_node(**node)
        self._cluster.wait_for_nodes()
        logger.info(
            "local Ray cluster at %s: %d nodes x %d pretend GPUs, head node %s",
            self._cluster.address,
            self.nodes,
            self.gpus_per_node,
            self._cluster.head_node.node_id,
        )
        return str(self._cluster.address)

    def shutdown(self) -> None:
        """Kill every process of every node."""
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
