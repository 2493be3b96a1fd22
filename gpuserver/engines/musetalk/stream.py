"""One `frames()` call: streamed audio in, lip-synced frames out, via the shared worker.

Three cooperating pieces per call: a reader task pulls the audio stream into a small queue
(so chunks that arrive while an encode is in flight are coalesced into the next window), a
producer task turns ready audio into whisper windows (log-mel in a thread, the encoder on
the worker) and submits one frame job per tick, and the generator awaits those jobs in
order and pastes each face back in a thread. Bounded everywhere: `max_inflight` frame jobs
per session, AUDIO_QUEUE_CHUNKS audio chunks read ahead. Closing the generator cancels both
tasks and drops the session's queued jobs from the worker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import numpy as np
from transformers import WhisperFeatureExtractor

from gpuserver.engines.base import PhaseSource
from gpuserver.engines.musetalk.audio import AudioWindower, log_mel
from gpuserver.engines.musetalk.batcher import BatchWorker
from gpuserver.engines.musetalk.prepare import MusetalkAvatar
from gpuserver.tasks import WorkerPool

AUDIO_KIND = "audio"
FRAME_KIND = "frame"
AUDIO_QUEUE_CHUNKS = 32
# Frames held back for look-ahead (at most LOOKAHEAD_TICKS, with their audio) are cut as if
# the utterance ended when no audio came for this long: an LLM still writing the next
# sentence must not hold this one's last 120 ms. Their steps past the received audio are
# zero, as at the end of an official clip; if the audio resumes mid-word, those frames (at
# most 120 ms) were made without it and the mouth may close early there. Later frames are
# unaffected: windows stay anchored at the utterance start.
LOOKAHEAD_STALL_S = 0.25

_END = object()
_owners = itertools.count()


async def stream_frames(
    worker: BatchWorker,
    pool: WorkerPool,
    extractor: WhisperFeatureExtractor,
    avatar: MusetalkAvatar,
    audio: AsyncIterable[np.ndarray],
    phase: PhaseSource,
    max_inflight: int,
) -> AsyncIterator[np.ndarray]:
    """One BGR frame per 640 samples of `audio`, in order (see the module docstring)."""
    owner = next(_owners)
    results: asyncio.Queue[Any] = asyncio.Queue(max_inflight)
    producer = asyncio.create_task(
        _produce(worker, pool, extractor, avatar, audio, phase, owner, results),
        name=f"musetalk-{owner}",
    )
    try:
        while (item := await results.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            tick, job = item
            face = await job
            yield await pool.run(avatar.render, tick, face)
    finally:
        producer.cancel()
        worker.cancel(owner)
        await asyncio.wait({producer})


async def _produce(
    worker: BatchWorker,
    pool: WorkerPool,
    extractor: WhisperFeatureExtractor,
    avatar: MusetalkAvatar,
    audio: AsyncIterable[np.ndarray],
    phase: PhaseSource,
    owner: int,
    results: asyncio.Queue[Any],
) -> None:
    chunks: asyncio.Queue[Any] = asyncio.Queue(AUDIO_QUEUE_CHUNKS)
    reader = asyncio.create_task(_read(audio, chunks))
    windower = AudioWindower()
    tick: int | None = None  # idle-loop phase of the next frame, known at the first window
    ended = False
    try:
        while not ended:
            timeout = LOOKAHEAD_STALL_S if windower.waiting_frames else None
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow an interrupt's
                # cancellation that lands while a chunk is ready.
                async with asyncio.timeout(timeout):
                    items = [await chunks.get()]
            except TimeoutError:
                items = []
            while not chunks.empty():
                items.append(chunks.get_nowait())
            for item in items:
                if item is _END:
                    ended = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    windower.push(item)
            stalled = not items
            while (window := windower.take(final=ended or stalled)) is not None:
                mel = await pool.run(log_mel, extractor, window.pcm)
                features = await worker.submit(owner, AUDIO_KIND, (mel, window))
                tick = phase() if tick is None else tick
                for index in range(window.frame_count):
                    payload = (avatar.latent(tick), features[index])
                    await results.put((tick, worker.submit(owner, FRAME_KIND, payload)))
                    tick += 1
        await results.put(_END)
    except Exception as exc:  # handed to the consumer, which raises it
        await results.put(exc)
    finally:
        reader.cancel()


async def _read(audio: AsyncIterable[np.ndarray], chunks: asyncio.Queue[Any]) -> None:
    try:
        async for chunk in audio:
            await chunks.put(chunk)
    except Exception as exc:
        await chunks.put(exc)
    else:
        await chunks.put(_END)
