"""Engine-neutral face geometry of a frontal portrait: face box, eyes, mouth and lip line.

Haar cascades ship with OpenCV, so this works everywhere without model downloads; it is the
warp engine's rig source and the fallback face locator of heavier engines.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import cv2
import numpy as np

from gpuserver.engines.base import AvatarSourceError

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x, y, width, height
Point = tuple[float, float]  # x, y

# Proportions of a frontal face relative to its Haar box (measured on typical portraits).
EYE_Y = 0.38
EYE_X_OFFSET = 0.21  # eye centres sit this far either side of the box centre
EYE_WIDTH = 0.17  # width of one visible eye opening
HAAR_EYE_TO_OPENING = 0.65  # the Haar eye box includes lids and brow
MOUTH_Y = 0.78  # lip line estimate below the box top
MOUTH_WIDTH = 0.46
LIP_SEARCH_UP = 0.07  # the nostrils' shadow lies just above this window
LIP_SEARCH_DOWN = 0.10
TEETH_GAP_SEARCH = 0.06  # how far below visible teeth the lower lip's dark edge is sought


@dataclass(frozen=True)
class FaceGeometry:
    """Where the animated parts of a face are, in pixels of the (possibly resized) image."""

    face_box: Box
    left_eye: Point  # the eye on the image's left
    right_eye: Point
    eye_width: float  # width of one visible eye opening
    mouth_center: Point  # its y is the lip line: the dark gap where the lips part
    mouth_width: float
    teeth_visible: bool  # upper teeth already show above the lip line (a smiling source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceGeometry:
        x, y, w, h = data["face_box"]
        return cls(
            face_box=(int(x), int(y), int(w), int(h)),
            left_eye=_point(data["left_eye"]),
            right_eye=_point(data["right_eye"]),
            eye_width=float(data["eye_width"]),
            mouth_center=_point(data["mouth_center"]),
            mouth_width=float(data["mouth_width"]),
            teeth_visible=bool(data["teeth_visible"]),
        )


def _point(values: Any) -> Point:
    x, y = values
    return float(x), float(y)


@cache
def _cascade(filename: str) -> cv2.CascadeClassifier:
    classifier = cv2.CascadeClassifier(cv2.data.haarcascades + filename)
    if classifier.empty():
        raise RuntimeError(f"OpenCV Haar cascade {filename} is missing")
    return classifier


def detect_face_geometry(image: np.ndarray) -> FaceGeometry:
    """Locate the largest frontal face of a BGR image and its eyes, mouth and lip line."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    box = find_face_box(gray)
    left_eye, right_eye, eye_width = _find_eyes(gray, box)
    mouth_x = (left_eye[0] + right_eye[0]) / 2
    mouth_width = MOUTH_WIDTH * box[2]
    lip_y, teeth = _find_lip_line(image, gray, box, mouth_x, mouth_width)
    geometry = FaceGeometry(
        face_box=box,
        left_eye=left_eye,
        right_eye=right_eye,
        eye_width=eye_width,
        mouth_center=(mouth_x, lip_y),
        mouth_width=mouth_width,
        teeth_visible=teeth,
    )
    logger.debug("face geometry: %s", geometry)
    return geometry


def find_face_box(gray: np.ndarray) -> Box:
    """The largest frontal face; AvatarSourceError when there is none."""
    min_side = max(24, min(gray.shape) // 16)
    faces = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    if len(faces) == 0:
        raise AvatarSourceError(
            "no face found in the avatar image: use a well-lit, front-facing portrait"
        )
    x, y, w, h = max(faces, key=lambda face: int(face[2]) * int(face[3]))
    return int(x), int(y), int(w), int(h)


def _find_eyes(gray: np.ndarray, box: Box) -> tuple[Point, Point, float]:
    """Eye centres (Haar in the upper face half, else proportions) and one eye's width."""
    x, y, w, h = box
    upper = gray[y : y + h // 2, x : x + w]
    found = _cascade("haarcascade_eye.xml").detectMultiScale(
        upper, scaleFactor=1.1, minNeighbors=3, minSize=(max(6, w // 10), max(6, w // 10))
    )
    centre_x = x + w / 2
    eyes: dict[str, tuple[Point, float]] = {}
    for ex, ey, ew, eh in found:
        side = "left" if x + ex + ew / 2 < centre_x else "right"
        if side not in eyes or ew > eyes[side][1]:
            eyes[side] = ((x + ex + ew / 2, y + ey + eh / 2), float(ew))
    estimate_y = y + EYE_Y * h
    left = _refine_eye(gray, eyes["left"]) if "left" in eyes else None
    right = _refine_eye(gray, eyes["right"]) if "right" in eyes else None
    if left is None or right is None:
        logger.info("eye cascade found %d eye(s); using proportional estimates", len(eyes))
    left = left or (centre_x - EYE_X_OFFSET * w, estimate_y)
    right = right or (centre_x + EYE_X_OFFSET * w, estimate_y)
    widths = [width * HAAR_EYE_TO_OPENING for _, width in eyes.values()]
    eye_width = float(np.mean(widths)) if widths else EYE_WIDTH * w
    return left, right, eye_width


def _refine_eye(gray: np.ndarray, found: tuple[Point, float]) -> Point:
    """Move a Haar eye centre onto the iris: the darkest pixels near it (brows stay outside)."""
    (cx, cy), size = found
    half_w, half_h = size * 0.4, size * 0.22
    x0, x1 = round(cx - half_w), round(cx + half_w) + 1
    y0, y1 = round(cy - half_h), round(cy + half_h) + 1
    patch = gray[max(0, y0) : y1, max(0, x0) : x1].astype(np.float32)
    if patch.size < 9:
        return cx, cy
    ys, xs = np.nonzero(patch <= np.percentile(patch, 10))
    return max(0, x0) + float(xs.mean()), max(0, y0) + float(ys.mean())


def _find_lip_line(
    image: np.ndarray, gray: np.ndarray, box: Box, mouth_x: float, mouth_width: float
) -> tuple[float, bool]:
    """The lip line: the darkest row band around the proportional estimate.

    When upper teeth show (a smile), the mouth opens below them, so the line is the dark
    edge under the teeth rather than the upper lip's shadow above them.
    """
    _, y, _, h = box
    top = max(0, round(y + (MOUTH_Y - LIP_SEARCH_UP) * h))
    bottom = min(gray.shape[0], round(y + (MOUTH_Y + LIP_SEARCH_DOWN) * h) + 1)
    left = max(0, round(mouth_x - 0.3 * mouth_width))
    right = min(gray.shape[1], round(mouth_x + 0.3 * mouth_width) + 1)
    if bottom - top < 3 or right - left < 3:
        return y + MOUTH_Y * h, False
    profile = _smooth(gray[top:bottom, left:right].mean(axis=1))
    teeth_rows = np.nonzero(_teeth_fraction(image, box, top, bottom, left, right) > 0.4)[0]
    if len(teeth_rows) >= 2:
        below = teeth_rows[-1] + 1
        stop = min(len(profile), below + max(2, round(TEETH_GAP_SEARCH * h)))
        if stop > below:
            return float(top + below + np.argmin(profile[below:stop])), True
    return float(top + np.argmin(profile)), False


def _smooth(profile: np.ndarray) -> np.ndarray:
    padded = np.pad(profile, 1, mode="edge")
    return (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4


def _teeth_fraction(
    image: np.ndarray, box: Box, top: int, bottom: int, left: int, right: int
) -> np.ndarray:
    """Per row of the mouth window: the share of pixels brighter and greyer than the skin."""
    x, y, w, h = box
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    cheeks = hsv[y + h // 2 : y + 3 * h // 4, x + w // 5 : x + 4 * w // 5].reshape(-1, 3)
    skin_s, skin_v = np.median(cheeks[:, 1]), np.median(cheeks[:, 2])
    window = hsv[top:bottom, left:right]
    teeth = (window[..., 1] < 0.7 * skin_s) & (window[..., 2] > 0.9 * skin_v)
    return teeth.mean(axis=1)
