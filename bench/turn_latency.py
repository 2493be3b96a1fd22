"""Turn latency: `chat` -> first LLM token -> first TTS audio -> first speaking frame.

Runs `gpuserver serve` on loopback against (a) a fake OpenAI-compatible server streaming a
three-sentence answer at --token-delay per word, and (b) the embedded `local` LLM. Each is
measured with sentence streaming (the default) and, as the baseline, with
`llm.stream_to_speech = false` (speech waits for the whole answer, like a pipeline that
renders whole answers). Every turn is interrupted once speech has started; the figures come
from the server's `metrics` message (ms since the `chat` arrived).

    .venv/bin/python bench/turn_latency.py [--turns 20] [--local-turns 10] [--token-delay 0.03]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuserver.client import AvatarClient
from gpuserver.webrtc_streamer import restrict_host_addresses
from tests.conftest import start_server
from tests.fakes.openai_server import FakeOpenAI, run_fake_openai

FIELDS = ("llm_first_token_ms", "tts_first_audio_ms", "first_frame_ms")
QUESTION = "Please introduce yourself in three sentences."


async def run_turns(ws_url: str, turns: int) -> list[dict]:
    results = []
    async with AvatarClient(ws_url) as client:
        await client.start_media()
        for _ in range(turns):
            seen = len(client.messages)
            await client.send({"type": "chat", "text": QUESTION})
            await client.wait_for("speech_started", after=seen, timeout=120)
            await client.send({"type": "interrupt"})
            results.append(await client.wait_for("metrics", after=seen, timeout=30))
            await asyncio.sleep(0.2)
    return results


def measure(workdir: Path, turns: int, env: dict[str, str], *args: str) -> list[dict]:
    server = start_server(workdir, *args, "--log-level", "WARNING", env=env)
    try:
        # The local LLM loads in the background: measure turns, not loading.
        while not httpx.get(f"{server.http_url}/healthz").json()["llm"]["ready"]:
            time.sleep(0.5)
        return asyncio.run(run_turns(server.ws_url, turns))
    finally:
        server.stop()


def report(label: str, results: list[dict]) -> float:
    print(f"[{label}] n={len(results)}")
    for field in FIELDS:
        values = [r[field] for r in results if r[field] is not None]
        p50, p95 = np.percentile(values, [50, 95])
        print(f"  {field:<22} p50 {p50:7.0f} ms   p95 {p95:7.0f} ms")
    gap = [r["first_frame_ms"] - r["llm_first_token_ms"] for r in results]
    p50, p95 = np.percentile(gap, [50, 95])
    print(f"  {'first token -> frame':<22} p50 {p50:7.0f} ms   p95 {p95:7.0f} ms")
    return float(np.median([r["first_frame_ms"] for r in results]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--local-turns", type=int, default=10)
    parser.add_argument("--token-delay", type=float, default=0.03, help="seconds per word")
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    root = Path(tempfile.mkdtemp(prefix="bench-turns-"))
    baseline = {"GPUSERVER_LLM__STREAM_TO_SPEECH": "false"}
    print(f"3-sentence answer, fake LLM at {args.token_delay * 1000:.0f} ms/word; espeak; warp")
    with run_fake_openai(FakeOpenAI(token_delay_s=args.token_delay)) as fake:
        fake_env = {"GPUSERVER_LLM__BASE_URL": fake.base_url, "GPUSERVER_LLM__MODEL": "story"}
        streamed = measure(root / "a", args.turns, fake_env, "--llm", "openai")
        whole = measure(root / "b", args.turns, {**fake_env, **baseline}, "--llm", "openai")
    a = report("fake LLM, sentence streaming", streamed)
    b = report("fake LLM, whole answer first (baseline)", whole)
    print(f"  first frame: streaming is {b / a:.1f}x earlier than the baseline (medians)")

    if args.local_turns:
        local_env = {"GPUSERVER_LLM__MAX_TOKENS": "96", "GPUSERVER_LLM__TEMPERATURE": "0"}
        streamed = measure(root / "c", args.local_turns, local_env, "--llm", "local")
        local_baseline = {**local_env, **baseline}
        whole = measure(root / "d", args.local_turns, local_baseline, "--llm", "local")
        a = report("local SmolLM2, sentence streaming", streamed)
        b = report("local SmolLM2, whole answer first (baseline)", whole)
        print(f"  first frame: streaming is {b / a:.1f}x earlier than the baseline (medians)")


if __name__ == "__main__":
    main()
