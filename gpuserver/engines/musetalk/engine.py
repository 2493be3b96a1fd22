"""`MusetalkEngine`: MuseTalk 1.5 lip-sync with one model copy and one inference thread
per process, shared by every session (see `batcher` and `stream`)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from gpuserver.config import EngineSettings
from gpuserver.engines.base import LipSyncEngine, PhaseSource, PreparedAvatar, Progress
from gpuserver.engines.musetalk.audio import AudioWindow, frame_features
from gpuserver.engines.musetalk.batcher import BatchKind, BatchWorker
from gpuserver.engines.musetalk.facebox import load_landmarker
from gpuserver.engines.musetalk.layout import check_weights
from gpuserver.engines.musetalk.models import load_models, weights_fingerprint
from gpuserver.engines.musetalk.pipeline import MusetalkPipeline
from gpuserver.engines.musetalk.prepare import MusetalkAvatar, PrepareTools, prepare_avatar
from gpuserver.engines.musetalk.stream import AUDIO_KIND, FRAME_KIND, stream_frames

logger = logging.getLogger(__name__)

AUDIO_BATCH = 8  # whisper windows per encoder call (1-2 segments of 30 s mel each)


@dataclass(frozen=True)
class EngineRuntime:
    """The loaded models and the inference thread that owns them."""

    pipeline: MusetalkPipeline
    worker: BatchWorker


class MusetalkEngine(LipSyncEngine):
    name: ClassVar[str] = "musetalk"

    def __init__(
        self,
        models_dir: Path = Path("models"),
        device: str = "auto",
        batch_size: int = 16,
        batch_wait_ms: float = 15.0,
        compile: bool = False,
        render_threads: int = 2,
        source_max_side: int = 1920,
    ) -> None:
        check_weights(models_dir)  # fail at start-up, naming every missing file
        super().__init__(render_threads)
        self.models_dir = models_dir
        self._device = device
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_ms / 1000
        self._compile = compile
        self._source_max_side = source_max_side
        self._lock = threading.Lock()
        self._runtime: EngineRuntime | None = None
        self._tools: PrepareTools | None = None

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> MusetalkEngine:
        return cls(
            models_dir=settings.models_dir,
            device=settings.device,
            batch_size=settings.batch_size,
            batch_wait_ms=settings.batch_wait_ms,
            compile=settings.compile,
            render_threads=settings.render_threads,
            source_max_side=settings.source_max_side,
        )

    @property
    def worker(self) -> BatchWorker | None:
        """The inference worker once the models are loaded (for stats)."""
        return self._runtime.worker if self._runtime is not None else None

    @property
    def latest_batch(self) -> int | None:
        runtime = self._runtime
        return runtime.worker.stats.last_batch if runtime is not None else 0

    def load(self) -> EngineRuntime:
        """Load the models and start the inference thread, once (blocking, thread-safe)."""
        with self._lock:
            if self._runtime is None:
                models = load_models(self.models_dir, self._device, self._compile)
                pipeline = MusetalkPipeline(models)
                worker = BatchWorker(
                    [
                        BatchKind(AUDIO_KIND, partial(_encode_windows, pipeline), AUDIO_BATCH, 0.0),
                        BatchKind(
                            FRAME_KIND,
                            partial(_generate, pipeline),
                            self._batch_size,
                            self._batch_wait_s,
                        ),
                    ],
                    name="musetalk-inference",
                )
                self._runtime = EngineRuntime(pipeline, worker)
            return self._runtime

    def _prepare_tools(self) -> PrepareTools:
        runtime = self.load()
        with self._lock:
            if self._tools is None:
                landmarker = load_landmarker()
                self._tools = PrepareTools(runtime.pipeline, landmarker)
            return self._tools

    def prepare(
        self,
        source: Path,
        avatar_id: str,
        cache_dir: Path,
        progress: Progress | None = None,
    ) -> MusetalkAvatar:
        fingerprint = weights_fingerprint(self.models_dir)
        return prepare_avatar(
            source,
            avatar_id,
            cache_dir,
            fingerprint,
            self._prepare_tools,
            progress,
            max_side=self._source_max_side,
        )

    async def lip_sync(
        self, avatar: PreparedAvatar, audio: AsyncIterable[np.ndarray], phase: PhaseSource
    ) -> AsyncIterator[np.ndarray]:
        """Speech frames over the idle loop, as the warp engine's.

        Frames come LOOKAHEAD_MS (120 ms) of audio behind the audio they are made from;
        `frames` pairs them by order.
        """
        if not isinstance(avatar, MusetalkAvatar):
            raise TypeError(f"the musetalk engine cannot animate {type(avatar).__name__}")
        runtime = await self.render_pool.run(self.load)
        extractor = runtime.pipeline.models.feature_extractor
        stream = stream_frames(
            runtime.worker, self.render_pool, extractor, avatar, audio, phase, 2 * self._batch_size
        )
        async with contextlib.aclosing(stream) as frames:
            async for frame in frames:
                yield frame

    async def aclose(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await self.render_pool.run(runtime.worker.close)
        await super().aclose()


def _encode_windows(
    pipeline: MusetalkPipeline, payloads: list[tuple[np.ndarray, AudioWindow]]
) -> list[torch.Tensor]:
    """Whisper windows of any sessions in one encoder call -> each one's frame tokens.

    A payload's mels are its window's 30 s segments; their states join end to end.
    """
    hidden = pipeline.encode_audio(np.concatenate([mels for mels, _ in payloads]))
    tokens, start = [], 0
    for mels, window in payloads:
        states = hidden[start : start + len(mels)].flatten(0, 1)  # [segments * 1500, 5, 384]
        tokens.append(frame_features(states, window).float().cpu())
        start += len(mels)
    return tokens


def _generate(
    pipeline: MusetalkPipeline, payloads: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[np.ndarray]:
    latents = torch.stack([latent for latent, _ in payloads])
    audio = torch.stack([tokens for _, tokens in payloads])
    return list(pipeline.generate(latents, audio))
