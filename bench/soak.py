"""Soak: N sessions chatting for M minutes while one client floods the server.

Starts `gpuserver serve` (a fake OpenAI-compatible LLM on loopback streaming a 3-sentence
answer at 30 ms per word, espeak, warp) and runs tests/soak.py's scenario: every chatting
session sends chats one after another, interrupts ~30 % of them at a random moment and
drops and resumes its socket between ~10 % of its turns; one abusive client floods invalid
frames and 1 KB pings and comes back whenever it is thrown out. Prints the turns completed,
errors by code, the chatting sessions' received fps (median, p5 over 1 s windows), the
server's RSS over time, and the chats lost (must be 0).

    .venv/bin/python bench/soak.py [--sessions 4] [--minutes 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.receiver import percentile
from gpuserver.webrtc_streamer import restrict_host_addresses
from tests.conftest import start_server
from tests.fakes.openai_server import FakeOpenAI, run_fake_openai
from tests.soak import soak


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    with run_fake_openai(FakeOpenAI(token_delay_s=0.03)) as fake:
        env = {"GPUSERVER_LLM__BASE_URL": fake.base_url, "GPUSERVER_LLM__MODEL": "story"}
        workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
        server = start_server(workdir, "--llm", "openai", "--log-level", "WARNING", env=env)
        try:
            report = await soak(server.ws_url, server.process.pid, args.sessions, args.minutes * 60)
        finally:
            server.stop()
    print(
        f"soak: {args.sessions} sessions x {args.minutes:g} min + 1 abusive client "
        "(fake LLM at 30 ms/word, espeak, warp, VP8 512x512, loopback)"
    )
    print(
        f"chats sent {report.chats_sent}: finished {report.finished}, interrupted "
        f"{report.interrupted}, errors {dict(report.errors) or 0}; lost {report.lost}"
    )
    print(f"sessions resumed after a dropped socket: {report.resumed}")
    print(
        f"abusive client: {report.abuser_sessions} sessions, told "
        f"{dict(report.abuse_errors.most_common())}"
    )
    print(
        f"chatting sessions' video: fps median {percentile(report.fps, 50):.1f}, "
        f"p5 {percentile(report.fps, 5):.1f}"
    )
    rss = ", ".join(f"{t:.0f}s {mb:.0f}" for t, mb in report.rss_mb)
    print(f"server RSS (MiB) over time: {rss}")


if __name__ == "__main__":
    asyncio.run(main())
