"""`gpuserver cluster`: two Ray nodes on loopback, one pretend GPU each, two sessions per GPU.

The cluster (`--local-nodes 2`) runs inside a private network namespace holding only `lo`,
and so do the test's clients (a NamespacedLoop): Ray's own traffic, the WebSockets through
Serve's proxy and the WebRTC media from each replica all stay on loopback. One cluster
serves those tests; each leaves it without sessions, and the last two take node B out and
stop the cluster. The first tests pin the routing policy and the replica's ASGI layer
without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from ray.serve._private.common import RequestMetadata, RequestProtocol, StreamingHTTPRequest
from ray.serve.request_router import PendingRequest
from starlette.testclient import TestClient

from gpuserver.client import AvatarClient
from gpuserver.cluster.replica import Placement, ReplicaIngress
from gpuserver.cluster.router import SESSIONS_REPORT_S, rank_replicas, routing_key
from gpuserver.protocol import BackendReadiness, ReadinessInfo, SessionInfo, encode
from gpuserver.unified_server import build_parser, settings_from_args
from tests.conftest import ServerProcess, start_server
from tests.netns import IsolatedNetwork, NamespacedLoop

SESSIONS_PER_GPU = 2
REFUSAL_GUARD_S = 10.0  # a hang guard, not a timing target
LONG = "This answer keeps the avatar talking for a while after its node is drained. " * 2
READY_LINE = re.compile(r"local Ray cluster at (\S+): .* head node (\w+)")


# --- without a cluster: the command line, the routing policy, the replica's ASGI layer ----


def _options(command: str) -> set[str]:
    subcommands = next(
        action for action in build_parser()._actions if action.dest == "command"
    ).choices
    return set(subcommands[command]._option_string_actions)  # type: ignore[index]


def test_cluster_accepts_every_flag_of_serve() -> None:
    assert _options("serve") <= _options("cluster")


def test_cluster_flags_become_settings_applied_to_every_replica() -> None:
    words = ["cluster", "--local-nodes", "3", "--gpus-per-node", "2", "--sessions-per-gpu", "4",
             "--llm", "echo", "--ice-host", "127.0.0.1", "--max-replicas", "8"]  # fmt: skip
    settings = settings_from_args(build_parser().parse_args(words))
    assert (settings.cluster.local_nodes, settings.cluster.gpus_per_node) == (3, 2)
    assert settings.cluster.address is None and settings.cluster.max_replicas == 8
    assert settings.limits.max_sessions == 4, "a replica's session capacity"
    assert settings.llm.backend == "echo" and settings.webrtc.host_addresses == ["127.0.0.1"]
    remote = build_parser().parse_args(["cluster", "--address", "ray://head:10001"])
    assert settings_from_args(remote).cluster.address == "ray://head:10001"


def test_a_new_session_goes_to_the_least_loaded_replica() -> None:
    loads = {"a": 2, "b": 0, "c": 1}
    assert rank_replicas(["a", "b", "c"], loads, None) == [["b"], ["c"], ["a"]]


def test_a_routing_key_puts_its_replica_first_while_it_runs() -> None:
    loads = {"a": 2, "b": 0}
    assert rank_replicas(["a", "b"], loads, "a") == [["a"], ["b"]]
    assert rank_replicas(["a", "b"], loads, "gone") == [["b"], ["a"]]


def _proxied(query: bytes) -> PendingRequest:
    scope = {"type": "websocket", "path": "/ws", "query_string": query}
    return PendingRequest(
        args=[pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="proxy"))],
        kwargs={},
        metadata=RequestMetadata("r", "i", _request_protocol=RequestProtocol.HTTP),
    )


async def test_the_routing_key_is_the_replica_asked_for_or_the_one_holding_the_session() -> None:
    sessions = lambda: {"s1": "holder"}  # noqa: E731 - the replicas' reports
    assert routing_key(_proxied(b"session_id=s1&replica=abc"), sessions) == "abc"
    assert routing_key(_proxied(b"session_id=s1&resume_key=k"), sessions) == "holder"
    assert routing_key(_proxied(b"session_id=unknown"), sessions) is None
    assert routing_key(_proxied(b"token=t"), sessions) is None
    handle_call = PendingRequest(
        args=[], kwargs={"replica": "abc"}, metadata=RequestMetadata("r", "i")
    )
    assert routing_key(handle_call, sessions) == "abc"


def _ingress_around_a_websocket_app() -> ReplicaIngress:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        ready = BackendReadiness(backend="echo", state="ready")
        greeting = SessionInfo(
            session_id="s1", avatar_id="default", avatars=[], ice_servers=[],
            server_version="t", resume_key="k", resume_grace_s=30,
            readiness=ReadinessInfo(ready=True, llm=ready, tts=ready),
        )  # fmt: skip
        await send({"type": "websocket.send", "text": encode(greeting)})
        await send({"type": "websocket.send", "text": '{"type": "pong", "t": null}'})
        while (message := await receive())["type"] != "websocket.disconnect":
            if message.get("text") == "drain":
                ingress.end_sockets()

    ingress = ReplicaIngress(app, Placement(node_id="node-a", replica="r1"))
    return ingress


def test_the_greeting_names_the_node_and_replica_of_the_session() -> None:
    with TestClient(_ingress_around_a_websocket_app()).websocket_connect("/ws") as ws:
        greeting = ws.receive_json()
        assert (greeting["node_id"], greeting["replica"]) == ("node-a", "r1")
        assert ws.receive_json() == {"type": "pong", "t": None}, "only the greeting changes"


def test_a_drained_replica_closes_its_sockets_with_1012() -> None:
    with TestClient(_ingress_around_a_websocket_app()).websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.receive_json()
        ws.send_text("drain")
        closing = ws.receive()
        assert (closing["type"], closing["code"]) == ("websocket.close", 1012)


# --- a local cluster ---------------------------------------------------------------------------


@dataclass
class Cluster:
    server: ServerProcess  # `gpuserver cluster`, inside `netns`
    netns: IsolatedNetwork
    loop: NamespacedLoop

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def log_dir(self) -> Path:
        return self.server.log_dir

    def ray_address_and_head(self) -> tuple[str, str]:
        found = READY_LINE.search(self.server.log())
        assert found, "the cluster logs its Ray address and head node"
        return found.group(1), found.group(2)

    def inside(self, work: Any, timeout: float = 120) -> Any:
        """Run a coroutine in the namespace, next to the cluster."""
        return self.loop.run(work, timeout)

    def stop(self) -> int:
        return self.server.stop(timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    netns = IsolatedNetwork()
    assert netns.interfaces == ["lo"], "nothing but loopback inside"
    loop = NamespacedLoop(netns)
    try:
        server = start_server(
            tmp_path_factory.mktemp("cluster"),
            "--local-nodes", "2", "--gpus-per-node", "1",
            "--sessions-per-gpu", str(SESSIONS_PER_GPU), "--llm", "echo",
            netns=netns, subcommand="cluster", ready_s=300,
        )  # fmt: skip
        server.wait_for_log("cluster ready on")  # every replica runs, not only the first
        running = Cluster(server, netns, loop)
        yield running
        running.stop()
    finally:
        loop.close()
        for pid in netns.processes():  # only if a test failed before stopping the cluster
            os.kill(pid, signal.SIGKILL)
        netns.close()


@asynccontextmanager
async def sessions(
    url: str, count: int, *, at_once: bool = False
) -> AsyncIterator[list[AvatarClient]]:
    """`count` sessions opened one after the other (or all at once)."""
    clients = [AvatarClient(url) for _ in range(count)]
    try:
        if at_once:
            await asyncio.gather(*(client.connect() for client in clients))
        else:
            for client in clients:
                await client.connect()
        yield clients
    finally:
        await all_closed(clients)


def node_of(client: AvatarClient) -> str:
    return str(client.session["node_id"])


async def refusal(url: str) -> tuple[dict[str, Any], int | None]:
    """Connect; the first message and the close code. Ray would queue a connection to a
    full replica — no greeting, no close, until a slot frees — so an answer at all (within
    a hang guard far above the ~20 ms it takes: bench/cluster.py measures it) is the refusal."""
    async with asyncio.timeout(REFUSAL_GUARD_S), websockets.connect(url) as ws:
        first = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        return first, ws.close_code


async def cluster_api(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/api/cluster", timeout=10)
    response.raise_for_status()
    return response.json()


async def all_closed(clients: list[AvatarClient]) -> None:
    """Close sessions; their slots are free once the router has seen the sockets end."""
    await asyncio.gather(*(client.close() for client in clients))
    await asyncio.sleep(0.3)


@pytest.mark.slow
def test_four_sessions_at_once_spread_two_per_node_and_each_receives_video(
    cluster: Cluster,
) -> None:
    async def scenario() -> None:
        async with sessions(cluster.ws_url, 4, at_once=True) as clients:
            nodes = Counter(node_of(client) for client in clients)
            assert sorted(nodes.values()) == [2, 2], nodes
            assert len({client.session["replica"] for client in clients}) == 2
            await asyncio.gather(*(client.start_media() for client in clients))
            for client in clients:
                assert client.media.video, "every session receives video over WebRTC"

    cluster.inside(scenario())


@pytest.mark.slow
def test_a_full_cluster_answers_busy_at_once_instead_of_queueing(cluster: Cluster) -> None:
    async def scenario() -> None:
        async with sessions(cluster.ws_url, 4):
            first, code = await refusal(cluster.ws_url)
            assert first["type"] == "error" and first["code"] == "busy"
            assert code == 1013

    cluster.inside(scenario())


@pytest.mark.slow
def test_closing_a_session_on_a_node_lets_the_next_land_there(cluster: Cluster) -> None:
    async def scenario() -> None:
        async with sessions(cluster.ws_url, 4) as clients:
            leaving = clients[0]
            await all_closed([leaving])
            async with sessions(cluster.ws_url, 1) as (newcomer,):
                assert node_of(newcomer) == node_of(leaving)

    cluster.inside(scenario())


@pytest.mark.slow
def test_a_dropped_session_resumes_on_the_replica_that_holds_it(cluster: Cluster) -> None:
    def drop(client: AvatarClient) -> None:
        """The network goes: no close frame, the session waits for its client."""
        client._ws.transport.abort()

    async def scenario() -> None:
        async with sessions(cluster.ws_url, 1) as (first,):
            greeting = first.session
            replica = greeting["replica"]
            resume = (
                f"{cluster.ws_url}?session_id={greeting['session_id']}"
                f"&resume_key={greeting['resume_key']}"
            )
            # A second session makes that replica the busier one: only affinity leads back.
            async with sessions(f"{cluster.ws_url}?replica={replica}", 1):
                await asyncio.sleep(3 * SESSIONS_REPORT_S)  # Serve collects where sessions are
                drop(first)
                async with sessions(resume, 1) as (back,):
                    assert back.session["resumed"] and back.session["replica"] == replica
                    drop(back)
                    # Naming the replica needs no report: a session resumes at once.
                    async with sessions(f"{resume}&replica={replica}", 1) as (again,):
                        assert again.session["resumed"] and again.session["replica"] == replica
                # A replica that is gone: the reconnect starts a new session elsewhere.
                async with sessions(f"{resume}&replica=gone", 1) as (elsewhere,):
                    assert elsewhere.session["replica"] != replica
                    assert not elsewhere.session["resumed"]

    cluster.inside(scenario())


@pytest.mark.slow
def test_operators_see_each_replica_its_node_sessions_and_capacity(cluster: Cluster) -> None:
    async def scenario() -> None:
        async with sessions(cluster.ws_url, 2) as clients:
            listed = await cluster_api(cluster.http_url)
            replicas = {entry["replica"]: entry for entry in listed["replicas"]}
            assert len(replicas) == 2 and listed["capacity"] == 2 * SESSIONS_PER_GPU
            assert listed["sessions"] == 2
            for client in clients:
                entry = replicas[client.session["replica"]]
                assert entry["node_id"] == node_of(client) and entry["state"] == "RUNNING"
                assert client.session["session_id"] in entry["session_ids"]
                assert entry["capacity"] == SESSIONS_PER_GPU

    cluster.inside(scenario())


@pytest.mark.slow
def test_health_metrics_and_logs_of_each_replica(cluster: Cluster) -> None:
    async def scenario() -> str:
        async with sessions(cluster.ws_url, 1) as (client,):
            replica = client.session["replica"]
            async with httpx.AsyncClient(base_url=cluster.http_url) as http:
                health = await http.get(f"/healthz?replica={replica}")
                metrics = await http.get(f"/metrics?replica={replica}")
            assert health.headers["x-gpuserver-replica"] == replica
            assert health.headers["x-gpuserver-node"] == node_of(client)
            assert health.json()["sessions"] == 1
            assert metrics.headers["x-gpuserver-replica"] == replica
            assert "gpuserver_sessions 1" in metrics.text
            return str(replica)

    replica = cluster.inside(scenario())
    log = (cluster.log_dir / f"replica-{replica}.log").read_text()
    assert re.search(rf"^\[replica={replica}\] .* session opened", log, re.MULTILINE)


# Ray's GCS API behind `ray drain-node`, what an operator or Ray's autoscaler calls before
# taking a GPU box away; connected ahead of time so the drain lands while a turn speaks.
DRAINER = """
import sys, time
from ray._raylet import GcsClient
from ray.core.generated.autoscaler_pb2 import DrainNodeReason
gcs = GcsClient(address=sys.argv[1])
print("ready", flush=True)
node_id = sys.stdin.readline().strip()
reason = DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
accepted, why = gcs.drain_node(node_id, reason, "test", int(time.time() * 1000) + 2000)
print("accepted" if accepted else why, flush=True)
"""


@asynccontextmanager
async def node_drainer(cluster: Cluster) -> AsyncIterator[Any]:
    address, _ = cluster.ray_address_and_head()
    command = cluster.netns.wrap([sys.executable, "-c", DRAINER, address])
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdin is not None and process.stdout is not None
    stdin, stdout = process.stdin, process.stdout
    try:
        assert await stdout.readline() == b"ready\n"

        async def drain(node_id: str) -> None:
            stdin.write(node_id.encode() + b"\n")
            await stdin.drain()
            assert await stdout.readline() == b"accepted\n"

        yield drain
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.slow
def test_draining_node_b_ends_its_sessions_with_shutting_down_after_their_turn(
    cluster: Cluster,
) -> None:
    _, head = cluster.ray_address_and_head()

    async def scenario() -> None:
        async with sessions(cluster.ws_url, 4) as clients, node_drainer(cluster) as drain:
            on_a = [c for c in clients if node_of(c) == head]
            on_b = [c for c in clients if node_of(c) != head]
            assert len(on_a) == len(on_b) == 2
            speaker = on_b[0]
            await speaker.start_media()
            await speaker.send({"type": "speak", "text": LONG})
            await speaker.wait_for("speech_started")
            await drain(node_of(speaker))
            for client in on_b:
                notice = await client.wait_for("error", timeout=60)
                assert notice["code"] == "shutting_down"
                await asyncio.wait_for(client._ws.wait_closed(), 60)
                assert client._ws.close_code == 1012
            # Told while speaking, the session was closed only once its turn was over.
            told = speaker.arrival_of(speaker.of_type("error")[0])
            stopped = speaker.of_type("speech_stopped")
            assert stopped and stopped[-1]["interrupted"] is False
            assert told < speaker.arrival_of(stopped[-1])
            for client in on_a:
                assert not client.of_type("error"), "node A's sessions go on"
            await all_closed(on_a[:1])
            async with sessions(cluster.ws_url, 1) as (newcomer,):
                assert node_of(newcomer) == head
                first, code = await refusal(cluster.ws_url)
                assert (first["code"], code) == ("busy", 1013), "node B takes no session"

    cluster.inside(scenario(), timeout=240)


@pytest.mark.slow
def test_stopping_the_cluster_drains_its_sessions_and_leaves_no_ray_process(
    cluster: Cluster,
) -> None:
    async def scenario() -> int:
        async with sessions(cluster.ws_url, 1) as (client,):
            stopping = asyncio.create_task(asyncio.to_thread(cluster.stop))
            notice = await client.wait_for("error", timeout=60)
            assert notice["code"] == "shutting_down"
            await asyncio.wait_for(client._ws.wait_closed(), 60)
            assert client._ws.close_code == 1012
            return await stopping

    assert cluster.inside(scenario(), timeout=180) == 0
    deadline = time.monotonic() + 20
    while cluster.netns.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.netns.processes() == [], "every Ray process is gone"
