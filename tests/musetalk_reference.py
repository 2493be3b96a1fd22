"""Independent re-implementations of MuseTalk 1.5's published inference steps, for tests.

Written from the official code's behaviour (TMElyralab/MuseTalk: `musetalk/utils/
audio_processor.py`, `preprocessing.py`, `blending.py`, `face_parsing/__init__.py`,
`scripts/realtime_inference.py`), in its own style: whole clips, PIL images, loops. The
engine's modules are compared against these on random inputs and tiny real-class networks.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor

SAMPLE_RATE = 16_000


def whisper_features(
    extractor: WhisperFeatureExtractor, encoder: torch.nn.Module, clip: np.ndarray
) -> torch.Tensor:
    """`get_audio_feature` + `get_whisper_chunk` on a whole float32 clip: [frames, 50, 384]."""
    segment = 30 * SAMPLE_RATE
    states = []
    for start in range(0, len(clip), segment):
        mel = extractor(
            clip[start : start + segment], return_tensors="pt", sampling_rate=SAMPLE_RATE
        ).input_features
        with torch.inference_mode():
            hidden = encoder(mel, output_hidden_states=True).hidden_states
        states.append(torch.stack(hidden, dim=2))
    feature = torch.cat(states, dim=1)
    num_frames = math.floor(len(clip) / SAMPLE_RATE * 25)
    actual = math.floor(len(clip) / SAMPLE_RATE * 50)
    feature = feature[:, :actual]
    feature = torch.cat(
        [torch.zeros_like(feature[:, : 2 * 2]), feature, torch.zeros_like(feature[:, : 2 * 3 * 2])],
        1,
    )
    clips = []
    for frame in range(num_frames):
        index = math.floor(frame * 2.0)
        clips.append(feature[:, index : index + 10])
    stacked = torch.cat(clips, dim=0)  # [frames, 10, 5, 384]
    return stacked.reshape(num_frames, 50, stacked.shape[-1])


def landmark_box(landmarks: np.ndarray, frame_height: int, extra_margin: int = 10) -> tuple:
    """`get_landmark_and_bbox` with the v1.5 `extra_margin` of `prepare_material`."""
    points = landmarks.astype(np.int32)
    half_face = points[29].copy()
    half_face_dist = np.max(points[:, 1]) - half_face[1]
    upper_bond = max(0, half_face[1] - half_face_dist)
    x1, y1, x2, y2 = (
        np.min(points[:, 0]),
        int(upper_bond),
        np.max(points[:, 0]),
        np.max(points[:, 1]),
    )
    y2 = min(y2 + extra_margin, frame_height)
    return int(x1), int(y1), int(x2), int(y2)


def crop_box(box: tuple, expand: float = 1.5) -> list[int]:
    x, y, x1, y1 = box
    x_c, y_c = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * expand)
    return [x_c - s, y_c - s, x_c + s, y_c + s]


def jaw_parsing(parsing: np.ndarray, cheek_width: int = 90) -> np.ndarray:
    """`FaceParsing.__call__(mode="jaw")` after the network: labels [512, 512] -> 0/255."""
    cone, tail = 21, 12
    total = cone + tail
    kernel = np.zeros((total, total), np.uint8)
    centre = total // 2
    for row in range(cone):
        if row < cone // 2:
            continue
        width = 2 * (row - cone // 2) + 1
        kernel[row, centre - width // 2 : centre + width // 2 + 1] = 1
    base = int(kernel[cone - 1].sum())
    for row in range(cone, total):
        kernel[row, max(0, centre - base // 2) : min(total, centre + base // 2 + 1)] = 1
    cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
    cheek_mask = np.zeros((512, 512), np.uint8)
    cv2.rectangle(cheek_mask, (0, 0), (256 - cheek_width, 512), 255, -1)
    cv2.rectangle(cheek_mask, (256 + cheek_width, 0), (512, 512), 255, -1)
    parsing = parsing.copy()
    face = (np.isin(parsing, [1]) * 255).astype(np.uint8)
    dilated = cv2.dilate(face, kernel, iterations=1)
    eroded = cv2.erode(dilated, cheek_kernel, iterations=2)
    face = cv2.bitwise_and(eroded, cheek_mask)
    face = cv2.bitwise_or(face, cv2.bitwise_and(dilated, ~cheek_mask))
    parsing[(face == 255) & (~np.isin(parsing, [10]))] = 255
    parsing[np.isin(parsing, [11, 12, 13])] = 255
    parsing[np.where(parsing != 255)] = 0
    return parsing.astype(np.uint8)


def prepare_mask(frame: np.ndarray, box: tuple, parsed: np.ndarray) -> tuple[np.ndarray, list]:
    """`get_image_prepare_material` (blur ratio 0.1) given the crop box's jaw parsing at
    512x512 (`parsed`, as `FaceParsing` returns it before resizing)."""
    body = Image.fromarray(frame[:, :, ::-1])
    x, y, x1, y1 = box
    outer = crop_box(box)
    x_s, y_s = outer[0], outer[1]
    face_large = body.crop(outer)
    size = face_large.size
    mask_image = Image.fromarray(parsed).resize(size)
    mask_small = mask_image.crop((x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    mask_image = Image.new("L", size, 0)
    mask_image.paste(mask_small, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    width, height = mask_image.size
    top = int(height * 0.5)
    modified = Image.new("L", size, 0)
    modified.paste(mask_image.crop((0, top, width, height)), (0, top))
    kernel = int(0.1 * size[0] // 2 * 2) + 1
    return cv2.GaussianBlur(np.array(modified), (kernel, kernel), 0), outer


def blend(frame: np.ndarray, face: np.ndarray, box: tuple, mask: np.ndarray, outer: list):
    """`get_image_blending`, with the generated face already resized to the box (as
    `process_frames` does with cv2.resize)."""
    body = Image.fromarray(frame[:, :, ::-1])
    face_image = Image.fromarray(face[:, :, ::-1])
    x, y, x1, y1 = box
    x_s, y_s = outer[0], outer[1]
    face_large = body.crop(outer)
    face_large.paste(face_image, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, outer[:2], Image.fromarray(mask).convert("L"))
    return np.array(body)[:, :, ::-1]
