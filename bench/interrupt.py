"""Interrupt -> closed mouth on screen: how long a cut takes to show at the receiver.

Starts `gpuserver serve` (echo LLM, espeak, warp, VP8 512x512) on loopback, connects N aiortc
clients and, in each, repeatedly speaks a long sentence and interrupts it after a random
0.6-1.4 s — from the very start of the session, when VP8 is still ramping its bitrate.
Per interrupt it reports, from the moment `interrupt` is sent:
  - audio: the RTP arrival of the first audio frame that decodes silent;
  - picture: the first decoded video frame whose mouth looks closed — its mouth region
    within a threshold of the avatar's idle portrait — and stays so for 3 frames.
The threshold is calibrated per session on idle frames received before the first speech.

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

import cv2
import numpy as np
from av import VideoFrame

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuserver.avatar_manager import bundled_default_source
from gpuserver.client import AvatarClient
from tests.conftest import ServerProcess, start_server

MOUTH = (slice(122, 168), slice(188, 258))  # the default avatar's mouth, with a margin
SILENT_RMS = 50.0
CLOSED_FRAMES = 3
LONG = (
    "This sentence keeps the avatar talking for quite a while, so that we can cut it "
    "anywhere in the middle of a word and watch how quickly the mouth closes again."
)


def idle_mouth() -> np.ndarray:
    """The mouth region of the idle portrait, as the receiver's decoder would show it."""
    bgr = cv2.imread(str(bundled_default_source()))
    luma = VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")
    return luma.to_ndarray(format="gray")[MOUTH].astype(np.float32)


def mouth_error(luma: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(luma[MOUTH].astype(np.float32) - reference).mean())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def session(
    server: ServerProcess, interrupts: int, reference: np.ndarray, seed: int
) -> tuple[list[float], list[float], float]:
    rng = random.Random(seed)
    picture, audio = [], []
    async with AvatarClient(server.ws_url, keep_video=True) as client:
        await client.start_media()
        await asyncio.sleep(0.6)
        idle = [mouth_error(f.luma, reference) for f in client.media.video[-8:]]  # type: ignore[arg-type]
        threshold = max(2.0 * max(idle), 1.5)
        for _ in range(interrupts):
            count = len(client.messages)
            await client.send({"type": "speak", "text": LONG})
            await client.wait_for("speech_started", after=count, timeout=30)
            await asyncio.sleep(rng.uniform(0.6, 1.4))
            cut = time.monotonic()
            await client.send({"type": "interrupt"})
            await asyncio.sleep(1.5)
            after = [f for f in client.media.video if f.arrival > cut]
            closed = [mouth_error(f.luma, reference) <= threshold for f in after]  # type: ignore[arg-type]
            for i in range(len(after) - CLOSED_FRAMES + 1):
                if all(closed[i : i + CLOSED_FRAMES]):
                    picture.append((after[i].arrival - cut) * 1000)
                    break
            arrivals = client.media.audio_rtp_arrival
            quiet = (
                arrivals.get(round(a.media_time, 4), a.arrival)
                for a in client.media.audio
                if a.arrival > cut and a.rms < SILENT_RMS
            )
            if (first_quiet := next(quiet, None)) is not None:
                audio.append((first_quiet - cut) * 1000)
    return picture, audio, threshold


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--interrupts", type=int, default=20, help="per N, over all sessions")
    args = parser.parse_args()
    from gpuserver.webrtc_streamer import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])
    reference = idle_mouth()
    print("interrupt -> first closed-mouth frame decoded at the receiver, and first silent audio")
    print("frame (RTP arrival); warp engine, espeak, echo LLM, VP8 512x512, loopback")
    header = f"{'N':>3} {'picture p50':>12} {'p95':>7} {'max':>7} {'audio p50':>10} {'p95':>7}"
    print(f"{header} {'n':>4}")
    for n in args.sessions:
        workdir = Path(tempfile.mkdtemp(prefix="bench-interrupt-"))
        server = start_server(workdir, "--llm", "echo", "--log-level", "WARNING")
        try:
            per = max(1, args.interrupts // n)
            results = await asyncio.gather(
                *(session(server, per, reference, seed) for seed in range(n))
            )
        finally:
            server.stop()
        picture = [v for p, _, _ in results for v in p]
        audio = [v for _, a, _ in results for v in a]
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
