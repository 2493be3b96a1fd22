"""A soak: sessions chatting for minutes while one client abuses the server.

Shared by tests/test_soak.py (30 s) and bench/soak.py (minutes, with the figures printed).
Every chatting session sends `chat`s one after another against a fake OpenAI-compatible
LLM, interrupts some of them at a random moment, and now and then drops its socket between
turns and resumes its session. One abusive client floods invalid frames and pings as fast
as it can, and reconnects whenever it is thrown out. The report counts every chat sent and
what it came to (finished, interrupted, or an error): nothing may be lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import websockets

from gpuserver.client import AvatarClient

QUESTIONS = (
    "Tell me about your products.",
    "What is the weather like?",
    "Can you help me place an order?",
    "Who are you?",
)


@dataclass
class SoakReport:
    chats_sent: int = 0
    finished: int = 0
    interrupted: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # codes the chatting sessions got
    abuse_errors: Counter[str] = field(default_factory=Counter)  # codes the abuser got
    abuser_sessions: int = 0
    resumed: int = 0
    fps: list[float] = field(default_factory=list)  # chatting sessions, 1 s windows
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)

    @property
    def lost(self) -> int:
        """Chats that got neither their turn's `metrics` nor an `error`."""
        return self.chats_sent - self.finished - self.interrupted - sum(self.errors.values())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def chatting(url: str, seconds: float, seed: int, report: SoakReport) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    async with AvatarClient(url) as client:
        await client.start_media()
        started = time.monotonic()
        while time.monotonic() < deadline:
            count = len(client.messages)
            ref = await client.send({"type": "chat", "text": rng.choice(QUESTIONS)})
            report.chats_sent += 1
            if rng.random() < 0.3:
                await asyncio.sleep(rng.uniform(0.3, 2.0))
                await client.send({"type": "interrupt"})
            about_it = lambda message, ref=ref: message.get("ref") == ref  # noqa: E731
            outcome = await client.wait_for(
                ("metrics", "error"), after=count, where=about_it, timeout=60
            )
            if outcome["type"] == "error":
                report.errors[outcome["code"]] += 1
            elif outcome["interrupted"]:
                report.interrupted += 1
            else:
                report.finished += 1
            if rng.random() < 0.1:  # the network drops between turns: resume the session
                greeting = await client.reconnect()
                report.resumed += greeting["resumed"]
            await asyncio.sleep(rng.uniform(0.1, 0.5))
        arrivals = np.array([frame.arrival for frame in client.media.video])
        edges = np.arange(started, time.monotonic() - 1.0, 1.0)
        report.fps += [float(((arrivals >= t) & (arrivals < t + 1)).sum()) for t in edges]


async def abusing(url: str, seconds: float, report: SoakReport) -> None:
    """Garbage and pings as fast as the socket takes them; back in when thrown out."""
    deadline = time.monotonic() + seconds
    frames = ("{oops", json.dumps({"type": "fly"}), json.dumps({"type": "ping", "t": "x" * 1000}))
    while time.monotonic() < deadline:
        client = AvatarClient(url)
        try:
            await client.connect()
            report.abuser_sessions += 1
            n = 0
            while time.monotonic() < deadline:
                await client.send_raw(frames[n % len(frames)])
                n += 1
                if n % 50 == 0:
                    await asyncio.sleep(0)  # let the loop breathe (the server shares it in tests)
        except (ConnectionRefusedError, OSError, websockets.ConnectionClosed):
            pass  # thrown out (rate limited, busy): come back
        finally:
            report.abuse_errors.update(e["code"] for e in client.of_type("error"))
            await client.close()
        await asyncio.sleep(0.2)


async def soak(url: str, pid: int, sessions: int, seconds: float, seed: int = 0) -> SoakReport:
    report = SoakReport()
    started = time.monotonic()

    async def sample_rss() -> None:
        while True:
            report.rss_mb.append((time.monotonic() - started, rss_mb(pid)))
            await asyncio.sleep(max(1.0, seconds / 20))

    sampler = asyncio.create_task(sample_rss())
    try:
        await asyncio.gather(
            *(chatting(url, seconds, seed + n, report) for n in range(sessions)),
            abusing(url, seconds, report),
        )
    finally:
        sampler.cancel()
    report.rss_mb.append((time.monotonic() - started, rss_mb(pid)))
    return report
