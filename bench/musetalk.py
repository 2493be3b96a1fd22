"""MuseTalk engine throughput: the networks alone, and paced sessions through the real batcher.

    .venv/bin/python bench/musetalk.py --tiny --device cpu          # CPU smoke: tiny weights
    .venv/bin/python bench/musetalk.py --full-shapes --device cuda  # GPU: real geometry
    .venv/bin/python bench/musetalk.py --models-dir models          # the real weights
    bench/gpu_check.sh                                              # the GPU acceptance run

Prints figures, asserts nothing. Random weights draw noise but cost what real ones cost at
the same shapes (generated on the spot in the official layout: no download).

1. Networks: one UNet step + VAE decode per frame (`MusetalkPipeline.generate_on_device`)
   at each batch size, per mode: eager; CUDA graphs (the eager step captured once per batch
   size and replayed); torch.compile (UNet and decoder, as `engine.compile`). fp16 on CUDA.
   Peak GPU memory above the loaded weights, per batch.
2. Sessions: N simulated speaking sessions at once through `MusetalkEngine.frames()` (whisper
   windows, cross-session batching, paste-back into the 512x512 default avatar). Each plays
   its frames on its own 25 fps clock, as the media clock does: frame k plays at
   max(play(k-1) + 40 ms, arrival(k)), and the session pulls at most QUEUE_TICKS ahead of
   playback (the speech queue's bound). Delivered fps = frames played per 1 s window; p5
   over every window of every session. N grows until p5 falls below --target-fps; the
   largest N that held is the session count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from gpuserver.engines.musetalk.engine import MusetalkEngine
from gpuserver.engines.musetalk.models import resolve_device
from gpuserver.engines.musetalk.pipeline import (
    AUDIO_DIM,
    AUDIO_TOKENS,
    LATENT_SHAPE,
    MusetalkPipeline,
)
from gpuserver.engines.musetalk.prepare import MusetalkAvatar
from gpuserver.engines.musetalk.random_weights import write_random_weights
from gpuserver.media import SAMPLE_RATE, SAMPLES_PER_TICK, TICK_SECONDS

DEFAULT_AVATAR = Path(__file__).resolve().parents[1] / "gpuserver/assets/avatars/default.png"
CHUNK_TICKS = 5  # 200 ms of speech per TTS chunk
QUEUE_TICKS = 25  # frames a session may hold ahead of its playback (1 s, the default queue)
PREBUFFER_TICKS = 2
SESSION_STEPS = (1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64)
Step = Callable[[], torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--tiny", action="store_true", help="tiny random weights (CPU smoke)")
    shapes.add_argument("--full-shapes", action="store_true", help="MuseTalk 1.5 shapes, random")
    shapes.add_argument("--models-dir", type=Path, help="real weights in the official layout")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "cudagraph", "compile"],
        choices=["eager", "cudagraph", "compile"],
        help="network timing modes (cudagraph and compile need CUDA)",
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="speech per session")
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("--target-fps", type=float, default=24.0, help="p5 to hold")
    parser.add_argument("--batch-size", type=int, default=16, help="engine batch, sessions")
    parser.add_argument("--batch-wait-ms", type=float, default=15.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile in the sessions")
    parser.add_argument(
        "--budget-s", type=float, default=0, help="stop starting stages past this (0: none)"
    )
    return parser.parse_args()


class Deadline:
    def __init__(self, budget_s: float) -> None:
        self._end = time.monotonic() + budget_s if budget_s > 0 else None

    def left(self) -> float:
        return float("inf") if self._end is None else self._end - time.monotonic()


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


def timed(step: Step, device: torch.device, batch: int) -> float:
    """Seconds per call of `step` (after a warm-up call)."""
    step()
    synchronize(device)
    repeats = max(3, 64 // batch)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def graphed(step: Step, device: torch.device) -> Step:
    """`step` captured in a CUDA graph (its inputs are fixed tensors), replayed per call."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as capture requires
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def bench_networks(
    pipeline: MusetalkPipeline, modes: list[str], args: argparse.Namespace, deadline: Deadline
) -> None:
    print(
        f"\nnetworks: UNet step + VAE decode ({str(pipeline.dtype).removeprefix('torch.')}), "
        "no whisper, no paste-back; MiB = peak GPU memory above the loaded weights"
    )
    print(f"{'mode':>10} {'batch':>6} {'ms/batch':>10} {'ms/frame':>10} {'fps':>8} {'MiB':>8}")
    per_frame: dict[int, float] = {}
    for mode in modes:
        per_frame.clear()
        with compiled(pipeline) if mode == "compile" else contextlib.nullcontext():
            for batch in args.batch_sizes:
                if deadline.left() < 30:
                    print(f"{mode:>10} {batch:>6}  SKIPPED: time budget")
                    continue
                try:
                    seconds, memory = time_batch(pipeline, mode, batch)
                except Exception as exc:  # a mode that fails here must not end the run
                    print(f"{mode:>10} {batch:>6}  FAILED: {type(exc).__name__}: {exc}")
                    continue
                per_frame[batch] = seconds / batch
                ms = seconds * 1000
                print(
                    f"{mode:>10} {batch:>6} {ms:>10.1f} {ms / batch:>10.2f} "
                    f"{batch / seconds:>8.1f} {memory}"
                )
        if 1 in per_frame and 16 in per_frame:
            ratio = per_frame[16] / per_frame[1]
            print(f"{mode:>10}: batch-16 time per frame = {ratio:.2f} x batch 1 (target <= 0.25)")


def time_batch(pipeline: MusetalkPipeline, mode: str, batch: int) -> tuple[float, str]:
    """Seconds per batch, and the peak GPU memory above the weights (MiB, as text)."""
    device = pipeline.device
    latents = torch.randn(batch, *LATENT_SHAPE, device=device, dtype=pipeline.dtype)
    tokens = torch.randn(batch, AUDIO_TOKENS, AUDIO_DIM, device=device, dtype=pipeline.dtype)
    step: Step = functools.partial(pipeline.generate_on_device, latents, tokens)
    baseline = 0
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        if mode == "cudagraph":
            step = graphed(step, device)
        seconds = timed(step, device, batch)
    if device.type != "cuda":
        return seconds, f"{'-':>8}"
    return seconds, f"{(torch.cuda.max_memory_allocated(device) - baseline) / 2**20:8.0f}"


@contextlib.contextmanager
def compiled(pipeline: MusetalkPipeline) -> Iterator[None]:
    """torch.compile on the UNet and the VAE decoder (as `engine.compile`), undone after."""
    models, decoder = pipeline.models, pipeline.models.vae.decoder
    pipeline.models = dataclasses.replace(models, unet=torch.compile(models.unet))
    models.vae.decoder = torch.compile(decoder)  # type: ignore[assignment]
    try:
        yield
    finally:
        pipeline.models = models
        models.vae.decoder = decoder


async def paced_session(
    engine: MusetalkEngine, avatar: MusetalkAvatar, seconds: float, seed: int
) -> tuple[list[float], float]:
    """Play times of one session's frames on its own 25 fps clock, and its first-frame delay."""
    started = time.perf_counter()
    plays: list[float] = []
    async for _ in engine.frames(avatar, chunks(speech(seconds, seed))):
        now = time.perf_counter()
        if plays:
            plays.append(max(plays[-1] + TICK_SECONDS, now))
        else:
            plays.append(now + PREBUFFER_TICKS * TICK_SECONDS)
        ahead = len(plays) - QUEUE_TICKS  # the next pull waits for this frame to play
        if ahead >= 0:
            await asyncio.sleep(max(0.0, plays[ahead] - time.perf_counter()))
    return plays, plays[0] - PREBUFFER_TICKS * TICK_SECONDS - started


def window_fps(plays: list[float]) -> list[float]:
    """Frames played in each whole second after the first frame (a shorter session: its
    average rate)."""
    times = np.array(plays) - plays[0]
    if times[-1] < 1:
        return [len(times) / max(times[-1] + TICK_SECONDS, TICK_SECONDS)]
    return [float(((times >= s) & (times < s + 1)).sum()) for s in range(int(times[-1]))]


async def run_sessions(
    engine: MusetalkEngine, avatar: MusetalkAvatar, sessions: int, seconds: float
) -> tuple[float, float, float]:
    """fps p5 over all sessions' 1 s windows, median fps, median first-frame delay (s)."""
    results = await asyncio.gather(
        *(paced_session(engine, avatar, seconds, seed) for seed in range(sessions))
    )
    windows = [fps for plays, _ in results for fps in window_fps(plays)]
    first = statistics.median(delay for _, delay in results)
    return float(np.percentile(windows, 5)), float(np.median(windows)), first


async def bench_sessions(
    engine: MusetalkEngine,
    avatar: MusetalkAvatar,
    args: argparse.Namespace,
    deadline: Deadline,
) -> None:
    await run_sessions(engine, avatar, 1, 2.0)  # warm-up
    worker = engine.worker
    assert worker is not None
    print(
        f"\nsessions: paced at 25 fps through the batcher (batch {args.batch_size}, wait "
        f"{args.batch_wait_ms:g} ms), {args.seconds:g} s of speech each, until fps p5 < "
        f"{args.target_fps:g}"
    )
    print(
        f"{'sessions':>8} {'fps p5':>7} {'fps p50':>8} {'first frame ms':>15} "
        f"{'avg batch':>10} {'worker busy':>12}"
    )
    held, failed = 0, None
    larger = [n for n in SESSION_STEPS if n <= args.max_sessions]
    while larger or failed is not None:
        # Grow along SESSION_STEPS until one fails, then bisect between held and failed.
        sessions = larger.pop(0) if failed is None else (held + failed) // 2
        if deadline.left() < args.seconds + 20:
            print(f"{sessions:>8}  SKIPPED: time budget")
            break
        stats = worker.stats
        jobs, batches, busy = stats.jobs["frame"], stats.batches["frame"], stats.busy_s
        started = time.perf_counter()
        p5, p50, first = await run_sessions(engine, avatar, sessions, args.seconds)
        wall = time.perf_counter() - started
        average = (stats.jobs["frame"] - jobs) / max(1, stats.batches["frame"] - batches)
        print(
            f"{sessions:>8} {p5:>7.1f} {p50:>8.1f} {first * 1000:>15.0f} {average:>10.1f} "
            f"{(stats.busy_s - busy) / wall:>12.0%}"
        )
        if p5 >= args.target_fps:
            held = sessions
        else:
            failed = sessions
        if failed is not None and failed - held <= 1:
            break
    limit = "" if failed is not None else " (no count failed: the most tried)"
    print(f"\nsessions held at fps p5 >= {args.target_fps:g}: {held}{limit}")


async def main() -> None:
    args = parse_args()
    deadline = Deadline(args.budget_s)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="musetalk-bench-") as scratch:
        if args.models_dir is not None:
            models_dir, label = args.models_dir, f"weights from {args.models_dir}"
        else:
            shapes = "full" if args.full_shapes else "tiny"
            label = f"{shapes} random weights"
            started = time.perf_counter()
            models_dir = write_random_weights(
                Path(scratch) / "models",
                shapes,
                face_parsing=True,
                unet_dtype=torch.float16 if shapes == "full" else torch.float32,
            )
            print(f"{label} written in {time.perf_counter() - started:.1f} s")
        engine = MusetalkEngine(
            models_dir, str(device), args.batch_size, args.batch_wait_ms, args.compile
        )
        runtime = await asyncio.to_thread(engine.load)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(
            f"MuseTalk benchmark: {label} on {name} "
            f"({str(runtime.pipeline.dtype).removeprefix('torch.')}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads"
        )
        if device.type == "cuda":
            weights = torch.cuda.memory_allocated(device) / 2**20
            print(f"GPU memory: {weights:.0f} MiB allocated by the loaded weights")
        avatar = await asyncio.to_thread(
            engine.prepare, DEFAULT_AVATAR, "default", Path(scratch) / "cache"
        )
        modes = [m for m in args.modes if device.type == "cuda" or m == "eager"]
        if len(modes) < len(args.modes):
            print("(cudagraph and compile need CUDA: only eager on this device)")
        # torch.compile last: its compile time is the least predictable part of the budget.
        bench_networks(runtime.pipeline, [m for m in modes if m != "compile"], args, deadline)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        await bench_sessions(engine, avatar, args, deadline)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            print(f"GPU memory: max allocated during the sessions {peak:.0f} MiB")
        await engine.aclose()
        if "compile" in modes:
            bench_networks(runtime.pipeline, ["compile"], args, deadline)


if __name__ == "__main__":
    asyncio.run(main())
