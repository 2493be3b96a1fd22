"""`gpuserver cluster`: deploy the app on Ray Serve, one replica per GPU, until Ctrl-C/SIGTERM.

With `cluster.address` it deploys onto that Ray cluster and removes the app (draining its
sessions) on exit; without, it starts a throwaway local cluster (gpuserver.cluster.local)
and tears all of it down on exit.

Admission is split between Ray and the app. Each replica may hold `max_sessions` sessions
(its `SessionRegistry`), and Serve lets it take `SPARE_SLOTS` requests more: Serve queues a
request for a saturated replica instead of refusing it, so a spare slot lets a full
replica answer `busy` + 1013 itself at once, and another keeps its health, metrics and
operator routes reachable. `SessionRouter` sends each connection to the least-loaded
replica, so a replica refuses only when every replica is full.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from gpuserver.cluster.local import LOOPBACK, LocalCluster
from gpuserver.config import Settings

logger = logging.getLogger(__name__)

# Teardown of a local cluster: how long its replicas may drain before everything is killed.
LOCAL_DRAIN_S = 30.0
# Requests a replica takes beyond its sessions: a refusal in flight, an operator request.
SPARE_SLOTS = 2


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


def _handle_signals(handler: Any) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def application(settings: Settings, replicas: int) -> Any:
    """The Serve application: `replicas` replicas of the app, one GPU each."""
    from ray.serve.config import RequestRouterConfig

    from gpuserver.cluster.replica import GpuServerReplica
    from gpuserver.cluster.router import SESSIONS_REPORT_S, SessionRouter
    from gpuserver.cluster.serve_state import DEPLOYMENT_NAME

    cluster = settings.cluster
    capacity = settings.limits.max_sessions
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_gpus": 1},
        "max_ongoing_requests": capacity + SPARE_SLOTS,
        "max_queued_requests": cluster.max_queued_requests,
        "graceful_shutdown_timeout_s": cluster.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": cluster.drain_poll_s,
        "request_router_config": RequestRouterConfig(
            request_router_class=SessionRouter,
            request_routing_stats_period_s=SESSIONS_REPORT_S,
        ),
    }
    if cluster.max_replicas is not None and cluster.max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": cluster.max_replicas,
            # Add a replica when replicas run three quarters full on average.
            "target_ongoing_requests": max(1.0, 0.75 * capacity),
        }
    else:
        options["num_replicas"] = replicas
    return GpuServerReplica.options(**options).bind(settings)


def _absolute_paths(settings: Settings) -> Settings:
    """Local replicas may not share this process's working directory."""
    avatars, engine, logs = settings.avatars, settings.engine, settings.logging
    return settings.model_copy(
        update={
            "avatars": avatars.model_copy(
                update={"dir": avatars.dir.resolve(), "cache_dir": avatars.cache_dir.resolve()}
            ),
            "engine": engine.model_copy(update={"models_dir": engine.models_dir.resolve()}),
            "logging": logs.model_copy(update={"dir": Path(logs.dir).resolve()}),
        }
    )


def _connect(settings: Settings) -> tuple[Settings, int, LocalCluster | None]:
    """Join (or start) the Ray cluster; the settings replicas get, their count, a local cluster."""
    import ray

    from gpuserver.cluster.serve_state import APP_NAME

    cluster = settings.cluster
    if cluster.address is not None:
        ray.init(address=cluster.address, namespace=APP_NAME)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        replicas = cluster.replicas or gpus
        if replicas < 1:
            raise RuntimeError(f"the Ray cluster at {cluster.address} has no GPU")
        return settings, replicas, None
    local = LocalCluster(cluster.local_nodes, cluster.gpus_per_node)
    try:
        address = local.start()
        ray.init(address=address, namespace=APP_NAME, _node_ip_address=LOOPBACK)
    except BaseException:
        local.shutdown()
        raise
    replicas = cluster.replicas or cluster.local_nodes * cluster.gpus_per_node
    return _absolute_paths(settings), replicas, local


def _deploy(settings: Settings, replicas: int) -> None:
    from ray import serve

    from gpuserver.cluster.serve_state import APP_NAME

    serve.start(
        proxy_location=settings.cluster.proxy_location,
        http_options={"host": settings.server.host, "port": settings.server.port},
    )
    serve.run(application(settings, replicas), name=APP_NAME, route_prefix="/")
    logger.info(
        "cluster ready on http://%s:%d: %d replicas x %d sessions",
        settings.server.host,
        settings.server.port,
        replicas,
        settings.limits.max_sessions,
    )


def _remove_app(timeout_s: float | None) -> None:
    """Delete the app: Serve stops every replica, which drains its sessions first."""
    from ray import serve

    from gpuserver.cluster.serve_state import APP_NAME

    deleting = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
    deleting.start()
    deleting.join(timeout_s)
    if deleting.is_alive():
        logger.warning("replicas still draining after %.0f s: stopping them", timeout_s or 0)


def run_cluster(settings: Settings) -> int:
    _handle_signals(_raise_stopped)
    local: LocalCluster | None = None
    try:
        settings, replicas, local = _connect(settings)
        _handle_signals(_raise_stopped)  # ray.init installs its own SIGTERM handler
        _deploy(settings, replicas)
        while True:
            time.sleep(3600)
    except _Stopped as stopped:
        logger.info("%s: stopping the cluster", stopped)
    finally:
        # Finish the teardown whatever arrives meanwhile: no Ray process may be left behind.
        _handle_signals(signal.SIG_IGN)
        _teardown(local)
    return 0


def _teardown(local: LocalCluster | None) -> None:
    import ray

    if ray.is_initialized():
        with contextlib.suppress(Exception):
            _remove_app(LOCAL_DRAIN_S if local is not None else None)
        if local is not None:
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
        ray.shutdown()
    if local is not None:
        local.shutdown()
        logger.info("local Ray cluster stopped")
