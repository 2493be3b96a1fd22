"""Voice activity detection with silero-vad, run by ONNX Runtime on one dedicated thread.

The `silero-vad` wheel ships the model (silero_vad/data/silero_vad.onnx). The package is
found, not imported: its __init__ imports torch, which the ONNX model does not need. The model
takes 512-sample windows (32 ms at 16 kHz) preceded by the previous window's last 64 samples,
and carries a recurrent state from window to window: `VADStream` keeps both for one audio
stream, `SileroVAD` holds the one model and the thread every stream's windows run on
(~0.15 ms a window on one core; ONNX Runtime releases the GIL while it runs).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpuserver.media import PCM_DTYPE, SAMPLE_RATE

log = logging.getLogger(__name__)

WINDOW_SAMPLES = 512
WINDOW_MS = WINDOW_SAMPLES * 1000 // SAMPLE_RATE  # 32
_CONTEXT_SAMPLES = 64
_STATE_SHAPE = (2, 1, 128)
_MODEL_FILE = "silero_vad.onnx"
_SILENCE_DB = -100.0  # the level of digital silence, instead of -inf


class VADError(RuntimeError):
    """The VAD cannot run (not installed); the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class VADWindow:
    """One 32 ms window: silero's speech probability and the window's RMS level in dBFS."""

    probability: float
    level_db: float


def locate_model() -> Path:
    """silero_vad.onnx inside the installed `silero-vad` package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VADError(
            "Voice input needs silero-vad and onnxruntime: `pip install 'gpuserver[voice]'`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / _MODEL_FILE
    if not path.is_file():
        raise VADError(f"{_MODEL_FILE} is missing from the silero-vad package at {path.parent}.")
    return path


def level_db(pcm: np.ndarray) -> float:
    """RMS level of int16 PCM in dBFS (a full-scale square wave is 0)."""
    if len(pcm) == 0:
        return _SILENCE_DB
    rms = math.sqrt(float(np.mean(np.square(pcm, dtype=np.float64)))) / 32768.0
    return max(20 * math.log10(rms), _SILENCE_DB) if rms > 0 else _SILENCE_DB


class VADStream:
    """The VAD state of one audio stream. Feed it its PCM in order, one call at a time."""

    def __init__(self, vad: SileroVAD) -> None:
        self._vad = vad
        self._state = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(_CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=PCM_DTYPE)  # samples short of a whole window

    async def process(self, pcm: np.ndarray) -> list[VADWindow]:
        """The windows that `pcm` (16 kHz mono int16, any length) completes, in order."""
        if len(self._pending) + len(pcm) < WINDOW_SAMPLES:  # no window yet: skip the handoff
            self._pending = np.concatenate([self._pending, pcm.astype(PCM_DTYPE, copy=False)])
            return []
        return await self._vad.run(self._windows, pcm)

    def _windows(self, pcm: np.ndarray) -> list[VADWindow]:
        """On the VAD thread."""
        data = np.concatenate([self._pending, pcm.astype(PCM_DTYPE, copy=False)])
        whole = len(data) - len(data) % WINDOW_SAMPLES
        self._pending = data[whole:]
        windows = []
        for start in range(0, whole, WINDOW_SAMPLES):
            window = data[start : start + WINDOW_SAMPLES]
            samples = window.astype(np.float32) / 32768.0
            probability, self._state = self._vad.infer(
                np.concatenate([self._context, samples]), self._state
            )
            self._context = samples[-_CONTEXT_SAMPLES:]
            windows.append(VADWindow(probability, level_db(window)))
        return windows


class SileroVAD:
    """The silero-vad model and its thread, shared by every stream of the process.

    Raises VADError when silero-vad or onnxruntime is not installed.
    """

    def __init__(self, model_path: Path | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise VADError(
                "Voice input needs onnxruntime and silero-vad: `pip install 'gpuserver[voice]'`."
            ) from exc
        path = model_path or locate_model()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # a tiny model: more threads only add handoffs
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session: Any = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sample_rate = np.array(SAMPLE_RATE, dtype=np.int64)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="silero-vad")
        log.debug("silero-vad loaded from %s", path)

    def stream(self) -> VADStream:
        """Fresh state for a new audio stream."""
        return VADStream(self)

    async def run(
        self, work: Callable[[np.ndarray], list[VADWindow]], pcm: np.ndarray
    ) -> list[VADWindow]:
        """Run `work(pcm)` on the VAD thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, pcm)

    def infer(self, samples: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        """One window (with its 64 samples of context) -> (probability, next state)."""
        feeds = {"input": samples[np.newaxis, :], "state": state, "sr": self._sample_rate}
        output, next_state = self._session.run(None, feeds)
        return float(output[0, 0]), next_state

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
