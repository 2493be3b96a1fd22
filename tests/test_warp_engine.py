"""The warp lip-sync engine: face geometry, preparation cache, idle loop and speech frames."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpuserver.engines import create_engine
from gpuserver.engines.base import AvatarSourceError
from gpuserver.engines.face import FaceGeometry, detect_face_geometry
from gpuserver.engines.mouth_features import MouthPose, MouthTracker
from gpuserver.engines.warp import IDLE_FRAMES, WarpAvatar, WarpEngine, build_mouth_rig
from gpuserver.media import SAMPLE_RATE, SAMPLES_PER_TICK

DEFAULT_AVATAR = Path(__file__).parents[1] / "gpuserver" / "assets" / "avatars" / "default.png"
ARTIFACTS = Path(__file__).parent / "artifacts" / "warp"
MOUTH = (slice(125, 175), slice(190, 260))  # rows, columns around the default avatar's mouth
FOREHEAD = (slice(70, 85), slice(200, 250))
CORNER = (slice(0, 40), slice(0, 40))
LEFT_EYE = (slice(92, 108), slice(192, 214))

# First three formants (Hz) of a few vowels.
VOWELS = {
    "a": (750, 1200, 2500),
    "e": (500, 1900, 2600),
    "i": (300, 2300, 3000),
    "o": (500, 900, 2400),
    "u": (320, 800, 2300),
}


def vowel(name: str, seconds: float, rng: np.random.Generator, f0: float = 140.0) -> np.ndarray:
    """A voiced vowel: a vibrato'd harmonic series shaped by formant resonances."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    pitch = f0 * (1 + 0.04 * np.sin(2 * np.pi * 3 * t)) * (1 + 0.02 * rng.standard_normal())
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    signal = np.zeros(n)
    for harmonic in range(1, int(7000 / f0)):
        freq = harmonic * f0
        gain = sum(
            weight / np.sqrt(1 + ((freq - formant) / 60) ** 2)
            for formant, weight in zip(VOWELS[name], (1.0, 0.6, 0.3), strict=True)
        )
        signal += gain / np.sqrt(harmonic) * np.sin(harmonic * phase)
    return signal * np.sin(np.pi * np.arange(n) / n) ** 0.6  # syllable envelope


def speech(pattern: str, seed: int = 7, syllable_s: float = 0.22, gain: float = 0.5) -> np.ndarray:
    """Speech-like int16 PCM, whole ticks: vowels, 's' = hiss, ' ' = 0.4 s pause."""
    rng = np.random.default_rng(seed)
    parts = []
    for item in pattern:
        if item == " ":
            parts.append(np.zeros(int(0.4 * SAMPLE_RATE)))
        elif item == "s":
            n = int(0.12 * SAMPLE_RATE)
            parts.append(0.15 * np.diff(rng.standard_normal(n + 1)) * np.hanning(n))
        else:
            parts.append(vowel(item, syllable_s, rng))
    signal = np.concatenate(parts)
    pcm = (signal / np.abs(signal).max() * gain * 32767).astype(np.int16)
    return np.concatenate([pcm, np.zeros(-len(pcm) % SAMPLES_PER_TICK, np.int16)])


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * 25) * SAMPLES_PER_TICK, np.int16)


async def _chunks(pcm: np.ndarray, sizes_in_ticks: Sequence[int]) -> AsyncIterator[np.ndarray]:
    start = 0
    for ticks in sizes_in_ticks:
        yield pcm[start : start + ticks * SAMPLES_PER_TICK]
        start += ticks * SAMPLES_PER_TICK
    if start < len(pcm):
        yield pcm[start:]


async def render(
    engine: WarpEngine,
    avatar: WarpAvatar,
    pcm: np.ndarray,
    sizes_in_ticks: Sequence[int] = (),
) -> list[np.ndarray]:
    return [frame async for frame, _ in engine.frames(avatar, _chunks(pcm, sizes_in_ticks))]


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def engine() -> WarpEngine:
    return WarpEngine()


@pytest.fixture(scope="module")
def avatar(engine: WarpEngine, tmp_path_factory: pytest.TempPathFactory) -> WarpAvatar:
    return engine.prepare(DEFAULT_AVATAR, "default", tmp_path_factory.mktemp("cache"))


class CountingDetector:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, image: np.ndarray) -> FaceGeometry:
        self.calls += 1
        return detect_face_geometry(image)


def test_default_avatar_geometry_is_near_the_known_face() -> None:
    geometry = detect_face_geometry(cv2.imread(str(DEFAULT_AVATAR)))
    x, y, w, h = geometry.face_box
    assert np.allclose((x, y, w, h), (177, 66, 95, 95), atol=6)
    assert np.allclose(geometry.mouth_center, (224, 145), atol=11)  # mouth x196-250, y129-156
    assert 35 <= geometry.mouth_width <= 60
    assert np.allclose(geometry.left_eye, (203, 100), atol=8)
    assert np.allclose(geometry.right_eye, (246, 102), atol=8)
    assert geometry.teeth_visible  # the astronaut smiles with her upper teeth showing


def test_face_geometry_round_trips_through_json() -> None:
    geometry = detect_face_geometry(cv2.imread(str(DEFAULT_AVATAR)))
    assert FaceGeometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry


def test_image_without_face_raises_avatar_source_error(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    source = tmp_path / "wall.png"
    cv2.imwrite(str(source), cv2.merge([gradient, gradient[::-1], gradient.T]))
    with pytest.raises(AvatarSourceError, match="no face"):
        WarpEngine().prepare(source, "wall", tmp_path / "cache")


def test_unreadable_or_unsupported_source_raises_avatar_source_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for source in (broken, text, tmp_path / "missing.png"):
        with pytest.raises(AvatarSourceError):
            WarpEngine().prepare(source, "x", tmp_path / "cache")


def test_second_prepare_loads_cache_without_detection(tmp_path: Path) -> None:
    detector = CountingDetector()
    first = WarpEngine(detector=detector).prepare(DEFAULT_AVATAR, "a", tmp_path)
    second = WarpEngine(detector=detector).prepare(DEFAULT_AVATAR, "b", tmp_path)
    assert detector.calls == 1
    assert second.geometry == first.geometry
    assert second.source_digest == first.source_digest
    assert np.array_equal(second.base_image, first.base_image)
    assert (tmp_path / "warp" / first.source_digest / "avatar.json").is_file()


def test_prepare_reports_progress_up_to_completion(tmp_path: Path) -> None:
    reports: list[tuple[str, float]] = []
    WarpEngine().prepare(DEFAULT_AVATAR, "a", tmp_path, lambda s, f: reports.append((s, f)))
    fractions = [fraction for _, fraction in reports]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert all(0.0 <= fraction <= 1.0 for fraction in fractions)


@pytest.mark.parametrize(
    ("source_size", "expected"), [((1001, 1003), (718, 720)), ((511, 509), (510, 508))]
)
def test_sources_get_even_sides_no_longer_than_720(
    tmp_path: Path, source_size: tuple[int, int], expected: tuple[int, int]
) -> None:
    image = cv2.resize(cv2.imread(str(DEFAULT_AVATAR)), source_size, interpolation=cv2.INTER_AREA)
    source = tmp_path / "portrait.jpg"
    cv2.imwrite(str(source), image)
    avatar = WarpEngine().prepare(source, "portrait", tmp_path / "cache")
    assert avatar.size == expected
    assert all(frame.shape[:2] == expected[::-1] for frame in avatar.idle_frames)


def test_video_source_uses_its_first_frame(tmp_path: Path) -> None:
    image = cv2.imread(str(DEFAULT_AVATAR))
    source = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 25, (512, 512))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for _ in range(5):
        writer.write(image)
    writer.release()
    avatar = WarpEngine().prepare(source, "clip", tmp_path / "cache")
    assert avatar.size == (512, 512)
    assert abs(avatar.geometry.face_box[0] - 177) <= 8


def test_idle_loop_blinks_yet_loops_seamlessly(avatar: WarpAvatar) -> None:
    frames = avatar.idle_frames
    assert len(frames) == IDLE_FRAMES
    assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for f in frames)
    # The iris and lashes are the dark pixels of the eye: a closing lid hides them.
    dark = [int((cv2.cvtColor(f[LEFT_EYE], cv2.COLOR_BGR2GRAY) < 70).sum()) for f in frames]
    shut = sum(count < 0.25 * dark[0] for count in dark)
    closing = sum(count < 0.7 * dark[0] for count in dark)
    assert 2 <= shut <= closing <= 16  # one or two blinks of a few frames each
    assert np.array_equal(frames[0], avatar.base_image)  # the loop starts at the portrait
    assert mean_diff(frames[0], frames[-1]) < 0.5  # ... and returns to it
    assert max(mean_diff(a, b) for a, b in itertools.pairwise(frames)) < 2  # no jumps
    assert 0 < mean_diff(frames[0], frames[IDLE_FRAMES // 2]) < 5  # breathing: subtle


async def test_frames_have_avatar_shape_and_one_per_640_samples(
    engine: WarpEngine, avatar: WarpAvatar
) -> None:
    pcm = speech("aeiou")
    for sizes in ((), (1, 2, 3, 10), (len(pcm) // SAMPLES_PER_TICK,)):
        frames = await render(engine, avatar, pcm, sizes)
        assert len(frames) == len(pcm) // SAMPLES_PER_TICK
        assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for f in frames)


async def test_frame_count_and_content_do_not_depend_on_chunking(
    engine: WarpEngine, avatar: WarpAvatar
) -> None:
    pcm = np.concatenate([speech("ao ie"), silence(0.2)])
    whole = await render(engine, avatar, pcm)
    chunked = await render(engine, avatar, pcm, (1, 3, 7, 2, 60, 1))
    assert len(whole) == len(chunked) == len(pcm) // SAMPLES_PER_TICK
    assert all(f.shape == avatar.base_image.shape and f.dtype == np.uint8 for f in chunked)
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked, strict=True))


async def test_rendering_is_deterministic(engine: WarpEngine, avatar: WarpAvatar) -> None:
    pcm = speech("oa eu")
    first, second = await render(engine, avatar, pcm), await render(engine, avatar, pcm)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


async def test_speech_moves_the_mouth_but_not_forehead_or_background(
    engine: WarpEngine, avatar: WarpAvatar
) -> None:
    pcm = speech("aoaea")
    spoken = await render(engine, avatar, pcm)
    quiet = await render(engine, avatar, np.zeros_like(pcm))
    mouth_changes = [mean_diff(s[MOUTH], q[MOUTH]) for s, q in zip(spoken, quiet, strict=True)]
    assert max(mouth_changes) > 15
    for s, q in zip(spoken, quiet, strict=True):
        assert np.array_equal(s[FOREHEAD], q[FOREHEAD])
        assert np.array_equal(s[CORNER], q[CORNER])


async def test_silence_keeps_the_mouth_closed(engine: WarpEngine, avatar: WarpAvatar) -> None:
    frames = await render(engine, avatar, silence(1.2), (5, 25))
    assert all(np.array_equal(f, avatar.idle_frame(t)) for t, f in enumerate(frames))
    # Near the portrait's mouth: only the sub-pixel breathing of the idle loop moves it.
    assert max(mean_diff(f[MOUTH], avatar.base_image[MOUTH]) for f in frames) < 5
    assert not any(_dark_mouth(f, avatar.base_image).any() for f in frames)


async def test_mouth_closes_in_a_pause_inside_speech(
    engine: WarpEngine, avatar: WarpAvatar
) -> None:
    before, pause, after = speech("aoa"), silence(0.8), speech("ea", seed=3)
    frames = await render(engine, avatar, np.concatenate([before, pause, after]))
    pause_start = len(before) // SAMPLES_PER_TICK
    assert mean_diff(frames[pause_start - 3][MOUTH], avatar.idle_frame(pause_start - 3)[MOUTH]) > 5
    settled = range(pause_start + 10, pause_start + len(pause) // SAMPLES_PER_TICK)
    for tick in settled:  # 0.4 s after the voice stops the lips are back together
        assert mean_diff(frames[tick][MOUTH], avatar.idle_frame(tick)[MOUTH]) < 0.5


def _dark_mouth(frame: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Pixels of the mouth window that turned into dark mouth interior."""
    gray = cv2.cvtColor(frame[MOUTH], cv2.COLOR_BGR2GRAY).astype(np.int16)
    base_gray = cv2.cvtColor(base[MOUTH], cv2.COLOR_BGR2GRAY).astype(np.int16)
    return (gray < 80) & (base_gray - gray > 40)


async def test_visemes_open_wide_for_ah_and_narrow_for_oo(
    engine: WarpEngine, avatar: WarpAvatar
) -> None:
    """Steady vowels give distinct mouth shapes; the frames are saved for a visual check."""
    samples = {
        "silence": silence(0.6),
        "small_vowel": speech("e", syllable_s=0.6, gain=0.06),
        "wide_open": speech("a", syllable_s=0.6),
        "round_oo": speech("u", syllable_s=0.6),
        "spread_ee": speech("i", syllable_s=0.6),
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    dark: dict[str, np.ndarray] = {}
    for name, pcm in samples.items():
        frames = await render(engine, avatar, pcm)
        middle = len(frames) // 2
        cv2.imwrite(str(ARTIFACTS / f"{name}.png"), frames[middle])
        dark[name] = _dark_mouth(frames[middle], avatar.idle_frame(middle))
    area = {name: int(mask.sum()) for name, mask in dark.items()}
    assert area["silence"] == 0
    assert 0 < area["small_vowel"] < area["wide_open"]
    assert area["round_oo"] < area["wide_open"]
    assert area["spread_ee"] < area["wide_open"]
    width = {
        name: np.ptp(np.nonzero(dark[name].any(axis=0))[0]) for name in ("round_oo", "spread_ee")
    }
    assert width["round_oo"] < width["spread_ee"]


def test_mouth_tracker_opens_fast_closes_slower_and_shuts_in_silence() -> None:
    tracker = MouthTracker()
    loud = speech("a", syllable_s=0.6)[4 * SAMPLES_PER_TICK : 5 * SAMPLES_PER_TICK]
    opening = [tracker.step(loud).open for _ in range(3)]
    closing = [tracker.step(silence(0.04)).open for _ in range(15)]
    assert opening[0] >= 0.6 * opening[-1]  # most of the way open in one frame
    assert closing[0] >= 0.5 * opening[-1]  # ... but only part of the way closed
    assert opening[0] > opening[-1] - closing[0]
    assert closing[-1] < 0.01


def test_create_engine_knows_warp_and_rejects_unknown_names() -> None:
    assert isinstance(create_engine("warp", max_side=480), WarpEngine)
    with pytest.raises(ValueError, match="known engines: warp"):
        create_engine("nope")


def test_wide_opening_shows_synthetic_teeth_only_when_the_source_hides_them(
    avatar: WarpAvatar,
) -> None:
    """Sources without visible teeth get a hint of upper teeth in wide openings."""
    no_teeth = dataclasses.replace(avatar.geometry, teeth_visible=False)
    rig = build_mouth_rig(avatar.base_image, no_teeth)
    wide = MouthPose(1.0, 0.0)
    with_hint = rig.render(avatar.base_image, wide)[MOUTH]
    without = avatar.rig.render(avatar.base_image, wide)[MOUTH]
    brighter = cv2.cvtColor(with_hint, cv2.COLOR_BGR2GRAY).astype(np.int16) - cv2.cvtColor(
        without, cv2.COLOR_BGR2GRAY
    )
    assert (brighter > 60).sum() > 20
