"""A bystander's video and pings while one hostile client floods the server, flood by flood.

Starts `gpuserver serve` (echo LLM, espeak, warp, VP8 512x512, a token) on loopback and one
bystander that speaks without pause and pings every 200 ms. Each phase runs one attacker
for --seconds; the first phase has none (the baseline of the same run):
  invalid      60 KB frames that are not JSON, as fast as the socket takes them (reconnects)
  sdp-bomb     ~58 KB offers of codecs x feedback lines (once 7.7 s of frozen loop each)
  slow-reader  a socket that never reads while it sends pings carrying 30 KB each
  churn        connect -> greeting -> drop, as fast as possible
  png-bomb     4 uploads at a time of a 30000x30000 PNG header (2.7 GB if decoded)
  same-id      6 uploads at a time of a real portrait under one id (each one prepared)
Prints, per phase, the bystander's received fps (median, p5 of 1 s windows), its ping
round trip p50/p95 and what the attacker was answered.

    .venv/bin/python bench/floods.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.receiver import percentile, window_fps
from gpuserver.avatar_manager import bundled_default_source
from gpuserver.client import AvatarClient
from gpuserver.webrtc_streamer import restrict_host_addresses
from tests.conftest import ServerProcess, start_server
from tests.test_avatar_manager import png_bomb
from tests.test_sdp import codec_feedback_bomb

TOKEN = "bench-floods"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
LONG = "The bystander keeps talking about the weather, the sea and the mountains. " * 3

Attack = Callable[[ServerProcess, Counter[str]], Awaitable[None]]


async def socket_flood(server: ServerProcess, told: Counter[str], frame: str) -> None:
    """Send `frame` as fast as the socket takes it; count the answers; come back when closed."""
    while True:
        try:
            async with websockets.connect(server.ws_url, additional_headers=HEADERS) as ws:
                told["connections"] += 1

                async def read(ws: websockets.ClientConnection = ws) -> None:
                    async for message in ws:
                        body = json.loads(message)
                        if body["type"] != "session":
                            told[body.get("code") or body["type"]] += 1

                reader = asyncio.create_task(read())
                try:
                    while True:
                        await ws.send(frame)
                        await asyncio.sleep(0)
                finally:
                    reader.cancel()
        except websockets.ConnectionClosed as closed:
            told[f"closed {closed.rcvd.code if closed.rcvd else 'abruptly'}"] += 1
        except OSError:
            told["refused"] += 1
            await asyncio.sleep(0.1)


async def invalid(server: ServerProcess, told: Counter[str]) -> None:
    await socket_flood(server, told, "x" * 60_000)


async def sdp_bomb(server: ServerProcess, told: Counter[str]) -> None:
    frame = json.dumps({"type": "webrtc_offer", "sdp": codec_feedback_bomb()})
    await socket_flood(server, told, frame)


async def slow_reader(server: ServerProcess, told: Counter[str]) -> None:
    big = json.dumps({"type": "ping", "t": "x" * 30_000})
    while True:
        # max_queue=1: the library stops reading, TCP fills: a client that never reads.
        async with websockets.connect(server.ws_url, additional_headers=HEADERS, max_queue=1) as ws:
            told["connections"] += 1
            try:
                while True:
                    await ws.send(big)
            except websockets.ConnectionClosed as closed:
                told[f"closed {closed.rcvd.code if closed.rcvd else 'abruptly'}"] += 1
            finally:
                ws.transport.abort()  # it reads nothing: a closing handshake would never end


async def churn(server: ServerProcess, told: Counter[str]) -> None:
    while True:
        async with websockets.connect(server.ws_url, additional_headers=HEADERS) as ws:
            told[f"connected, greeted with {json.loads(await ws.recv())['type']}"] += 1


async def uploads(server: ServerProcess, told: Counter[str], body: bytes, parallel: int) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, headers=HEADERS, timeout=60) as http:

        async def upload() -> None:
            while True:
                files = {"file": ("upload.png", body)}
                response = await http.post("/api/avatars", files=files, data={"id": "flood"})
                last = response.text.splitlines()[-1] if response.status_code == 200 else "{}"
                stage = json.loads(last).get("stage", "")
                told[f"{response.status_code} {stage}".strip()] += 1

        await asyncio.gather(*(upload() for _ in range(parallel)))


async def png_bombs(server: ServerProcess, told: Counter[str]) -> None:
    await uploads(server, told, png_bomb(), parallel=4)


async def same_id(server: ServerProcess, told: Counter[str]) -> None:
    await uploads(server, told, bundled_default_source().read_bytes(), parallel=6)


ATTACKS: dict[str, Attack | None] = {
    "none": None,
    "invalid": invalid,
    "sdp-bomb": sdp_bomb,
    "slow-reader": slow_reader,
    "churn": churn,
    "png-bomb": png_bombs,
    "same-id": same_id,
}


async def keep_speaking(client: AvatarClient) -> None:
    while True:
        count = len(client.messages)
        await client.send({"type": "speak", "text": LONG})
        await client.wait_for("speech_stopped", after=count, timeout=120)


async def ping_rtts(client: AvatarClient, rtts: list[float]) -> None:
    while True:
        count = len(client.messages)
        sent = time.perf_counter()
        await client.send({"type": "ping", "t": count})
        await client.wait_for("pong", after=count, timeout=60)
        rtts.append((time.perf_counter() - sent) * 1000)
        await asyncio.sleep(0.2)


async def phase(
    server: ServerProcess, bystander: AvatarClient, attack: Attack | None, seconds: float
) -> tuple[list[float], list[float], Counter[str]]:
    told: Counter[str] = Counter()
    rtts: list[float] = []
    tasks = [asyncio.create_task(ping_rtts(bystander, rtts))]
    if attack is not None:
        tasks.append(asyncio.create_task(attack(server, told)))
    start = time.monotonic()
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return window_fps(bystander, start, time.monotonic()), rtts, told


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase")
    parser.add_argument("--phases", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    workdir = Path(tempfile.mkdtemp(prefix="bench-floods-"))
    server = start_server(workdir, "--llm", "echo", "--token", TOKEN, "--log-level", "WARNING")
    rows = []
    try:
        async with AvatarClient(server.ws_url, token=TOKEN) as bystander:
            await bystander.start_media()
            speaking = asyncio.create_task(keep_speaking(bystander))
            try:
                for name in args.phases:
                    fps, rtts, told = await phase(server, bystander, ATTACKS[name], args.seconds)
                    rows.append((name, fps, rtts, told))
            finally:
                speaking.cancel()
                await asyncio.gather(speaking, return_exceptions=True)
    finally:
        server.stop()
    print(
        f"bystander speaking through each flood, {args.seconds:g} s per phase "
        "(echo LLM, espeak, warp, VP8 512x512, loopback, 2 cores shared with the attacker)"
    )
    print(f"{'flood':<12} {'fps med':>7} {'p5':>5} {'ping p50':>9} {'p95':>7}  attacker was told")
    for name, fps, rtts, told in rows:
        answers = ", ".join(f"{k} x{v}" for k, v in told.most_common(6)) or "-"
        print(
            f"{name:<12} {percentile(fps, 50):7.1f} {percentile(fps, 5):5.1f} "
            f"{percentile(rtts, 50):7.1f}ms {percentile(rtts, 95):5.1f}ms  {answers}"
        )


if __name__ == "__main__":
    asyncio.run(main())
