"""The avatar manager: its registry (rescanned on use), frame streams (the seed's
generate_frames_stream), uploads and memory."""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpuserver.avatar_manager import (
    MAX_OPEN_UPLOADS,
    AvatarConflictError,
    AvatarEntry,
    AvatarManager,
    AvatarNotFoundError,
    UploadsBusyError,
    bundled_default_source,
    clean_name,
)
from gpuserver.config import AvatarSettings
from gpuserver.engines.base import (
    AvatarSourceError,
    LipSyncEngine,
    PhaseSource,
    PreparedAvatar,
    Progress,
    source_digest,
)
from gpuserver.engines.image_size import image_size
from gpuserver.engines.warp import WarpEngine, load_source_image
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


# --- uploads: bombs, conflicts, failures, the preparation queue, the memory budget ----------


def png(width: int, height: int) -> bytes:
    return cv2.imencode(".png", np.full((height, width, 3), 90, np.uint8))[1].tobytes()


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header claiming a huge picture (2.7 GB decoded), with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(cv2, "imread", refuse)
    monkeypatch.setattr(cv2, "imdecode", refuse)


@pytest.mark.usefixtures("no_decoding")
async def test_a_decompression_bomb_is_refused_before_it_is_decoded(
    manager: AvatarManager,
) -> None:
    with pytest.raises(AvatarSourceError, match="30000x30000 pixels"):
        await manager.add(png_bomb(), "bomb.png")
    assert not manager.settings.dir.exists() or not any(manager.settings.dir.iterdir())


@pytest.mark.usefixtures("no_decoding")
def test_a_bomb_dropped_into_the_directory_is_refused_by_the_decoder_too(tmp_path: Path) -> None:
    source = tmp_path / "bomb.png"
    source.write_bytes(png_bomb(20_000, 20_000))
    with pytest.raises(AvatarSourceError, match="pixels"):
        load_source_image(source)


def test_image_sizes_are_read_from_png_jpeg_webp_and_bmp_headers() -> None:
    picture = np.zeros((37, 53, 3), np.uint8)
    for suffix in (".png", ".jpg", ".webp", ".bmp"):
        assert image_size(cv2.imencode(suffix, picture)[1].tobytes()) == (53, 37)
    with pytest.raises(ValueError, match="not a PNG"):
        image_size(b"GIF89a")


class CountingEngine(LipSyncEngine):
    """Prepares any source in no time into 1 MiB of frames; a test can hold it in prepare."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__(render_threads=1)
        self.prepared: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False

    def prepare(
        self, source: Path, avatar_id: str, cache_dir: Path, progress: Progress | None = None
    ) -> PreparedAvatar:
        self.hold.wait(10)
        (cache_dir / self.name / source_digest(source)).mkdir(parents=True, exist_ok=True)
        if self.fail:
            raise AvatarSourceError("no face found")
        self.prepared.append(avatar_id)
        frames = (np.zeros((512, 1024, 2), np.uint8),)  # 1 MiB
        return PreparedAvatar(avatar_id, source_digest(source), frames)

    def lip_sync(
        self, avatar: PreparedAvatar, audio: AsyncIterable[np.ndarray], phase: PhaseSource
    ) -> AsyncIterator[np.ndarray]:
        raise NotImplementedError


@pytest.fixture
async def counting(tmp_path: Path) -> AsyncIterator[AvatarManager]:
    settings = AvatarSettings(dir=tmp_path / "a", cache_dir=tmp_path / "c", memory_cache_mb=2)
    manager = AvatarManager(CountingEngine(), settings)
    yield manager
    await manager.aclose()


async def test_a_second_upload_of_an_id_gets_a_conflict_unless_it_replaces(
    counting: AvatarManager,
) -> None:
    await counting.add(png(64, 64), "me.png", name="Me")
    with pytest.raises(AvatarConflictError, match="replace=true"):
        await counting.add(png(64, 64), "me.png")
    entry = await counting.add(png(80, 80), "me.jpg", name="New me", replace=True)
    assert (entry.id, entry.name, entry.source.name) == ("me", "New me", "me.jpg")
    assert sorted(p.name for p in counting.settings.dir.iterdir()) == ["me.jpg", "me.json"]


async def test_concurrent_uploads_of_one_id_one_wins_the_others_conflict(
    counting: AvatarManager,
) -> None:
    results = await asyncio.gather(
        *(counting.add(png(64, 64), "twin.png", replace=True) for _ in range(4)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, AvatarEntry) for r in results) == 1
    assert sum(isinstance(r, AvatarConflictError) for r in results) == 3
    assert [p.name for p in counting.settings.dir.iterdir()] == ["twin.png"]


async def test_a_failed_upload_keeps_the_old_avatar_and_leaves_nothing_behind(
    counting: AvatarManager,
) -> None:
    engine = counting.engine
    assert isinstance(engine, CountingEngine)
    old = await counting.add(png(64, 64), "keep.png", name="Keeper")
    cache = counting.settings.cache_dir / engine.name
    before = sorted(p.name for p in cache.iterdir())
    engine.fail = True
    with pytest.raises(AvatarSourceError, match="no face"):
        await counting.add(png(99, 99), "keep.png", name="Broken", replace=True)
    assert sorted(p.name for p in counting.settings.dir.iterdir()) == ["keep.json", "keep.png"]
    assert (counting.settings.dir / "keep.png").read_bytes() == png(64, 64)
    assert sorted(p.name for p in cache.iterdir()) == before
    assert counting.entry("keep") == old
    assert (await counting.prepared("keep")).avatar_id == "keep"


async def test_uploads_prepare_one_at_a_time_and_are_told_their_place(
    counting: AvatarManager,
) -> None:
    engine = counting.engine
    assert isinstance(engine, CountingEngine)
    engine.hold.clear()
    places: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    uploads = [await counting.begin_upload(png(64, 64), f"{i}.png") for i in places]
    tasks = [asyncio.create_task(u.finish(place=places[u.avatar_id].append)) for u in uploads]
    await asyncio.sleep(0.2)
    engine.hold.set()
    await asyncio.gather(*tasks)
    assert engine.prepared == ["a", "b", "c"]
    assert places == {"a": [], "b": [1], "c": [2, 1]}


async def test_uploads_beyond_the_open_limit_are_told_to_come_back(
    counting: AvatarManager,
) -> None:
    pending = [
        await counting.begin_upload(png(64, 64), f"{i}.png") for i in range(MAX_OPEN_UPLOADS)
    ]
    with pytest.raises(UploadsBusyError, match="try again later"):
        await counting.begin_upload(png(64, 64), "late.png")
    await pending[0].finish()
    await counting.begin_upload(png(64, 64), "late.png")  # a place came free


async def test_prepared_avatars_over_the_memory_budget_go_least_recently_used_first(
    counting: AvatarManager,
) -> None:
    engine = counting.engine
    assert isinstance(engine, CountingEngine)
    counting.settings.dir.mkdir(parents=True)
    for avatar_id in ("a", "b"):
        (counting.settings.dir / f"{avatar_id}.png").write_bytes(png(64, 64))
    await counting.rescan()
    await counting.prepared("default")
    await counting.prepared("a")
    assert counting.in_memory == ["default", "a"]  # 2 MiB: the budget
    await counting.prepared("b")
    assert counting.in_memory == ["default", "b"]  # the default stays
    await counting.prepared("a")
    assert counting.in_memory == ["default", "a"]
    assert engine.prepared == ["default", "a", "b", "a"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("  Ada\n\tLovelace\u202e ", "Ada Lovelace"), ("\x00\x1b\u200b", None), ("x" * 64, "x" * 64)],
)
def test_avatar_names_lose_control_characters(name: str, expected: str | None) -> None:
    assert clean_name(name, 64) == expected


async def test_an_overlong_avatar_name_is_refused(counting: AvatarManager) -> None:
    with pytest.raises(AvatarSourceError, match="at most 64 characters"):
        await counting.add(png(64, 64), "me.png", name="n" * 65)
