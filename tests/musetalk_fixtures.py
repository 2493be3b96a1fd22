"""MuseTalk test fixtures: tiny random-weight networks in the official layout, and helpers.

Import the fixtures into a test module with `from tests.musetalk_fixtures import ...`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from gpuserver.engines.musetalk.engine import MusetalkEngine
from gpuserver.engines.musetalk.random_weights import write_random_face_parser, write_random_weights
from gpuserver.media import SAMPLES_PER_TICK

DEFAULT_AVATAR = Path(__file__).parents[1] / "gpuserver" / "assets" / "avatars" / "default.png"
TEST_BATCH = 4


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random MuseTalk weights (fixed seed), no face parsing."""
    return write_random_weights(tmp_path_factory.mktemp("musetalk") / "models", "tiny", seed=0)


@pytest.fixture(scope="session")
def parsing_models_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny weights plus a random BiSeNet face-parsing checkpoint."""
    directory = tmp_path_factory.mktemp("musetalk-parsing") / "models"
    directory.mkdir()
    for entry in tiny_models_dir.iterdir():
        (directory / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    write_random_face_parser(directory)
    return directory


@pytest.fixture(scope="session")
def musetalk_engine(tiny_models_dir: Path) -> Iterator[MusetalkEngine]:
    """One loaded engine (CPU, batch 4) shared by the session, as a server shares it."""
    engine = MusetalkEngine(tiny_models_dir, device="cpu", batch_size=TEST_BATCH, batch_wait_ms=5)
    engine.load()
    yield engine
    asyncio.run(engine.aclose())


def noise_speech(ticks: int, seed: int = 0) -> np.ndarray:
    """`ticks` x 640 samples of int16 noise with a syllable-like envelope."""
    rng = np.random.default_rng(seed)
    envelope = np.abs(np.sin(np.linspace(0, ticks / 5 * np.pi, ticks * SAMPLES_PER_TICK)))
    return (rng.standard_normal(ticks * SAMPLES_PER_TICK) * 6000 * envelope).astype(np.int16)


async def chunked(
    pcm: np.ndarray, ticks: Sequence[int], pause_s: float = 0.0
) -> AsyncIterator[np.ndarray]:
    """`pcm` in chunks of the given tick counts (cycled), with a pause after each."""
    start, index = 0, 0
    while start < len(pcm):
        size = ticks[index % len(ticks)] * SAMPLES_PER_TICK
        yield pcm[start : start + size]
        start, index = start + size, index + 1
        await asyncio.sleep(pause_s)
