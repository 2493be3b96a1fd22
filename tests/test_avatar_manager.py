"""The avatar manager: its registry (rescanned on use) and frame streams, including the
seed's generate_frames_stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpuserver.avatar_manager import AvatarManager, AvatarNotFoundError, bundled_default_source
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


async def test_each_frame_is_paired_with_the_audio_it_was_made_from(
    manager: AvatarManager,
) -> None:
    pcm = tone(4 * SAMPLES_PER_TICK)
    pairs = [
        p async for p in manager.generate_av_stream(chunks(pcm, 2 * SAMPLES_PER_TICK), "default")
    ]
    assert len(pairs) == 4
    audio = np.concatenate([a for _, a in pairs])
    assert (audio == pcm).all()


async def test_an_unknown_avatar_is_named_with_the_known_ones(manager: AvatarManager) -> None:
    with pytest.raises(AvatarNotFoundError, match="available: default"):
        [f async for f in manager.generate_frames_stream(tone(640), "nobody")]


async def test_a_rescan_sees_avatars_added_replaced_and_removed_by_hand(
    manager: AvatarManager,
) -> None:
    directory = manager.settings.dir
    directory.mkdir(parents=True)
    portrait = cv2.imread(str(bundled_default_source()))
    cv2.imwrite(str(directory / "me.png"), portrait)
    await manager.rescan()
    assert [e.id for e in manager.entries()] == ["default", "me"]
    first = await manager.prepared("me")

    cv2.imwrite(str(directory / "me.png"), cv2.resize(portrait, (256, 256)))
    await manager.rescan()
    replaced = await manager.prepared("me")
    assert (first.size, replaced.size) == ((512, 512), (256, 256)), "prepared afresh"

    (directory / "me.png").unlink()
    await manager.rescan()
    assert [e.id for e in manager.entries()] == ["default"]
    with pytest.raises(AvatarNotFoundError):
        await manager.prepared("me")


async def test_an_avatar_unknown_at_the_last_listing_is_looked_for_on_use(
    manager: AvatarManager,
) -> None:
    manager.settings.dir.mkdir(parents=True)
    (manager.settings.dir / "new.png").write_bytes(bundled_default_source().read_bytes())
    assert (await manager.prepared("new")).avatar_id == "new"
