"""Face crop boxes: MuseTalk 1.5's landmark rule, or the OpenCV locator as a fallback.

Official rule (`get_landmark_and_bbox` + v1.5 `extra_margin`): from 68 face landmarks, x spans
the jaw contour, y runs from `nose - (chin - nose)` (nose = landmark 29) to the chin plus
10 px, so the nose sits at the crop's half-height where the UNet's mask begins. Without a
landmark model the same rule is applied to points estimated from the OpenCV face geometry
(eyes and lip line) with the proportions of the 68-point mean face.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from gpuserver.engines.base import AvatarSourceError, Progress
from gpuserver.engines.face import FaceGeometry, detect_face_geometry

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive)
Landmarker = Callable[[np.ndarray], np.ndarray | None]  # BGR frame -> (68, 2) or None

EXTRA_MARGIN_PX = 10  # v1.5: the crop reaches 10 px below the chin
NOSE_LANDMARK = 29
MIN_SIDE_PX = 16
# The 68-point mean face, from the eye line in eye-to-lip-line distances, and the jaw's half
# width in inter-ocular distances. Approximate: they only stand in for a landmark model.
NOSE_BELOW_EYES = 0.42
CHIN_BELOW_EYES = 1.38
JAW_HALF_WIDTH = 1.2


def official_box(
    x_min: float, x_max: float, nose_y: float, chin_y: float, size: tuple[int, int]
) -> Box | None:
    """The v1.5 crop box in a frame of `size` (width, height); None if degenerate."""
    width, height = size
    x0, x1 = max(0, int(x_min)), min(width, int(x_max))
    y0 = max(0, int(nose_y - (chin_y - nose_y)))
    y1 = min(height, int(chin_y) + EXTRA_MARGIN_PX)
    if x1 - x0 < MIN_SIDE_PX or y1 - y0 < MIN_SIDE_PX:
        return None
    return x0, y0, x1, y1


def landmark_box(landmarks: np.ndarray, size: tuple[int, int]) -> Box | None:
    points = landmarks.astype(np.int32)  # the official code truncates to int first
    return official_box(
        points[:, 0].min(), points[:, 0].max(), points[NOSE_LANDMARK, 1], points[:, 1].max(), size
    )


def geometry_box(geometry: FaceGeometry, size: tuple[int, int]) -> Box | None:
    (left_x, left_y), (right_x, right_y) = geometry.left_eye, geometry.right_eye
    eye_y = (left_y + right_y) / 2
    span = geometry.mouth_center[1] - eye_y
    centre_x = (left_x + right_x) / 2
    half_width = JAW_HALF_WIDTH * (right_x - left_x)
    return official_box(
        centre_x - half_width,
        centre_x + half_width,
        eye_y + NOSE_BELOW_EYES * span,
        eye_y + CHIN_BELOW_EYES * span,
        size,
    )


def load_landmarker(device: str) -> Landmarker | None:
    """face_alignment's 68-point FAN (the same point scheme as DWPose's face) if installed."""
    try:
        import face_alignment  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        aligner = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, flip_input=False, device=device
        )
    except Exception:  # it fetches its own weights on first use; any failure -> fallback
        logger.warning("face_alignment unavailable; using OpenCV face boxes", exc_info=True)
        return None

    def landmarks(frame: np.ndarray) -> np.ndarray | None:
        found = aligner.get_landmarks_from_image(np.ascontiguousarray(frame[..., ::-1]))
        return np.asarray(found[0]) if found else None  # first face, as the official code

    return landmarks


def locate_boxes(
    frames: Sequence[np.ndarray],
    landmarker: Landmarker | None,
    progress: Progress | None = None,
) -> np.ndarray:
    """One crop box per frame, shape (N, 4) int32.

    A frame without a face borrows the nearest frame's box (the official code drops it and
    misaligns its lists); no face in any frame is an AvatarSourceError.
    """
    boxes: list[Box | None] = []
    for index, frame in enumerate(frames):
        boxes.append(_frame_box(frame, landmarker))
        if progress is not None:
            progress("locating face", (index + 1) / len(frames))
    found = [i for i, box in enumerate(boxes) if box is not None]
    if not found:
        raise AvatarSourceError("no face found in the avatar: use a front-facing portrait")
    if len(found) < len(boxes):
        logger.info(
            "no face in %d of %d frames: reusing neighbours' boxes",
            len(boxes) - len(found),
            len(boxes),
        )
    nearest = [min(found, key=lambda j, i=i: abs(j - i)) for i in range(len(boxes))]
    return np.array([boxes[j] for j in nearest], dtype=np.int32)


def _frame_box(frame: np.ndarray, landmarker: Landmarker | None) -> Box | None:
    size = (frame.shape[1], frame.shape[0])
    if landmarker is not None:
        points = landmarker(frame)
        box = landmark_box(points, size) if points is not None else None
        if box is not None:
            return box
    try:
        return geometry_box(detect_face_geometry(frame), size)
    except AvatarSourceError:
        return None
