"""The avatar manager's frame streams, including the seed's generate_frames_stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gpuserver.avatar_manager import AvatarManager, AvatarNotFoundError
from gpuserver.config import AvatarSettings
from gpuserver.engines.warp import WarpEngine
from gpuserver.media import SAMPLES_PER_TICK


@pytest.fixture
def manager(tmp_path: Path) -> AvatarManager:
    return AvatarManager(WarpEngine(), AvatarSettings(dir=tmp_path / "a", cache_dir=tmp_path / "c"))


def tone(samples: int) -> np.ndarray:
    t = np.arange(samples) / 16_000
    return (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


async def chunks(pcm: np.ndarray, size: int) -> AsyncIterator[np.ndarray]:
    for start in range(0, len(pcm), size):
        yield pcm[start : start + size]


async def test_frames_stream_gives_one_bgr_frame_per_640_samples_padding_the_tail(
    manager: AvatarManager,
) -> None:
    frames = [f async for f in manager.generate_frames_stream(tone(1000), "default")]
    assert len(frames) == 2
    assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for f in frames)


async def test_frames_stream_accepts_chunks_of_any_length(manager: AvatarManager) -> None:
    pcm = tone(5 * SAMPLES_PER_TICK + 17)
    whole = [f async for f in manager.generate_frames_stream(pcm, "default")]
    streamed = [f async for f in manager.generate_frames_stream(chunks(pcm, 333), "default")]
    assert len(streamed) == len(whole) == 6
    assert all((a == b).all() for a, b in zip(whole, streamed, strict=True))


async def test_an_unknown_avatar_is_named_with_the_known_ones(manager: AvatarManager) -> None:
    with pytest.raises(AvatarNotFoundError, match="available: default"):
        [f async for f in manager.generate_frames_stream(tone(640), "nobody")]
