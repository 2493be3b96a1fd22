"""MuseTalk engine throughput: the networks alone and whole `frames()` streams in parallel.

    .venv/bin/python bench/musetalk.py --tiny                   # CPU: tiny random weights
    .venv/bin/python bench/musetalk.py --full-shapes --device cuda   # GPU: real geometry
    .venv/bin/python bench/musetalk.py --models-dir models      # the real weights

Prints figures, asserts nothing. Random weights draw noise but cost what real ones cost
at the same shapes. "Engine alone" is one UNet step + VAE decode per frame on random
inputs; "end to end" runs N simulated speaking sessions through `MusetalkEngine.frames()`
at once (whisper windows, cross-session batching, paste-back into the 512x512 default
avatar), each fed its speech as fast as it is consumed: fps/session >= 25 is real time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch

from gpuserver.engines.musetalk.audio import log_mel
from gpuserver.engines.musetalk.engine import MusetalkEngine
from gpuserver.engines.musetalk.models import resolve_device
from gpuserver.engines.musetalk.pipeline import AUDIO_DIM, AUDIO_TOKENS, LATENT_SHAPE
from gpuserver.engines.musetalk.prepare import MusetalkAvatar
from gpuserver.engines.musetalk.random_weights import write_random_weights
from gpuserver.media import SAMPLE_RATE, SAMPLES_PER_TICK

DEFAULT_AVATAR = Path(__file__).resolve().parents[1] / "gpuserver/assets/avatars/default.png"
CHUNK_TICKS = 5  # 200 ms of speech per TTS chunk


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--tiny", action="store_true", help="tiny random weights (CPU default)")
    shapes.add_argument("--full-shapes", action="store_true", help="MuseTalk 1.5 shapes, random")
    shapes.add_argument("--models-dir", type=Path, help="real weights in the official layout")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--seconds", type=float, default=2.0, help="speech per session")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=16, help="engine batch, end to end")
    parser.add_argument("--batch-wait-ms", type=float, default=15.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile UNet + decoder")
    return parser.parse_args()


def speech(seconds: float, seed: int) -> np.ndarray:
    ticks = max(1, round(seconds * SAMPLE_RATE / SAMPLES_PER_TICK))
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(ticks * SAMPLES_PER_TICK) * 4000).astype(np.int16)


async def chunks(pcm: np.ndarray) -> AsyncIterator[np.ndarray]:
    for start in range(0, len(pcm), CHUNK_TICKS * SAMPLES_PER_TICK):
        yield pcm[start : start + CHUNK_TICKS * SAMPLES_PER_TICK]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_networks(engine: MusetalkEngine, batch_sizes: list[int]) -> None:
    pipeline = engine.load().pipeline
    print("\nengine alone: UNet step + VAE decode (no whisper, no paste-back)")
    print(f"{'batch':>6} {'ms/batch':>10} {'ms/frame':>10} {'fps':>8}")
    for batch in batch_sizes:
        latents = torch.randn(batch, *LATENT_SHAPE)
        tokens = torch.randn(batch, AUDIO_TOKENS, AUDIO_DIM)
        pipeline.generate(latents, tokens)  # warm-up (cuDNN autotune, compile)
        repeats = max(2, 32 // batch)
        synchronize(pipeline.device)
        started = time.perf_counter()
        for _ in range(repeats):
            pipeline.generate(latents, tokens)
        synchronize(pipeline.device)
        per_batch = (time.perf_counter() - started) / repeats
        ms = per_batch * 1000
        print(f"{batch:>6} {ms:>10.1f} {ms / batch:>10.2f} {batch / per_batch:>8.1f}")
    mel = log_mel(pipeline.models.feature_extractor, speech(3.0, 0) / 32768.0)
    started = time.perf_counter()
    log_mel(pipeline.models.feature_extractor, speech(3.0, 0) / 32768.0)
    mel_ms = (time.perf_counter() - started) * 1000
    pipeline.encode_audio(mel[None])
    synchronize(pipeline.device)
    started = time.perf_counter()
    for _ in range(3):
        pipeline.encode_audio(mel[None])
    synchronize(pipeline.device)
    encode_ms = (time.perf_counter() - started) / 3 * 1000
    print(f"whisper window (30 s input): log-mel {mel_ms:.1f} ms (CPU), encoder {encode_ms:.1f} ms")


async def run_sessions(
    engine: MusetalkEngine, avatar: MusetalkAvatar, sessions: int, seconds: float
) -> tuple[float, list[float], list[float], int]:
    """Wall time, per-session fps and first-frame latency (s), frames per session."""

    async def one(seed: int) -> tuple[float, float, int]:
        started = time.perf_counter()
        first, count = 0.0, 0
        async for _ in engine.frames(avatar, chunks(speech(seconds, seed))):
            if count == 0:
                first = time.perf_counter() - started
            count += 1
        return time.perf_counter() - started, first, count

    started = time.perf_counter()
    results = await asyncio.gather(*(one(seed) for seed in range(sessions)))
    wall = time.perf_counter() - started
    return wall, [n / d for d, _, n in results], [f for _, f, _ in results], results[0][2]


async def bench_sessions(
    engine: MusetalkEngine, avatar: MusetalkAvatar, args: argparse.Namespace
) -> None:
    await run_sessions(engine, avatar, 1, 0.4)  # warm-up
    worker = engine.worker
    assert worker is not None
    print(
        "\nend to end: frames() with whisper windows, batching across sessions and paste-back; "
        f"batch {args.batch_size}, wait {args.batch_wait_ms:g} ms, "
        f"{args.seconds:g} s of speech each"
    )
    print(
        f"{'sessions':>8} {'total fps':>10} {'fps/session':>12} {'ms/frame':>9} "
        f"{'first frame ms':>15} {'avg batch':>10} {'worker busy':>12}"
    )
    for sessions in args.sessions:
        jobs, batches = worker.stats.jobs["frame"], worker.stats.batches["frame"]
        busy = worker.stats.busy_s
        wall, fps, first, frames = await run_sessions(engine, avatar, sessions, args.seconds)
        total = sessions * frames / wall
        average_batch = (worker.stats.jobs["frame"] - jobs) / max(
            1, worker.stats.batches["frame"] - batches
        )
        print(
            f"{sessions:>8} {total:>10.1f} {statistics.mean(fps):>12.1f} {1000 / total:>9.2f} "
            f"{statistics.median(first) * 1000:>15.0f} {average_batch:>10.1f} "
            f"{(worker.stats.busy_s - busy) / wall:>12.0%}"
        )


async def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="musetalk-bench-") as scratch:
        if args.models_dir is not None:
            models_dir, label = args.models_dir, f"weights from {args.models_dir}"
        else:
            shapes = "full" if args.full_shapes else "tiny"
            label = f"{shapes} random weights"
            models_dir = write_random_weights(
                Path(scratch) / "models",
                shapes,
                unet_dtype=torch.float16 if shapes == "full" else torch.float32,
            )
        engine = MusetalkEngine(
            models_dir, str(device), args.batch_size, args.batch_wait_ms, args.compile
        )
        runtime = await asyncio.to_thread(engine.load)
        print(
            f"MuseTalk benchmark: {label} on {runtime.pipeline.device} "
            f"({str(runtime.pipeline.dtype).removeprefix('torch.')}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads"
        )
        avatar = await asyncio.to_thread(
            engine.prepare, DEFAULT_AVATAR, "default", Path(scratch) / "cache"
        )
        bench_networks(engine, args.batch_sizes)
        await bench_sessions(engine, avatar, args)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            print(f"\nGPU memory: max allocated {peak:.0f} MiB")
        await engine.aclose()


if __name__ == "__main__":
    asyncio.run(main())
