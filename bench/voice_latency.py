"""Voice conversation latency, measured at the receiving client.

Starts `gpuserver serve` (warp engine, espeak, the default endpointing: 500 ms of silence
ends an utterance) against a fake OpenAI-compatible server on loopback that transcribes in
--asr-delay (default 100 ms) and answers with its first token after --llm-delay (150 ms),
then one aiortc client that offers its microphone and plays espeak's "What is the capital of
France?" into it:
  1. --utterances times: end of the user's speech (when its last spoken sample left the
     client) -> RTP arrival of the answer's first speaking frame;
  2. --utterances times, while the avatar speaks: the user's speech onset (its first spoken
     sample sent) -> the first closed-mouth frame decoded at the client (barge-in);
  3. the received video's fps (median, p5 of 1 s windows) over the whole run.

    .venv/bin/python bench/voice_latency.py [--utterances 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.receiver import ClosedMouth, first_speaking_frame, percentile, window_fps
from gpuserver.client import AvatarClient
from gpuserver.media import SAMPLE_RATE
from gpuserver.webrtc_streamer import restrict_host_addresses
from tests.conftest import start_server
from tests.fakes.openai_server import FakeOpenAI, run_fake_openai
from tests.voice_fixtures import QUESTION, Speech, espeak, surrounded

LONG = "Let me tell you about this in some detail, because there is a lot to say. " * 6


async def speak_into(client: AvatarClient, speech: Speech) -> tuple[float, float]:
    """Play `speech`; (onset, end) of its spoken part, as monotonic times at the client."""
    assert client.microphone is not None
    last_left = await client.microphone.play(speech.pcm)
    after = len(speech.pcm) / SAMPLE_RATE
    return (
        last_left - after + speech.start / SAMPLE_RATE,
        last_left - after + speech.end / SAMPLE_RATE,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--asr-delay", type=float, default=0.1)
    parser.add_argument("--llm-delay", type=float, default=0.15)
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    question = surrounded(espeak(QUESTION), before_s=0.3, after_s=0.9)
    asyncio.run(measure(args, question))


async def measure(args: argparse.Namespace, question: Speech) -> None:
    fake = FakeOpenAI(
        transcript=QUESTION,
        transcribe_delay_s=args.asr_delay,
        first_token_delay_s=args.llm_delay,
        token_delay_s=0.03,
    )
    with run_fake_openai(fake):
        env = {
            "GPUSERVER_ASR__BACKEND": "openai",
            "GPUSERVER_ASR__BASE_URL": fake.base_url,
            "GPUSERVER_LLM__BASE_URL": fake.base_url,
            "GPUSERVER_LLM__MODEL": "story",
        }
        workdir = Path(tempfile.mkdtemp(prefix="bench-voice-"))
        server = start_server(workdir, "--llm", "openai", "--log-level", "WARNING", env=env)
        try:
            answers, barge_ins, fps = await run(server.ws_url, question, args.utterances)
        finally:
            server.stop()
    print(
        f"voice: fake ASR {args.asr_delay * 1000:.0f} ms, fake LLM {args.llm_delay * 1000:.0f} ms"
        " to first token, espeak, warp, 500 ms endpoint silence, loopback"
    )
    print(
        f"end of speech -> first answer frame: p50 {percentile(answers, 50):.0f} ms, "
        f"p95 {percentile(answers, 95):.0f} ms ({len(answers)}/{args.utterances})"
    )
    print(
        f"barge-in onset -> closed mouth on screen: p50 {percentile(barge_ins, 50):.0f} ms, "
        f"p95 {percentile(barge_ins, 95):.0f} ms ({len(barge_ins)}/{args.utterances})"
    )
    print(f"received video: fps median {percentile(fps, 50):.1f}, p5 {percentile(fps, 5):.1f}")


async def run(
    ws_url: str, question: Speech, utterances: int
) -> tuple[list[float], list[float], list[float]]:
    answers: list[float] = []
    barge_ins: list[float] = []
    mouth = ClosedMouth()
    async with AvatarClient(ws_url, keep_video=True, microphone=True) as client:
        await client.start_media()
        await asyncio.sleep(1.0)
        mouth.calibrate(client.media.video[-8:])
        started = time.monotonic()
        for _ in range(utterances):
            count = len(client.messages)
            _, end = await speak_into(client, question)
            await client.wait_for("speech_started", after=count, timeout=30)
            await asyncio.sleep(0.5)
            if (frame := first_speaking_frame(client, end)) is not None:
                answers.append((frame - end) * 1000)
            await client.send({"type": "interrupt"})
            await asyncio.sleep(0.5)
        for _ in range(utterances):
            count = len(client.messages)
            await client.send({"type": "speak", "text": LONG})
            await client.wait_for("speech_started", after=count, timeout=30)
            await asyncio.sleep(1.0)
            onset, _ = await speak_into(client, question)
            await client.wait_for("interrupted", after=count, timeout=30)
            if (closed := mouth.first_closed(client.media.video, onset)) is not None:
                barge_ins.append((closed - onset) * 1000)
            await client.send({"type": "interrupt"})  # the answer to the barge-in
            await asyncio.sleep(0.8)
        fps = window_fps(client, started, time.monotonic())
    return answers, barge_ins, fps


if __name__ == "__main__":
    main()
