"""Face crop boxes: MuseTalk 1.5's landmark rule on 68 face landmarks, found offline.

Official rule (`get_landmark_and_bbox` + v1.5 `extra_margin`): from 68 face landmarks, x spans
the jaw contour, y runs from `nose - (chin - nose)` (nose = landmark 29) to the chin plus
10 px, so the nose sits at the crop's half-height where the UNet's mask begins.

Landmarks: dlib's 68-point shape predictor (the iBUG 300-W scheme, the same points as the
official DWPose face keypoints) on dlib's HOG face detector; the library comes from the
`dlib-bin` wheel and the model from the `face_recognition_models` package, so nothing is
downloaded at run time. Without them (or when dlib finds no face) the same rule is applied
to points estimated from the OpenCV face geometry (eyes and lip line) with the proportions
of dlib's 68-point mean face, a last resort that agrees with the landmark rule within a few
pixels on a mean face but not on every face.

A video avatar's boxes are smoothed over time (a centred moving average, mirrored at the
ends like the ping-pong idle loop), so landmark jitter does not make the face shimmer.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from gpuserver.engines.base import AvatarSourceError, Progress
from gpuserver.engines.face import FaceGeometry, detect_face_geometry

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive)
Landmarker = Callable[[np.ndarray], np.ndarray | None]  # BGR frame -> (68, 2) or None

EXTRA_MARGIN_PX = 10  # v1.5: the crop reaches 10 px below the chin
NOSE_LANDMARK = 29
MIN_SIDE_PX = 16
# dlib's 68-point mean face (the shape predictor's initial shape, learnt from 300-W): from
# the eye line, landmark 29 and the chin in eye-to-lip-line distances (the lip line being
# the inner lips' mean), and the jaw's half width in inter-ocular distances.
NOSE_BELOW_EYES = 0.333
CHIN_BELOW_EYES = 1.674
JAW_HALF_WIDTH = 1.145
PREDICTOR_FILE = "models/shape_predictor_68_face_landmarks.dat"
DETECT_MAX_SIDE = 640  # the HOG detector runs on a copy this size; landmarks at full size
SMOOTH_FRAMES = 5  # moving-average window of video boxes (odd: centred)


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


def predictor_path() -> Path | None:
    """The 68-point model inside the installed face_recognition_models package, if any.

    Located without importing the package (its __init__ imports the deprecated
    pkg_resources).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / PREDICTOR_FILE
        if path.is_file():
            return path
    return None


def landmarks_available() -> bool:
    return importlib.util.find_spec("dlib") is not None and predictor_path() is not None


def load_landmarker() -> Landmarker | None:
    """dlib's 68-point landmarks of the largest face, or None when dlib is not installed."""
    path = predictor_path()
    if importlib.util.find_spec("dlib") is None or path is None:
        logger.warning(
            "dlib-bin / face_recognition_models not installed: MuseTalk face boxes come from "
            "the OpenCV fallback (pip install -e '.[musetalk]')"
        )
        return None
    import dlib  # type: ignore[import-not-found]

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(path))

    def landmarks(frame: np.ndarray) -> np.ndarray | None:
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        scale = min(1.0, DETECT_MAX_SIDE / max(gray.shape))
        small = (
            gray
            if scale == 1
            else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        )
        faces = detector(small, 1)  # upsampled once: faces down to ~40 px
        if not faces:
            return None
        face = max(faces, key=lambda rect: rect.area())
        rect = dlib.rectangle(
            round(face.left() / scale),
            round(face.top() / scale),
            round(face.right() / scale),
            round(face.bottom() / scale),
        )
        shape = predictor(gray, rect)
        return np.array([(point.x, point.y) for point in shape.parts()], np.float64)

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
    return smooth_boxes(np.array([boxes[j] for j in nearest], dtype=np.int32))


def smooth_boxes(boxes: np.ndarray, window: int = SMOOTH_FRAMES) -> np.ndarray:
    """A centred moving average of per-frame boxes [N, 4], mirrored at both ends."""
    if len(boxes) < 2:
        return boxes
    half = min(window // 2, len(boxes) - 1)
    padded = np.pad(boxes.astype(np.float64), ((half, half), (0, 0)), mode="reflect")
    kernel = np.full(2 * half + 1, 1 / (2 * half + 1))
    smoothed = np.stack([np.convolve(padded[:, k], kernel, "valid") for k in range(4)], axis=1)
    return np.rint(smoothed).astype(np.int32)


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
