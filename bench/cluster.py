"""Sessions through the Ray Serve ingress vs straight to one server: latency and placement rate.

Inside a private network namespace (loopback only; root, like the browser tests) it starts
  - direct:  `gpuserver serve --max-sessions 16`;
  - ingress: `gpuserver cluster --local-nodes 2 --sessions-per-gpu 8` (two replicas behind
    Serve's proxy, the same app),
both with the echo LLM and the warp engine, then measures each from a loop inside the
namespace, alternating rounds so both see the same machine load:
  1. WebSocket connect -> `session` greeting (sequential sessions), p50/p95;
  2. connect -> first decoded video frame (greeting, offer/answer, ICE, first frame);
  3. ping -> pong on an open session: the hop every message of a session pays;
  4. placement: --burst sessions connecting at once -> all greeted, sessions per second;
  5. with those sessions filling it: connect -> `busy` + close 1013.
The added latency of the proxy hop is ingress - direct.

    sudo .venv/bin/python bench/cluster.py [--rounds 2] [--connects 20] [--media 5]
                                           [--pings 100] [--burst 16] [--refusals 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuserver.client import AvatarClient
from gpuserver.webrtc_streamer import restrict_host_addresses
from tests.conftest import ServerProcess, start_server
from tests.netns import IsolatedNetwork, NamespacedLoop

Samples = dict[str, list[float]]


async def greeting_ms(url: str) -> float:
    client = AvatarClient(url)
    started = time.monotonic()
    try:
        await client.connect()
        return (time.monotonic() - started) * 1000
    finally:
        await client.close()


async def first_frame_ms(url: str) -> float:
    client = AvatarClient(url)
    started = time.monotonic()
    try:
        await client.connect()
        await client.start_media()
        return (client.media.video[0].arrival - started) * 1000
    finally:
        await client.close()


async def pings_ms(url: str, count: int) -> list[float]:
    async with AvatarClient(url) as client:
        samples = []
        for n in range(count):
            sent = time.monotonic()
            after = len(client.messages)
            await client.send({"type": "ping", "t": n})
            pong = await client.wait_for("pong", after=after, where=lambda m, n=n: m["t"] == n)
            samples.append((client.arrival_of(pong) - sent) * 1000)
        return samples


async def refused_ms(url: str) -> float:
    """A connection to a full server: connect -> `busy` + close 1013."""
    started = time.monotonic()
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["code"] == "busy"
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1013
    return (time.monotonic() - started) * 1000


async def fill_then_refuse(url: str, burst: int, refusals: int) -> tuple[float, list[float]]:
    """`burst` sessions at once (they fill the server): sessions placed per second, then
    how long a connection beyond them takes to be refused."""
    clients = [AvatarClient(url) for _ in range(burst)]
    started = time.monotonic()
    try:
        greetings = await asyncio.gather(*(client.connect() for client in clients))
        placed_per_s = burst / (time.monotonic() - started)
        assert all(g["type"] == "session" for g in greetings)
        return placed_per_s, [await refused_ms(url) for _ in range(refusals)]
    finally:
        await asyncio.gather(*(client.close() for client in clients))
        await asyncio.sleep(0.5)  # let the sockets close before the next round


async def measure(url: str, args: argparse.Namespace, samples: Samples) -> None:
    print(f"  {url}: greetings", end="", flush=True)
    for _ in range(args.connects):
        samples["greeting"].append(await greeting_ms(url))
    print(", first frames", end="", flush=True)
    for _ in range(args.media):
        samples["first_frame"].append(await first_frame_ms(url))
    print(", pings", end="", flush=True)
    samples["ping"].extend(await pings_ms(url, args.pings))
    print(", a burst", flush=True)
    placed_per_s, refusals = await fill_then_refuse(url, args.burst, args.refusals)
    samples["placed_per_s"].append(placed_per_s)
    samples["busy"].extend(refusals)


def percentiles(values: list[float]) -> tuple[float, float]:
    p50, p95 = np.percentile(values, [50, 95])
    return float(p50), float(p95)


def report(direct: Samples, ingress: Samples) -> None:
    print(f"{'':>22} {'direct p50/p95':>16} {'ingress p50/p95':>17} {'added p50/p95':>15}")
    for name, label in (
        ("greeting", "connect -> greeting"),
        ("first_frame", "connect -> 1st frame"),
        ("ping", "ping -> pong"),
        ("busy", "full: connect -> busy"),
    ):
        d50, d95 = percentiles(direct[name])
        i50, i95 = percentiles(ingress[name])
        print(
            f"{label:>22} {d50:>7.1f}/{d95:>6.1f} ms {i50:>7.1f}/{i95:>6.1f} ms "
            f"{i50 - d50:>6.1f}/{i95 - d95:>5.1f} ms  (n={len(ingress[name])})"
        )
    print(
        f"{'sessions placed /s':>22} {np.median(direct['placed_per_s']):>16.0f} "
        f"{np.median(ingress['placed_per_s']):>17.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connects", type=int, default=20)
    parser.add_argument("--media", type=int, default=5)
    parser.add_argument("--pings", type=int, default=100)
    parser.add_argument("--burst", type=int, default=16, help="= the capacity of both")
    parser.add_argument("--refusals", type=int, default=10)
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    echo = ("--llm", "echo")
    # Every benchmark session comes from 127.0.0.1.
    env = {"GPUSERVER_LIMITS__MAX_SESSIONS_PER_ADDRESS": "64"}
    netns = IsolatedNetwork()
    loop = NamespacedLoop(netns)
    servers: list[ServerProcess] = []
    try:
        servers.append(
            start_server(workdir / "direct", *echo, "--max-sessions", "16", env=env, netns=netns)
        )
        cluster = ("--local-nodes", "2", "--sessions-per-gpu", "8")  # one replica per node
        servers.append(
            start_server(
                workdir / "ingress",
                *echo,
                *cluster,
                env=env,
                netns=netns,
                subcommand="cluster",
                ready_s=300,
            )
        )
        servers[1].wait_for_log("cluster ready on")
        names = ("greeting", "first_frame", "ping", "busy", "placed_per_s")
        direct: Samples = {name: [] for name in names}
        ingress: Samples = {name: [] for name in direct}
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
        for _ in range(args.rounds):
            loop.run(measure(servers[0].ws_url, args, direct), timeout=600)
            loop.run(measure(servers[1].ws_url, args, ingress), timeout=600)
        report(direct, ingress)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        for server in reversed(servers):
            server.stop(timeout=120)
        loop.close()
        netns.close()


if __name__ == "__main__":
    main()
