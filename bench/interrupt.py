"""Interrupt -> closed mouth on screen: how long a cut takes to show at the receiver.

Starts `gpuserver serve` (echo LLM, espeak, warp, VP8 512x512) on loopback, connects N aiortc
clients and, in each, repeatedly speaks a long sentence and interrupts it after a random
0.6-1.4 s — from the very start of the session, when VP8 is still ramping its bitrate.
Per interrupt it reports, from the moment `interrupt` is sent:
  - audio: the RTP arrival of the first audio frame that decodes silent;
  - picture: the first decoded video frame whose mouth looks closed — its mouth region
    within a threshold of the avatar's idle portrait — and stays so for 10 frames (0.4 s).
Closed: nearer the idle picture (calibrated per session, before the first speech) than the
speech of the last half second before the interrupt (bench/receiver.py).

    .venv/bin/python bench/interrupt.py [--sessions 1 4] [--interrupts 20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.receiver import ClosedMouth, first_silent_audio, percentile
from gpuserver.client import AvatarClient
from tests.conftest import ServerProcess, start_server

LONG = (
    "This sentence keeps the avatar talking for quite a while, so that we can cut it "
    "anywhere in the middle of a word and watch how quickly the mouth closes again."
)


async def session(
    server: ServerProcess, interrupts: int, seed: int
) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    picture, audio = [], []
    mouth = ClosedMouth()
    async with AvatarClient(server.ws_url, keep_video=True) as client:
        await client.start_media()
        await asyncio.sleep(0.6)
        mouth.calibrate(client.media.video[-8:])
        for _ in range(interrupts):
            count = len(client.messages)
            await client.send({"type": "speak", "text": LONG})
            await client.wait_for("speech_started", after=count, timeout=30)
            await asyncio.sleep(rng.uniform(0.6, 1.4))
            cut = time.monotonic()
            await client.send({"type": "interrupt"})
            await asyncio.sleep(1.5)
            if (closed := mouth.first_closed(client.media.video, cut)) is not None:
                picture.append((closed - cut) * 1000)
            if (quiet := first_silent_audio(client, cut)) is not None:
                audio.append((quiet - cut) * 1000)
    return picture, audio


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--interrupts", type=int, default=20, help="per N, over all sessions")
    args = parser.parse_args()
    from gpuserver.webrtc_streamer import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])
    print("interrupt -> first closed-mouth frame decoded at the receiver, and first silent audio")
    print("frame (RTP arrival); warp engine, espeak, echo LLM, VP8 512x512, loopback")
    header = f"{'N':>3} {'picture p50':>12} {'p95':>7} {'max':>7} {'audio p50':>10} {'p95':>7}"
    print(f"{header} {'n':>4}")
    for n in args.sessions:
        workdir = Path(tempfile.mkdtemp(prefix="bench-interrupt-"))
        server = start_server(workdir, "--llm", "echo", "--log-level", "WARNING")
        try:
            per = max(1, args.interrupts // n)
            results = await asyncio.gather(*(session(server, per, seed) for seed in range(n)))
        finally:
            server.stop()
        picture = [v for p, _ in results for v in p]
        audio = [v for _, a in results for v in a]
        missed = n * per - len(picture)
        print(
            f"{n:>3} {percentile(picture, 50):>9.0f} ms {percentile(picture, 95):>4.0f} ms "
            f"{max(picture, default=float('nan')):>4.0f} ms {percentile(audio, 50):>7.0f} ms "
            f"{percentile(audio, 95):>4.0f} ms {len(picture):>4}"
            + (f"  ({missed} never looked closed within 1.5 s)" if missed else ""),
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
