"""Concurrent speaking sessions on one server: fps held, CPU per session, speak -> first frame.

Starts `gpuserver serve` (echo LLM, espeak, warp) on loopback in a child process, then for
each N connects N aiortc clients from this process and:
  1. latency: each session speaks short sentences; time from sending `speak` to the RTP
     arrival of the first speaking video frame (the frame paired with the first loud audio);
  2. steady state: all N speak for --seconds; per-session received fps in 1 s windows
     (median, p5) and the server's CPU % per session, against an idle baseline (all N
     connected, nobody speaking) measured the same way just before.

With --llm-phases it measures instead what the embedded LLM costs the media path: 2 sessions
speak while (a) the `local` LLM loads (from server start until /healthz reports it ready, a
`chat` from a third, text-only client waiting for it) and (b) that client's chats are being
answered one after another; baseline: the same 2 sessions on an `--llm echo` server.

    .venv/bin/python bench/sessions.py [--sessions 1 2 4 6] [--seconds 20]
    .venv/bin/python bench/sessions.py --llm-phases [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.receiver import first_speaking_frame, window_fps
from gpuserver.client import AvatarClient
from gpuserver.webrtc_streamer import restrict_host_addresses
from tests.conftest import ServerProcess, start_server

SHORT = "Hello, how can I help you today?"
LONG = (
    "Welcome to the benchmark. I will keep talking for a while so that we can measure how "
    "many frames per second every session receives while all of them speak at once. "
    "Each frame carries exactly forty milliseconds of my voice, and the server sends one "
    "frame and its audio on every tick of a single media clock. If the machine keeps up, "
    "every session should hold twenty five frames per second from the first word to the "
    "last, with lips that stay on the voice. This paragraph is long enough to last for "
    "more than twenty seconds when it is spoken at a normal pace by the speech engine, "
    "so the measurement window is filled with real speech from start to finish. "
) * 2


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_latency(client: AvatarClient, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        sent = time.monotonic()
        count = len(client.messages)
        await client.send({"type": "speak", "text": SHORT})
        await client.wait_for("speech_started", after=count, timeout=30)
        arrival = None
        for _ in range(100):
            await asyncio.sleep(0.05)
            if (arrival := first_speaking_frame(client, sent)) is not None:
                break
        if arrival is not None:
            samples.append((arrival - sent) * 1000)
        await client.send({"type": "interrupt"})
        await client.wait_for("speech_stopped", after=count, timeout=30)
        await asyncio.sleep(0.3)
    return samples


async def measure_cpu(server: ServerProcess, seconds: float) -> float:
    before, t0 = cpu_seconds(server.process.pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(server.process.pid) - before) / (time.monotonic() - t0) * 100


async def run_n(server: ServerProcess, n: int, seconds: float, repeats: int) -> dict:
    clients = [AvatarClient(server.ws_url) for _ in range(n)]
    for client in clients:
        await client.connect()
        await client.start_media()
    await asyncio.sleep(1.0)
    idle_cpu = await measure_cpu(server, 3.0)
    per_client = await asyncio.gather(*(measure_latency(c, repeats) for c in clients))
    latencies = [sample for samples in per_client for sample in samples]

    for client in clients:
        await client.send({"type": "speak", "text": LONG})
    await asyncio.gather(*(c.wait_for("speech_started", timeout=30) for c in clients))
    await asyncio.sleep(1.0)
    start = time.monotonic()
    speaking_cpu = await measure_cpu(server, seconds)
    end = time.monotonic()
    fps = [value for c in clients for value in window_fps(c, start, end)]
    ended_early = any(
        at < end and m.get("type") == "speech_stopped" and not m.get("interrupted")
        for c in clients
        for at, m in c.messages
        if at >= start
    )
    for client in clients:
        await client.close()
    return {
        "n": n,
        "fps_median": float(np.median(fps)),
        "fps_p5": float(np.percentile(fps, 5)),
        "cpu_per_session": speaking_cpu / n,
        "idle_cpu_per_session": idle_cpu / n,
        "latency_p50": float(np.percentile(latencies, 50)) if latencies else float("nan"),
        "latency_p95": float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "latency_samples": len(latencies),
        "spoke_throughout": not ended_early,
    }


async def speaking_clients(server: ServerProcess, n: int) -> list[AvatarClient]:
    """N sessions speaking LONG twice over (minutes of speech), from the first tick."""
    clients = [AvatarClient(server.ws_url) for _ in range(n)]
    for client in clients:
        await client.connect()
        await client.start_media()
        await client.send({"type": "speak", "text": LONG})
        await client.send({"type": "speak", "text": LONG, "queue": True})
    await asyncio.gather(*(c.wait_for("speech_started", timeout=30) for c in clients))
    return clients


def fps_row(phase: str, clients: list[AvatarClient], start: float, end: float) -> str:
    fps = [value for c in clients for value in window_fps(c, start, end)]
    if not fps:
        return f"{phase:<34} {'-':>8} {'-':>7} {end - start:>7.1f} s"
    return f"{phase:<34} {np.median(fps):>8.1f} {np.percentile(fps, 5):>7.1f} {end - start:>7.1f} s"


async def wait_until_llm_ready(server: ServerProcess, deadline: float) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(10_000):
            health = (await http.get(f"{server.http_url}/healthz", timeout=10)).json()
            if health["llm"]["ready"] or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)


async def chat_until(client: AvatarClient, end: float) -> int:
    """Chats one after another until `end`; returns how many were answered."""
    answered = 0
    while time.monotonic() < end:
        count = len(client.messages)
        await client.send({"type": "chat", "text": "What is the capital of France?"})
        answer = await client.wait_for("text", timeout=120, after=count)
        answered += bool(answer.get("content"))
    return answered


async def llm_phases(workdir: Path, seconds: float, load_cap: float) -> None:
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()}, 2 sessions speaking")
    print(f"{'phase':<34} {'fps med':>8} {'fps p5':>7} {'window':>9}")
    echo = start_server(workdir / "echo", "--llm", "echo", "--log-level", "WARNING")
    try:
        clients = await speaking_clients(echo, 2)
        await asyncio.sleep(1.0)
        start = time.monotonic()
        await asyncio.sleep(seconds)
        print(fps_row("--llm echo (baseline)", clients, start, time.monotonic()), flush=True)
        for client in clients:
            await client.close()
    finally:
        echo.stop()

    server = start_server(workdir / "local", "--llm", "local", "--log-level", "INFO")
    started = time.monotonic()  # the model started loading with the server, just before
    try:
        clients = await speaking_clients(server, 2)
        texter = AvatarClient(server.ws_url)
        await texter.connect()
        await texter.send({"type": "chat", "text": "Hello!"})  # waits for the model
        start = time.monotonic()
        await wait_until_llm_ready(server, started + load_cap)
        end = time.monotonic()
        print(fps_row("--llm local, loading (+ a chat)", clients, start, end), flush=True)
        print(f"  LLM ready {end - started:.1f} s after the server was healthy")
        await texter.wait_for("text", timeout=120)
        start = time.monotonic()
        answered = await chat_until(texter, start + seconds)
        end = time.monotonic()
        print(fps_row("--llm local, answering chats", clients, start, end), flush=True)
        print(f"  {answered} chats answered")
        for client in [*clients, texter]:
            await client.close()
    finally:
        server.stop()
    print(f"load average after: {os.getloadavg()}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=5, help="latency samples per session")
    parser.add_argument("--llm-phases", action="store_true", help="fps while the LLM works")
    parser.add_argument(
        "--load-cap", type=float, default=90.0, help="longest LLM loading phase, seconds"
    )
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    workdir = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    if args.llm_phases:
        await llm_phases(workdir, args.seconds, args.load_cap)
        return
    server = start_server(
        workdir, "--llm", "echo", "--max-sessions", "32", "--log-level", "WARNING"
    )
    print(f"server pid {server.process.pid}, {os.cpu_count()} cores, warp engine, VP8 512x512")
    header = (
        f"{'N':>3} {'fps med':>8} {'fps p5':>7} {'CPU%/sess':>10} {'idle CPU%':>10} "
        f"{'speak->frame p50':>17} {'p95':>7} {'samples':>8}"
    )
    print(header)
    try:
        for n in args.sessions:
            r = await run_n(server, n, args.seconds, args.repeats)
            print(
                f"{r['n']:>3} {r['fps_median']:>8.1f} {r['fps_p5']:>7.1f} "
                f"{r['cpu_per_session']:>10.1f} {r['idle_cpu_per_session']:>10.1f} "
                f"{r['latency_p50']:>14.0f} ms {r['latency_p95']:>4.0f} ms "
                f"{r['latency_samples']:>8}"
                + ("" if r["spoke_throughout"] else "  (speech ended early)"),
                flush=True,
            )
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
