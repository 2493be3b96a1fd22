"""The `warp` engine: CPU lip-sync by warping one portrait's mouth and jaw.

Preparation finds the face, precomputes unit displacement fields over a small mouth/jaw
region and renders an idle loop (breathing, blinks). Per video frame the audio block sets a
mouth pose (`mouth_features`), the fields are scaled by it and applied with one `cv2.remap`,
and the parted lips reveal a soft dark mouth interior. No model, no GPU.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from gpuserver.engines.base import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    AvatarSourceError,
    LipSyncEngine,
    PhaseSource,
    PreparedAvatar,
    Progress,
    source_digest,
)
from gpuserver.engines.face import FaceGeometry, detect_face_geometry
from gpuserver.engines.image_size import MAX_DECODE_PIXELS, check_image_pixels, check_pixels
from gpuserver.engines.mouth_features import MouthPose, MouthTracker
from gpuserver.engines.preparation import report, scaled, write_atomically
from gpuserver.media import SAMPLES_PER_TICK

logger = logging.getLogger(__name__)

Detector = Callable[[np.ndarray], FaceGeometry]

DEFAULT_MAX_SIDE = 720
CACHE_VERSION = 1
MAX_TICKS_PER_JOB = 50  # bounds the frames one worker-thread job holds in memory (2 s)

# Mouth rig, in mouth widths (mw), half mouth widths (u) or face heights (v).
DROP_MW = 0.30  # lower lip drop at open=1
LIFT_MW = 0.06  # upper lip lift at open=1
SPREAD_MW = 0.06  # each corner moves out this far for "ee"
ROUND_MW = 0.14  # ... and in this far for "oo"
ROUND_DROP = 0.8  # rounded lips part less and more narrowly, the jaw drops less
ROUND_LIFT = 1.8
ROUND_WIDTH_U = 0.7
ROUND_JAW = 0.7
LIP_PROFILE_POWER = 1.1  # >1 keeps the corners nearly closed
ROI_HALF_WIDTH_U = 2.1  # the jaw field fades to zero at the cheeks
ROI_ABOVE_V = 0.2  # up to the nostrils
ROI_BELOW_V = 0.62  # down to the neck
LOWER_LIP_V = 0.12  # below the lower lip the jaw's broad profile takes over
CHIN_V = 0.3  # the chin moves fully; below it the displacement fades out
CORNER_SIGMA_V = 0.08
REST_EPSILON = 0.02  # poses this close to rest render the untouched frame
EDGE_SOFTNESS_PX = 1.5
TONGUE_BGR = np.array([58, 52, 122], np.float32)
MOUTH_DEEP_BGR = np.array([14, 12, 30], np.float32)
TEETH_BGR = np.array([196, 206, 216], np.float32)
TEETH_MW = 0.1  # visible upper-teeth band at open=1
TEETH_OPEN = (0.25, 0.7)  # teeth fade in over this range of openings

# Idle loop.
IDLE_FRAMES = 100  # 4 s at 25 fps: one breath
BREATH_PX = 0.6
BLINK_STARTS = (30, 79)
BLINK_PROFILE = (0.35, 0.8, 1.0, 0.85, 0.55, 0.28, 0.1)  # fast close, slower open
EYE_HALF_WIDTH = 0.7  # of an eye opening's width: the lid covers the corners
EYE_HALF_HEIGHT = 0.27
LID_OVERSHOOT = 1.25  # a shut lid reaches a little past the estimated lower lid
LID_ANCHOR = 6.0  # in eye half-heights above the eye: the skin above stretches from here
SUPERSAMPLE = 4  # antialiases the closing lid's edge


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass(frozen=True, eq=False)
class MouthRig:
    """Unit warp fields of one avatar's mouth/jaw region (ROI-local pixel coordinates).

    A pose is rendered as `map = grid + open * field` (backward maps), so a frame costs a
    few multiply-adds on the small ROI and one remap. Rows above/below the lip line are
    clamped to it: the clamped band is where the lips part, filled with the mouth interior.
    """

    roi: tuple[slice, slice]
    gap: tuple[slice, slice]  # sub-window of the ROI the parted lips can reach
    grid_x: np.ndarray
    grid_y: np.ndarray
    open_wide: np.ndarray  # y displacement at open=1, neutral lips
    open_round: np.ndarray  # y displacement at open=1, rounded lips
    corners: np.ndarray  # x displacement moving the corners 1 px outwards
    clamp_low: np.ndarray
    clamp_high: np.ndarray
    lip_rows: np.ndarray  # lip line per ROI column
    below_lip: np.ndarray  # gap-window pixels at or below the lip line
    lift_wide: np.ndarray  # upper-lip rise per ROI column at open=1
    lift_round: np.ndarray
    drop_wide: np.ndarray  # lower-lip drop per ROI column at open=1
    drop_round: np.ndarray
    spread_px: float
    round_px: float
    teeth_px: float  # height of the synthetic teeth band at open=1; 0 if teeth already show

    def render(self, source: np.ndarray, pose: MouthPose) -> np.ndarray:
        """A copy of `source` with the mouth in `pose`."""
        frame = source.copy()
        if pose.open < REST_EPSILON and abs(pose.shape) < REST_EPSILON:
            return frame
        rounding = max(0.0, -pose.shape)
        wide, rounded = pose.open * (1 - rounding), pose.open * rounding
        raw_y = self.open_wide * wide
        raw_y += self.grid_y
        raw_y += self.open_round * rounded
        map_y = np.clip(raw_y, self.clamp_low, self.clamp_high)
        corner_px = self.spread_px * max(0.0, pose.shape) - self.round_px * rounding
        map_x = self.corners * -corner_px
        map_x += self.grid_x
        patch = cv2.remap(
            source[self.roi], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        parted = np.abs(raw_y[self.gap] - map_y[self.gap])
        patch[self.gap] = self._paint_interior(patch[self.gap], parted, wide, rounded)
        frame[self.roi] = patch
        return frame

    def _paint_interior(
        self, patch: np.ndarray, parted: np.ndarray, wide: float, rounded: float
    ) -> np.ndarray:
        """Blend the mouth interior where the lips parted (`parted`: gap depth in px).

        Dark in the shadow under the upper lip, warming to a tongue red towards the lower lip.
        """
        alpha = np.minimum(parted * (1 / EDGE_SOFTNESS_PX), 1.0)[..., None]
        columns = self.gap[1]
        lower_gap = wide * self.drop_wide[columns] + rounded * self.drop_round[columns]
        towards_top = np.where(self.below_lip, parted / np.maximum(lower_gap, 1e-3), 1.0)
        shade = _smoothstep(0.0, 0.7, towards_top)[..., None]
        colour = TONGUE_BGR + shade * (MOUTH_DEEP_BGR - TONGUE_BGR)
        teeth = self._teeth_alpha(wide, rounded)
        if teeth is not None:
            colour += teeth[..., None] * (TEETH_BGR - colour)
        blended = patch.astype(np.float32)
        blended += alpha * (colour - blended)
        return (blended + 0.5).astype(np.uint8)

    def _teeth_alpha(self, wide: float, rounded: float) -> np.ndarray | None:
        """A soft band of upper teeth under the raised upper lip for bigger openings."""
        opening = wide + rounded
        strength = float(_smoothstep(*TEETH_OPEN, np.float32(opening)))
        if self.teeth_px <= 0 or strength <= 0:
            return None
        columns = self.gap[1]
        top = self.lip_rows[columns] - wide * self.lift_wide[columns]
        top -= rounded * self.lift_round[columns]
        below_top = self.grid_y[self.gap] - top
        band = np.clip(1 - below_top / (self.teeth_px * opening), 0.0, 1.0)
        return band * (0.85 * strength)


def build_mouth_rig(image: np.ndarray, geometry: FaceGeometry) -> MouthRig:
    """Precompute the mouth/jaw fields of `image` (the avatar's base frame)."""
    height, width = image.shape[:2]
    face_h = geometry.face_box[3]
    centre_x, lip_y = geometry.mouth_center
    half_mw = geometry.mouth_width / 2
    x0 = max(0, math.floor(centre_x - ROI_HALF_WIDTH_U * half_mw))
    x1 = min(width, math.ceil(centre_x + ROI_HALF_WIDTH_U * half_mw) + 1)
    y0 = max(0, math.floor(lip_y - ROI_ABOVE_V * face_h))
    y1 = min(height, math.ceil(lip_y + ROI_BELOW_V * face_h) + 1)
    columns = np.arange(x0, x1, dtype=np.float32)
    u = (columns - centre_x) / half_mw
    lip_rows = _lip_curve(image, geometry, columns) - y0
    grid_x, grid_y = np.meshgrid(columns - x0, np.arange(y1 - y0, dtype=np.float32))
    v = (grid_y - lip_rows) / face_h
    # Falloffs measured per column between the (curved) lip line and the ROI border, so
    # every field is exactly zero on the border: no seams.
    upper = _smoothstep(0.0, 1.0, grid_y / np.maximum(lip_rows, 1.0))
    chin_rows = lip_rows + CHIN_V * face_h
    lower = 1 - _smoothstep(
        0.0, 1.0, (grid_y - chin_rows) / np.maximum(y1 - 1 - y0 - chin_rows, 1.0)
    )
    jaw_blend = _smoothstep(0.0, LOWER_LIP_V, v)
    jaw = 0.5 * (1 + np.cos(np.pi * np.clip(u / ROI_HALF_WIDTH_U, -1, 1)))
    lips_wide, lips_round = _lip_profile(u, 1.0), _lip_profile(u, ROUND_WIDTH_U)
    drop_px, lift_px = DROP_MW * geometry.mouth_width, LIFT_MW * geometry.mouth_width
    below = v >= 0

    def open_field(lips: np.ndarray, drop: float, lift: float, jaw_scale: float) -> np.ndarray:
        lowering = -drop * (lips + jaw_blend * (jaw_scale * jaw - lips)) * lower
        return np.where(below, lowering, lift * lips * upper).astype(np.float32)

    corner_u = np.clip(u, -2.0, 2.0)
    corners = np.sin(np.pi / 2 * corner_u) * np.exp(-((v / CORNER_SIGMA_V) ** 2)) * upper
    big = np.float32(1e6)
    rows = np.broadcast_to(lip_rows, grid_y.shape)
    gap_top = max(0, math.floor(lip_rows.min() - lift_px * ROUND_LIFT - 2))
    gap_bottom = math.ceil(lip_rows.max() + drop_px + 2)
    gap_cols = np.nonzero(np.abs(u) <= 1.05)[0]
    gap = (slice(gap_top, gap_bottom), slice(int(gap_cols[0]), int(gap_cols[-1]) + 1))
    return MouthRig(
        roi=(slice(y0, y1), slice(x0, x1)),
        gap=gap,
        grid_x=grid_x,
        grid_y=grid_y,
        open_wide=open_field(lips_wide, drop_px, lift_px, 1.0),
        open_round=open_field(
            lips_round, drop_px * ROUND_DROP, lift_px * ROUND_LIFT, ROUND_JAW * ROUND_DROP
        ),
        corners=corners.astype(np.float32),
        clamp_low=np.where(below, rows, -big).astype(np.float32),
        clamp_high=np.where(below, big, rows).astype(np.float32),
        lip_rows=lip_rows,
        below_lip=below[gap],
        lift_wide=(lift_px * lips_wide).astype(np.float32),
        lift_round=(lift_px * ROUND_LIFT * lips_round).astype(np.float32),
        drop_wide=(drop_px * lips_wide).astype(np.float32),
        drop_round=(drop_px * ROUND_DROP * lips_round).astype(np.float32),
        spread_px=SPREAD_MW * geometry.mouth_width,
        round_px=ROUND_MW * geometry.mouth_width,
        teeth_px=0.0 if geometry.teeth_visible else TEETH_MW * geometry.mouth_width,
    )


def _lip_profile(u: np.ndarray, half_width: float) -> np.ndarray:
    """How far the lips part across the mouth: most in the middle, none at the corners."""
    return np.clip(1 - (u / half_width) ** 2, 0.0, 1.0) ** LIP_PROFILE_POWER


def _lip_curve(image: np.ndarray, geometry: FaceGeometry, columns: np.ndarray) -> np.ndarray:
    """Lip line per column: a parabola through the detected centre fitted to dark rows.

    Smiles curve the line upwards at the corners; fitting a low-order curve to the darkest
    row of each column keeps single dark pixels (moles, stubble) from bending it.
    """
    centre_x, lip_y = geometry.mouth_center
    half_mw = geometry.mouth_width / 2
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (1, 3), 0)
    us, offsets = [], []
    for column in range(round(centre_x - half_mw), round(centre_x + half_mw) + 1):
        u = (column - centre_x) / half_mw
        reach = half_mw * (0.12 + 0.35 * u * u)
        top = max(0, round(lip_y - reach))
        bottom = min(gray.shape[0], round(lip_y + 0.12 * half_mw) + 1)
        if not 0 <= column < gray.shape[1] or bottom - top < 2:
            continue
        us.append(u)
        offsets.append(top + int(np.argmin(gray[top:bottom, column])) - lip_y)
    u_all = np.clip((columns - centre_x) / half_mw, -1.1, 1.1)
    if len(us) < 5:
        return np.full(len(columns), lip_y, np.float32)
    basis = np.stack([np.asarray(us), np.square(us)], axis=1)
    weights = 1.2 - np.square(us)
    (slope, bend), *_ = np.linalg.lstsq(basis * weights[:, None], weights * offsets, rcond=None)
    return (lip_y + slope * u_all + bend * u_all**2).astype(np.float32)


def _blink_schedule() -> np.ndarray:
    amounts = np.zeros(IDLE_FRAMES, np.float32)
    for start in BLINK_STARTS:
        amounts[start : start + len(BLINK_PROFILE)] = BLINK_PROFILE
    return amounts


def _breathing_weights(shape: tuple[int, ...], geometry: FaceGeometry) -> np.ndarray:
    """Where breathing moves the picture: the head and shoulders, not the top border."""
    x, y, w, _ = geometry.face_box
    height, width = shape[:2]
    across = np.exp(-(((np.arange(width) - (x + w / 2)) / (1.8 * w)) ** 2))
    down = _smoothstep(0.0, float(max(y, 1)), np.arange(height, dtype=np.float32))
    return (down[:, None] * across[None, :]).astype(np.float32)


def _close_eye(
    frame: np.ndarray, centre: tuple[float, float], eye_width: float, amount: float
) -> None:
    """Lower the upper lid over one eye by `amount` (0 open .. 1 shut), in place.

    The skin above the eye stretches down with the lid edge (lashes included) from an anchor
    well above, so it looks like a lid rather than a painted bar; the lower lid stays put.
    """
    ex, ey = centre
    half_w, half_h = EYE_HALF_WIDTH * eye_width, EYE_HALF_HEIGHT * eye_width
    anchor = ey - LID_ANCHOR * half_h
    x0, x1 = max(0, math.floor(ex - half_w) - 1), min(frame.shape[1], math.ceil(ex + half_w) + 2)
    y0 = max(0, math.floor(anchor))
    y1 = min(frame.shape[0], math.ceil(ey + LID_OVERSHOOT * half_h) + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    xs = x0 + (np.arange((x1 - x0) * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE - 0.5
    ys = y0 + (np.arange((y1 - y0) * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE - 0.5
    grid_x, grid_y = np.meshgrid(xs, ys)
    q = np.sqrt(np.clip(1 - ((grid_x - ex) / half_w) ** 2, 0.0, 1.0))
    travel = amount * (1 + LID_OVERSHOOT) * half_h * q  # from ey - half_h*q down past ey
    edge = ey - half_h * q + travel
    t = np.clip((grid_y - anchor) / np.maximum(edge - anchor, 1e-3), 0.0, 1.0)
    src_y = np.where(grid_y < edge, grid_y - travel * t**3, grid_y)
    patch = cv2.remap(
        frame[y0:y1, x0:x1],
        (grid_x - x0).astype(np.float32),
        (src_y - y0).astype(np.float32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    frame[y0:y1, x0:x1] = cv2.resize(patch, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)


def build_idle_loop(
    image: np.ndarray, geometry: FaceGeometry, progress: Progress | None = None
) -> tuple[np.ndarray, ...]:
    """A seamless 4 s loop: one slow breath (sub-pixel rise of head and shoulders), 2 blinks.

    Frame 0 is the untouched image, so speech (rendered over the loop from frame 0) starts
    exactly where the still portrait is.
    """
    height, width = image.shape[:2]
    weights = _breathing_weights(image.shape, geometry)
    grid_x, grid_y = np.meshgrid(
        np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    )
    blinks = _blink_schedule()
    frames = []
    for tick in range(IDLE_FRAMES):
        rise = BREATH_PX * (1 - math.cos(2 * math.pi * tick / IDLE_FRAMES)) / 2
        if rise > 1e-3:
            frame = cv2.remap(
                image, grid_x, grid_y + rise * weights, cv2.INTER_CUBIC, cv2.BORDER_REPLICATE
            )
        else:
            frame = image.copy()
        if blinks[tick] > 0:
            for eye in (geometry.left_eye, geometry.right_eye):
                _close_eye(frame, eye, geometry.eye_width, float(blinks[tick]))
        frames.append(frame)
        if progress is not None and tick % 10 == 9:
            progress("idle loop", (tick + 1) / IDLE_FRAMES)
    return tuple(frames)


@dataclass(eq=False)
class WarpAvatar(PreparedAvatar):
    """A prepared portrait: its geometry, the (resized) base image and its mouth rig."""

    geometry: FaceGeometry = field(kw_only=True)
    base_image: np.ndarray = field(repr=False, kw_only=True)
    rig: MouthRig = field(repr=False, kw_only=True)

    def render(self, pose: MouthPose, tick: int = 0) -> np.ndarray:
        """Idle-loop frame `tick` with the mouth in `pose`."""
        return self.rig.render(self.idle_frame(tick), pose)


def load_source_image(source: Path) -> np.ndarray:
    """The BGR image of an avatar source: the picture, or a video's first frame.

    Pictures are read once and decoded from memory (a file replaced meanwhile cannot change
    under the decoder), after their header's size was checked: bombs are never decoded.
    """
    suffix = source.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        data = source.read_bytes()
        check_image_pixels(data, MAX_DECODE_PIXELS)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    elif suffix in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(source))
        try:
            width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if capture.isOpened():
                check_pixels(width, height, MAX_DECODE_PIXELS)
            ok, image = capture.read()
        finally:
            capture.release()
        image = image if ok else None
    else:
        raise AvatarSourceError(f"unsupported avatar type {suffix!r}: use an image or a video")
    if image is None:
        raise AvatarSourceError(
            f"cannot read {source.name!r}: not an image or video OpenCV can decode "
            "(use a PNG/JPEG portrait or an MP4 talking-head video)"
        )
    return image


def fit_even(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longer side is at most `max_side`, with even sides (video encoders)."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    new_w, new_h = max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)
    if scale < 1.0:
        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[:new_h, :new_w])  # drop an odd last row/column


def _load_cached(directory: Path, max_side: int) -> tuple[np.ndarray, FaceGeometry] | None:
    try:
        meta = json.loads((directory / "avatar.json").read_text())
        if meta["version"] != CACHE_VERSION or meta["max_side"] != max_side:
            return None
        image = cv2.imread(str(directory / "base.png"), cv2.IMREAD_COLOR)
        if image is None or [image.shape[1], image.shape[0]] != meta["size"]:
            return None
        return image, FaceGeometry.from_dict(meta["geometry"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_cached(
    directory: Path, image: np.ndarray, geometry: FaceGeometry, max_side: int
) -> None:
    """Write the cache entry atomically, JSON last: a crash or a racing writer is a miss."""
    directory.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise OSError("cannot encode the avatar image as PNG")
    write_atomically(directory / "base.png", png.tobytes())
    meta: dict[str, Any] = {
        "version": CACHE_VERSION,
        "max_side": max_side,
        "size": [image.shape[1], image.shape[0]],
        "geometry": geometry.to_dict(),
    }
    write_atomically(directory / "avatar.json", json.dumps(meta, indent=2).encode())


class _SpeechRenderer:
    """Renders one utterance: mouth-tracking state and the idle-loop phase it is at."""

    def __init__(self, avatar: WarpAvatar, first_phase: int) -> None:
        self._avatar = avatar
        self._tracker = MouthTracker()
        self._tick = first_phase

    def render(self, pcm: np.ndarray) -> list[np.ndarray]:
        frames = []
        for block in pcm.reshape(-1, SAMPLES_PER_TICK):
            frames.append(self._avatar.render(self._tracker.step(block), self._tick))
            self._tick += 1
        return frames


class WarpEngine(LipSyncEngine):
    """CPU lip-sync: audio-driven warps of the portrait's mouth and jaw."""

    name: ClassVar[str] = "warp"

    def __init__(
        self,
        max_side: int = DEFAULT_MAX_SIDE,
        detector: Detector = detect_face_geometry,
        render_threads: int = 2,
    ) -> None:
        super().__init__(render_threads)
        self._max_side = max_side
        self._detector = detector

    def prepare(
        self,
        source: Path,
        avatar_id: str,
        cache_dir: Path,
        progress: Progress | None = None,
    ) -> WarpAvatar:
        if not source.is_file():
            raise AvatarSourceError(f"avatar source {source} does not exist")
        digest = source_digest(source)
        directory = cache_dir / self.name / digest
        cached = _load_cached(directory, self._max_side)
        if cached is not None:
            logger.info("avatar %s: using cached face geometry from %s", avatar_id, directory)
            image, geometry = cached
        else:
            report(progress, "loading", 0.0)
            image = fit_even(load_source_image(source), self._max_side)
            report(progress, "detecting face", 0.1)
            geometry = self._detector(image)
            _store_cached(directory, image, geometry, self._max_side)
            logger.info(
                "avatar %s: face at %s, cached in %s", avatar_id, geometry.face_box, directory
            )
        report(progress, "mouth rig", 0.2)
        rig = build_mouth_rig(image, geometry)
        idle = build_idle_loop(image, geometry, scaled(progress, 0.25, 1.0))
        report(progress, "ready", 1.0)
        return WarpAvatar(
            avatar_id=avatar_id,
            source_digest=digest,
            idle_frames=idle,
            geometry=geometry,
            base_image=image,
            rig=rig,
        )

    async def lip_sync(
        self, avatar: PreparedAvatar, audio: AsyncIterable[np.ndarray], phase: PhaseSource
    ) -> AsyncIterator[np.ndarray]:
        """Speech frames drawn over the idle loop, so blinks and breathing go on.

        Each chunk is rendered in one job on the render pool (long chunks in jobs of at most
        `MAX_TICKS_PER_JOB` ticks, bounding memory); mouth smoothing carries across chunks.
        """
        if not isinstance(avatar, WarpAvatar):
            raise TypeError(f"the warp engine cannot animate {type(avatar).__name__}")
        renderer: _SpeechRenderer | None = None
        job_samples = MAX_TICKS_PER_JOB * SAMPLES_PER_TICK
        async for chunk in audio:
            renderer = renderer or _SpeechRenderer(avatar, phase())
            for start in range(0, len(chunk), job_samples):
                batch = await self.render_pool.run(
                    renderer.render, chunk[start : start + job_samples]
                )
                for frame in batch:
                    yield frame
