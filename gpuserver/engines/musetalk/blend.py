"""Blend masks and paste-back (`musetalk/utils/blending.py`, v1.5 realtime path).

The mask is built on the official 1.5x square "crop box" around the face box: a face mask
(BiSeNet "jaw" parsing, or an ellipse without parsing weights), clipped to the face box,
kept below the crop box's half-height, blurred with a kernel of 10 % of its width.
Compositing `frame + m * (face_large - frame)` only differs from the frame inside the face
box (face_large is the frame there), so the mask is stored over the face box alone and the
paste never touches pixels outside the frame (the official PIL paste can fail there).
"""

from __future__ import annotations

import cv2
import numpy as np

from gpuserver.engines.musetalk.facebox import Box
from gpuserver.engines.musetalk.parsing import BiSeNet, jaw_mask, parse_labels

EXPAND = 1.5
UPPER_BOUNDARY_RATIO = 0.5
BLUR_RATIO = 0.1  # realtime material (offline inference.py uses 0.05)
# Fallback face region: an ellipse inscribed in the face box, a little narrower than the
# jaw-to-jaw width so its blurred edge stays on the cheeks.
ELLIPSE_HALF_WIDTH = 0.45
ELLIPSE_HALF_HEIGHT = 0.5


def crop_box(box: Box, expand: float = EXPAND) -> Box:
    """The official square around the face box; it may extend past the frame."""
    x0, y0, x1, y1 = box
    centre_x, centre_y = (x0 + x1) // 2, (y0 + y1) // 2
    half = int(max(x1 - x0, y1 - y0) // 2 * expand)
    return centre_x - half, centre_y - half, centre_x + half, centre_y + half


def crop_padded(frame: np.ndarray, box: Box) -> np.ndarray:
    """frame[box] with black where the box leaves the frame (PIL's crop semantics)."""
    x0, y0, x1, y1 = box
    height, width = frame.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, *frame.shape[2:]), frame.dtype)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    return out


def parsed_face_region(frame: np.ndarray, outer: Box, parser: BiSeNet) -> np.ndarray:
    """The jaw-mode parsing mask of the crop box, at its size (uint8)."""
    canvas = crop_padded(frame, outer)
    labels = parse_labels(parser, canvas)
    size = (canvas.shape[1], canvas.shape[0])
    return cv2.resize(jaw_mask(labels), size, interpolation=cv2.INTER_CUBIC)  # PIL default


def ellipse_face_region(box: Box, outer: Box) -> np.ndarray:
    """Fallback face region on the crop box canvas: an ellipse in the face box."""
    x0, y0, x1, y1 = box
    side = outer[2] - outer[0]
    canvas = np.zeros((side, side), np.uint8)
    centre = (round((x0 + x1) / 2 - outer[0]), round((y0 + y1) / 2 - outer[1]))
    axes = (round(ELLIPSE_HALF_WIDTH * (x1 - x0)), round(ELLIPSE_HALF_HEIGHT * (y1 - y0)))
    cv2.ellipse(canvas, centre, axes, 0, 0, 360, 255, thickness=-1)
    return canvas


def blend_mask(frame: np.ndarray, box: Box, parser: BiSeNet | None) -> np.ndarray:
    """The blend mask over `box` (uint8, 255 = generated face), from parsing or an ellipse."""
    outer = crop_box(box)
    if parser is not None:
        region = parsed_face_region(frame, outer, parser)
    else:
        region = ellipse_face_region(box, outer)
    x0, y0, x1, y1 = (box[0] - outer[0], box[1] - outer[1], box[2] - outer[0], box[3] - outer[1])
    side = region.shape[1]
    canvas = np.zeros_like(region)
    canvas[y0:y1, x0:x1] = region[y0:y1, x0:x1]
    canvas[: int(region.shape[0] * UPPER_BOUNDARY_RATIO)] = 0
    kernel = int(BLUR_RATIO * side // 2 * 2) + 1
    canvas = cv2.GaussianBlur(canvas, (kernel, kernel), 0)
    return np.ascontiguousarray(canvas[y0:y1, x0:x1])


def paste_face(frame: np.ndarray, face: np.ndarray, box: Box, mask: np.ndarray) -> np.ndarray:
    """A copy of `frame` with the generated 256x256 `face` blended into `box`."""
    x0, y0, x1, y1 = box
    out = frame.copy()
    resized = cv2.resize(face, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    region = out[y0:y1, x0:x1]
    alpha = mask.astype(np.float32)[..., None] * (1 / 255)
    blended = region + alpha * (resized.astype(np.float32) - region)
    region[:] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out
