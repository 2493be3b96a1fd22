"""Avatar material for MuseTalk (`realtime_inference.py::prepare_material`), cached on disk.

Per source frame: a crop box, the UNet latents of its 256x256 crop and a blend mask. The
loop played between utterances: a video's frames forwards then backwards (the official
ping-pong cycle); a still image gets the warp engine's breathing-and-blinking loop, every
loop frame sharing the image's one box, latent and mask (the mask keeps only the lower
face, so blinks and sub-pixel breathing never meet the generated mouth).

Cache: `cache_dir/musetalk/<source digest>/` holds meta.json (the key: cache version, size
limits, weights fingerprint), boxes.npy, chunk_NNNNN.npz (latents + masks of CHUNK_FRAMES
frames) and `complete`, written last. A complete entry is loaded without touching a model;
an interrupted one resumes from its finished chunks; a stale key starts over.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from gpuserver.engines.base import (
    IMAGE_SUFFIXES,
    AvatarSourceError,
    PreparedAvatar,
    Progress,
    source_digest,
)
from gpuserver.engines.face import detect_face_geometry
from gpuserver.engines.musetalk.blend import blend_mask, paste_face
from gpuserver.engines.musetalk.facebox import Landmarker, landmarks_available, locate_boxes
from gpuserver.engines.musetalk.pipeline import CROP_SIZE, MusetalkPipeline
from gpuserver.engines.preparation import report, scaled, write_atomically
from gpuserver.engines.warp import build_idle_loop, fit_even, load_source_image

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: dlib landmarks, mean-face fallback, smoothed video boxes
CACHE_SUBDIR = "musetalk"
CHUNK_FRAMES = 16  # frames per VAE batch and per resumable cache file
MAX_VIDEO_FRAMES = 300  # 12 s at 25 fps: a longer source is cut (memory: frames stay in RAM)
DEFAULT_MAX_SIDE = 1920  # 1080p sources keep their resolution (the crop comes from them)
COMPLETE_MARKER = "complete"

Material = tuple[np.ndarray, torch.Tensor, tuple[np.ndarray, ...]]  # boxes, latents, masks


@dataclass(eq=False)
class MusetalkAvatar(PreparedAvatar):
    """Prepared material; `cycle[k]` is the source frame behind idle-loop frame k."""

    boxes: np.ndarray = field(repr=False, kw_only=True)  # [sources, 4] int32 x0, y0, x1, y1
    latents: torch.Tensor = field(repr=False, kw_only=True)  # [sources, 8, 32, 32] float32
    masks: tuple[np.ndarray, ...] = field(repr=False, kw_only=True)  # uint8, over each box
    cycle: np.ndarray = field(repr=False, kw_only=True)  # [len(idle_frames)] source index

    def latent(self, tick: int) -> torch.Tensor:
        return self.latents[int(self.cycle[tick % len(self.cycle)])]

    def render(self, tick: int, face: np.ndarray) -> np.ndarray:
        """Idle-loop frame `tick` with the generated 256x256 `face` pasted in."""
        source = int(self.cycle[tick % len(self.cycle)])
        x0, y0, x1, y1 = (int(v) for v in self.boxes[source])
        return paste_face(self.idle_frame(tick), face, (x0, y0, x1, y1), self.masks[source])


@dataclass(frozen=True)
class PrepareTools:
    """The models a cache miss needs (loaded only then)."""

    pipeline: MusetalkPipeline
    landmarker: Landmarker | None


def prepare_avatar(
    source: Path,
    avatar_id: str,
    cache_dir: Path,
    weights_fingerprint: str,
    tools: Callable[[], PrepareTools],
    progress: Progress | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
) -> MusetalkAvatar:
    if not source.is_file():
        raise AvatarSourceError(f"avatar source {source} does not exist")
    digest = source_digest(source)
    directory = cache_dir / CACHE_SUBDIR / digest
    report(progress, "loading", 0.0)
    frames = load_frames(source, max_side)
    key = {
        "version": CACHE_VERSION,
        "max_side": max_side,
        "frames": len(frames),
        "weights": weights_fingerprint,
        "landmarks": landmarks_available(),
    }
    if _cached_key(directory) != key:
        shutil.rmtree(directory, ignore_errors=True)
    material = None
    if (directory / COMPLETE_MARKER).is_file():
        material = _load_material(directory, len(frames))
        if material is None:
            logger.warning("avatar %s: unreadable cache entry %s, rebuilding", avatar_id, directory)
        else:
            logger.info("avatar %s: using cached MuseTalk material from %s", avatar_id, directory)
    if material is None:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / "meta.json", json.dumps(key, indent=2).encode())
        material = _build_material(directory, frames, tools(), progress)
        write_atomically(directory / COMPLETE_MARKER, b"")
        logger.info("avatar %s: MuseTalk material cached in %s", avatar_id, directory)
    boxes, latents, masks = material
    report(progress, "idle loop", 0.9)
    idle, cycle = _idle_cycle(frames, source)
    report(progress, "ready", 1.0)
    return MusetalkAvatar(
        avatar_id=avatar_id,
        source_digest=digest,
        idle_frames=idle,
        boxes=boxes,
        latents=latents,
        masks=masks,
        cycle=cycle,
    )


def load_frames(source: Path, max_side: int = DEFAULT_MAX_SIDE) -> list[np.ndarray]:
    """The source's BGR frames (one for an image), longer side at most `max_side`."""
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [fit_even(load_source_image(source), max_side)]
    capture = cv2.VideoCapture(str(source))
    frames = []
    try:
        while len(frames) < MAX_VIDEO_FRAMES:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(fit_even(frame, max_side))
        truncated = capture.read()[0]
    finally:
        capture.release()
    if not frames:
        return [fit_even(load_source_image(source), max_side)]  # raises its error
    if truncated:
        logger.warning("%s: using its first %d frames", source.name, MAX_VIDEO_FRAMES)
    return frames


def _build_material(
    directory: Path, frames: list[np.ndarray], tools: PrepareTools, progress: Progress | None
) -> Material:
    parser = tools.pipeline.models.face_parser
    logger.info(
        "preparing %d frame(s): %s boxes, %s blend masks",
        len(frames),
        "dlib landmark" if tools.landmarker is not None else "OpenCV fallback",
        "BiSeNet" if parser is not None else "elliptical",
    )
    boxes_path = directory / "boxes.npy"
    boxes = _load_boxes(boxes_path)
    if boxes is None:
        boxes = locate_boxes(frames, tools.landmarker, scaled(progress, 0.05, 0.25))
        write_atomically(boxes_path, _npy_bytes(boxes))
    latents: list[torch.Tensor] = []
    masks: list[np.ndarray] = []
    for start in range(0, len(frames), CHUNK_FRAMES):
        path = _chunk_path(directory, start)
        chunk = _load_chunk(path)
        if chunk is None:
            stop = min(start + CHUNK_FRAMES, len(frames))
            crops = np.stack([crop_face(frames[i], boxes[i]) for i in range(start, stop)])
            chunk = (
                tools.pipeline.encode_crops(crops),
                [blend_mask(frames[i], tuple(boxes[i]), parser) for i in range(start, stop)],
            )
            write_atomically(path, _chunk_bytes(*chunk))
        latents.append(chunk[0])
        masks.extend(chunk[1])
        report(progress, "encoding face", 0.25 + 0.65 * (start + len(chunk[1])) / len(frames))
    return boxes, torch.cat(latents), tuple(masks)


def crop_face(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The official crop: frame[box] resized to 256x256 with Lanczos."""
    x0, y0, x1, y1 = (int(v) for v in box)
    size = (CROP_SIZE, CROP_SIZE)
    return cv2.resize(frame[y0:y1, x0:x1], size, interpolation=cv2.INTER_LANCZOS4)


def _load_material(directory: Path, frame_count: int) -> Material | None:
    """A complete entry's material; None if any file is unreadable."""
    boxes = _load_boxes(directory / "boxes.npy")
    if boxes is None:
        return None
    latents, masks = [], []
    for start in range(0, frame_count, CHUNK_FRAMES):
        chunk = _load_chunk(_chunk_path(directory, start))
        if chunk is None:
            return None
        latents.append(chunk[0])
        masks.extend(chunk[1])
    return boxes, torch.cat(latents), tuple(masks)


def _idle_cycle(
    frames: list[np.ndarray], source: Path
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    if len(frames) > 1:
        order = np.concatenate([np.arange(len(frames)), np.arange(len(frames))[::-1]])
        return tuple(frames[i] for i in order), order
    try:
        idle = build_idle_loop(frames[0], detect_face_geometry(frames[0]))
    except AvatarSourceError:  # the landmark model found a face the cascade does not
        logger.info("%s: no OpenCV face geometry, idle loop is the still image", source.name)
        idle = (frames[0],)
    return idle, np.zeros(len(idle), np.int64)


def _cached_key(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _load_boxes(path: Path) -> np.ndarray | None:
    try:
        return np.load(path)
    except (OSError, ValueError):
        return None


def _chunk_path(directory: Path, start: int) -> Path:
    return directory / f"chunk_{start:05d}.npz"


def _chunk_bytes(latents: torch.Tensor, masks: list[np.ndarray]) -> bytes:
    arrays = {"latents": latents.numpy()} | {f"mask{i}": m for i, m in enumerate(masks)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_chunk(path: Path) -> tuple[torch.Tensor, list[np.ndarray]] | None:
    try:
        with np.load(path) as data:
            latents = torch.from_numpy(data["latents"])
            return latents, [data[f"mask{i}"] for i in range(len(latents))]
    except (OSError, ValueError, KeyError):
        return None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
