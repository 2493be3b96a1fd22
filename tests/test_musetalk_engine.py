"""The MuseTalk engine on tiny random weights: preparation cache, streamed frames, sessions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gpuserver.engines.base import AvatarSourceError, PreparedAvatar
from gpuserver.engines.musetalk import prepare as prepare_module
from gpuserver.engines.musetalk.batcher import WorkerStats
from gpuserver.engines.musetalk.engine import MusetalkEngine
from gpuserver.engines.musetalk.pipeline import MusetalkPipeline
from gpuserver.engines.musetalk.prepare import COMPLETE_MARKER, MusetalkAvatar
from gpuserver.engines.warp import IDLE_FRAMES
from tests.musetalk_fixtures import (
    DEFAULT_AVATAR,
    chunked,
    musetalk_engine,
    noise_speech,
    parsing_models_dir,
    tiny_models_dir,
)

__all__ = ["musetalk_engine", "parsing_models_dir", "tiny_models_dir"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("musetalk-cache")


@pytest.fixture(scope="module")
def avatar(musetalk_engine: MusetalkEngine, cache_dir: Path) -> MusetalkAvatar:
    return musetalk_engine.prepare(DEFAULT_AVATAR, "default", cache_dir)


@pytest.fixture(scope="module")
def mirrored(
    musetalk_engine: MusetalkEngine, tmp_path_factory: pytest.TempPathFactory
) -> MusetalkAvatar:
    """A second avatar: the default portrait mirrored."""
    source = tmp_path_factory.mktemp("mirrored") / "mirrored.png"
    cv2.imwrite(str(source), cv2.flip(cv2.imread(str(DEFAULT_AVATAR)), 1))
    return musetalk_engine.prepare(source, "mirrored", source.parent / "cache")


async def collect(
    engine: MusetalkEngine, avatar: MusetalkAvatar, audio: AsyncIterator[np.ndarray]
) -> list[np.ndarray]:
    return [frame async for frame, _ in engine.frames(avatar, audio)]


def worker_stats(engine: MusetalkEngine) -> WorkerStats:
    assert engine.worker is not None
    return engine.worker.stats


def test_image_preparation_shapes(avatar: MusetalkAvatar) -> None:
    assert avatar.size == (512, 512)
    assert avatar.latents.shape == (1, 8, 32, 32) and avatar.latents.dtype == torch.float32
    assert avatar.boxes.shape == (1, 4) and avatar.boxes.dtype == np.int32
    x0, y0, x1, y1 = avatar.boxes[0]
    assert 150 < x0 < 200 and 50 < y0 < 110 and 250 < x1 < 300 and 150 < y1 < 200
    assert avatar.masks[0].shape == (y1 - y0, x1 - x0)
    assert len(avatar.idle_frames) == len(avatar.cycle) == IDLE_FRAMES  # the warp idle loop
    assert not avatar.cycle.any()


def test_cache_hit_skips_all_model_work(
    tiny_models_dir: Path, avatar: MusetalkAvatar, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = MusetalkEngine(tiny_models_dir, device="cpu")

    def no_models() -> None:
        raise AssertionError("a cache hit must not load or run a model")

    monkeypatch.setattr(fresh, "load", no_models)
    again = fresh.prepare(DEFAULT_AVATAR, "default", cache_dir)
    torch.testing.assert_close(again.latents, avatar.latents)
    np.testing.assert_array_equal(again.boxes, avatar.boxes)
    np.testing.assert_array_equal(again.masks[0], avatar.masks[0])


def test_video_preparation_resumes_from_finished_chunks(
    musetalk_engine: MusetalkEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = cv2.imread(str(DEFAULT_AVATAR))
    video = tmp_path / "talk.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (512, 512))
    for shift in range(20):
        writer.write(np.roll(image, shift // 4, axis=1))
    writer.release()
    stages: list[str] = []
    first = musetalk_engine.prepare(
        video, "talk", tmp_path / "cache", lambda s, f: stages.append(s)
    )
    assert first.latents.shape == (20, 8, 32, 32) and len(first.masks) == 20
    assert len(first.idle_frames) == 40  # ping-pong
    np.testing.assert_array_equal(first.cycle, [*range(20), *range(19, -1, -1)])
    assert {"locating face", "encoding face", "ready"} <= set(stages)

    # An interrupted preparation: the second chunk and the marker never got written.
    entry = next((tmp_path / "cache" / "musetalk").iterdir())
    (entry / COMPLETE_MARKER).unlink()
    (entry / "chunk_00016.npz").unlink()
    encoded: list[int] = []
    real_encode = MusetalkPipeline.encode_crops

    def counting(self: MusetalkPipeline, crops: np.ndarray) -> torch.Tensor:
        encoded.append(len(crops))
        return real_encode(self, crops)

    monkeypatch.setattr(MusetalkPipeline, "encode_crops", counting)
    resumed = musetalk_engine.prepare(video, "talk", tmp_path / "cache")
    assert encoded == [4]  # only the missing chunk's frames
    torch.testing.assert_close(resumed.latents, first.latents)
    assert (entry / COMPLETE_MARKER).is_file()

    (entry / "chunk_00000.npz").write_bytes(b"not an npz")  # a damaged complete entry
    rebuilt = musetalk_engine.prepare(video, "talk", tmp_path / "cache")
    assert encoded == [4, 16]
    torch.testing.assert_close(rebuilt.latents, first.latents)


def test_face_parsing_masks_when_weights_are_present(
    parsing_models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = MusetalkEngine(parsing_models_dir, device="cpu")
    with caplog.at_level(logging.INFO, logger=prepare_module.__name__):
        prepared = engine.prepare(DEFAULT_AVATAR, "default", tmp_path)
    assert "BiSeNet blend masks" in caplog.text
    x0, y0, x1, y1 = prepared.boxes[0]
    assert prepared.masks[0].shape == (y1 - y0, x1 - x0)
    asyncio.run(engine.aclose())


def test_a_source_without_a_face_is_refused(
    musetalk_engine: MusetalkEngine, tmp_path: Path
) -> None:
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 128, np.uint8))
    with pytest.raises(AvatarSourceError, match="no face"):
        musetalk_engine.prepare(blank, "blank", tmp_path)


async def test_one_frame_per_640_samples_in_any_chunking(
    musetalk_engine: MusetalkEngine, avatar: MusetalkAvatar
) -> None:
    pcm = noise_speech(13)
    frames = await collect(musetalk_engine, avatar, chunked(pcm, [1, 5, 2]))
    assert len(frames) == 13
    assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for f in frames)
    # Only the lower face changes: the forehead and the background are the idle loop's.
    for tick, frame in enumerate(frames):
        np.testing.assert_array_equal(frame[:60], avatar.idle_frame(tick)[:60])
    assert any(np.any(f != avatar.idle_frame(t)) for t, f in enumerate(frames))


async def test_concurrent_sessions_get_their_own_frames_in_order(
    musetalk_engine: MusetalkEngine, avatar: MusetalkAvatar, mirrored: MusetalkAvatar
) -> None:
    first, second = noise_speech(10, seed=1), noise_speech(7, seed=2)
    alone_a = await collect(musetalk_engine, avatar, chunked(first, [10]))
    alone_b = await collect(musetalk_engine, mirrored, chunked(second, [7]))
    stats = worker_stats(musetalk_engine)
    batches_before = stats.batches["frame"]
    together_a, together_b = await asyncio.gather(
        collect(musetalk_engine, avatar, chunked(first, [2, 3], pause_s=0.01)),
        collect(musetalk_engine, mirrored, chunked(second, [1, 4], pause_s=0.01)),
    )
    assert len(together_a) == 10 and len(together_b) == 7
    # Batched with the other session or not, each frame is the one computed alone.
    for alone, together in ((alone_a, together_a), (alone_b, together_b)):
        for a, b in zip(alone, together, strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert stats.batches["frame"] > batches_before


async def test_an_interrupted_session_drops_its_pending_jobs(
    musetalk_engine: MusetalkEngine, avatar: MusetalkAvatar
) -> None:
    stats = worker_stats(musetalk_engine)
    computed, dropped = stats.jobs["frame"], stats.dropped
    frames = musetalk_engine.frames(avatar, chunked(noise_speech(60), [60]))
    await anext(frames)
    await frames.aclose()  # barge-in
    await asyncio.sleep(0.5)
    assert stats.dropped > dropped
    assert stats.jobs["frame"] - computed < 60 - 8  # most frames were never computed


async def test_held_back_frames_are_finished_when_the_audio_stalls(
    musetalk_engine: MusetalkEngine, avatar: MusetalkAvatar
) -> None:
    """Frames waiting for look-ahead don't wait for the next sentence past the stall limit."""
    arrivals: list[np.ndarray] = []
    release, sixth = asyncio.Event(), asyncio.Event()

    async def two_sentences() -> AsyncIterator[np.ndarray]:
        yield noise_speech(6)
        await release.wait()
        yield noise_speech(4, seed=5)

    async def consume() -> None:
        async for frame, _ in musetalk_engine.frames(avatar, two_sentences()):
            arrivals.append(frame)
            if len(arrivals) == 6:
                sixth.set()

    consumer = asyncio.create_task(consume())
    # All 6 frames come before the second sentence, LOOKAHEAD_TICKS of them after the stall.
    await asyncio.wait_for(sixth.wait(), 30)
    release.set()
    await consumer
    assert len(arrivals) == 10


async def test_a_warp_avatar_is_refused(
    musetalk_engine: MusetalkEngine, avatar: MusetalkAvatar
) -> None:
    other = PreparedAvatar("x", "y", avatar.idle_frames)
    with pytest.raises(TypeError):
        await anext(musetalk_engine.frames(other, chunked(noise_speech(1), [1])))
