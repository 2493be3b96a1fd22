"""The engine's MuseTalk steps against independent re-implementations of the official code
(tests/musetalk_reference.py), on random inputs and tiny real-class networks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperModel

from gpuserver.engines.face import detect_face_geometry
from gpuserver.engines.musetalk import blend as blend_module
from gpuserver.engines.musetalk import facebox
from gpuserver.engines.musetalk.audio import AudioWindow, AudioWindower, log_mel
from gpuserver.engines.musetalk.blend import blend_mask, crop_box, paste_face
from gpuserver.engines.musetalk.engine import _encode_windows
from gpuserver.engines.musetalk.facebox import Landmarker, geometry_box, landmark_box
from gpuserver.engines.musetalk.models import load_models
from gpuserver.engines.musetalk.parsing import BiSeNet, jaw_mask
from gpuserver.engines.musetalk.pipeline import MusetalkPipeline
from gpuserver.engines.musetalk.random_weights import TINY_WHISPER
from gpuserver.media import SAMPLES_PER_TICK
from tests import musetalk_reference as official
from tests.musetalk_fixtures import (
    DEFAULT_AVATAR,
    dlib_mean_face,
    landmarker,
    mean_face_image,
    noise_speech,
    tiny_models_dir,
)

__all__ = ["landmarker", "tiny_models_dir"]

FEATURE_TOLERANCE = 1e-5
BOX_TOLERANCE_PX = 8
BISENET_KEYS = Path(__file__).parent / "data" / "bisenet_79999_iter_keys.txt"


@pytest.fixture(scope="module")
def audio_pipeline(tiny_models_dir: Path) -> MusetalkPipeline:
    """The tiny pipeline with a narrower whisper encoder (d_model 32: the feature cutting is
    width-agnostic, and a 30 s encoder pass stays cheap on a CPU)."""
    torch.manual_seed(1)
    config = WhisperConfig(**{**TINY_WHISPER, "d_model": 32, "encoder_attention_heads": 2})
    encoder = WhisperModel(config).get_encoder().eval()
    models = dataclasses.replace(load_models(tiny_models_dir, "cpu"), whisper=encoder)
    return MusetalkPipeline(models)


def encode(pipeline: MusetalkPipeline, window: AudioWindow) -> torch.Tensor:
    mels = log_mel(pipeline.models.feature_extractor, window.pcm)
    return _encode_windows(pipeline, [(mels, window)])[0]


def reference_features(pipeline: MusetalkPipeline, pcm: np.ndarray) -> torch.Tensor:
    extractor, encoder = pipeline.models.feature_extractor, pipeline.models.whisper
    return official.whisper_features(extractor, encoder, pcm.astype(np.float32) / 32768.0)


def received_ticks(window: AudioWindow) -> int:
    return window.start_tick + len(window.pcm) // SAMPLES_PER_TICK


def test_streamed_frames_are_the_official_features_of_the_audio_received_so_far(
    audio_pipeline: MusetalkPipeline,
) -> None:
    """In 40 ms chunks, each frame is exactly what the official pipeline computes for the
    utterance as far as it had arrived when the frame was cut."""
    pcm = noise_speech(6, seed=3)
    windower = AudioWindower()
    windows: list[AudioWindow] = []
    for tick in range(6):
        windower.push(pcm[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK])
        while (window := windower.take()) is not None:
            windows.append(window)
    while (window := windower.take(final=True)) is not None:
        windows.append(window)
    assert [w.first_frame for w in windows] == [0, 1, 2, 3]
    for window in windows:
        ours = encode(audio_pipeline, window)
        truncated = reference_features(audio_pipeline, pcm[: received_ticks(window) * 640])
        expected = truncated[window.first_frame : window.first_frame + window.frame_count]
        torch.testing.assert_close(ours, expected, atol=FEATURE_TOLERANCE, rtol=0)


def test_frames_of_a_complete_segment_equal_the_whole_clip_features(
    audio_pipeline: MusetalkPipeline,
) -> None:
    """Across the 30 s boundary: windows anchored at 0 and 30 s. Frames cut once their
    segment had fully arrived, and the frames cut at the end, equal the whole-clip features;
    the frames next to the boundary use both segments, as official."""
    pcm = noise_speech(760, seed=4)
    whole = reference_features(audio_pipeline, pcm)
    assert whole.shape[0] == 760
    windower = AudioWindower()
    windower.push(pcm[: 752 * SAMPLES_PER_TICK])  # 30.08 s: segment 0 is complete
    first = windower.take()
    assert first is not None and (first.start_tick, first.first_frame) == (0, 0)
    assert first.frame_count == 749 and received_ticks(first) == 752
    ours = encode(audio_pipeline, first)
    # Frames 0..745 only touch segment 0, which had fully arrived.
    torch.testing.assert_close(ours[:746], whole[:746], atol=FEATURE_TOLERANCE, rtol=0)
    # Frames 746..748 also touch segment 1 (2 ticks of it so far): the official features of
    # the 752 ticks received.
    truncated = reference_features(audio_pipeline, pcm[: 752 * SAMPLES_PER_TICK])
    torch.testing.assert_close(ours[746:], truncated[746:749], atol=FEATURE_TOLERANCE, rtol=0)
    windower.push(pcm[752 * SAMPLES_PER_TICK :])
    rest = []
    while (window := windower.take(final=True)) is not None:
        rest.append(encode(audio_pipeline, window))
    torch.testing.assert_close(torch.cat(rest), whole[749:], atol=FEATURE_TOLERANCE, rtol=0)


def test_box_rule_matches_the_official_on_random_landmarks() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        width, height = int(rng.integers(200, 1920)), int(rng.integers(200, 1080))
        centre = rng.uniform((60, 60), (width - 60, height - 60))
        landmarks = centre + rng.normal(0, 25, (68, 2))
        landmarks = np.clip(landmarks, 0, (width - 1, height - 1))
        ours = landmark_box(landmarks, (width, height))
        reference = official.landmark_box(landmarks, height)
        assert ours is None or ours == reference


def test_fallback_proportions_are_dlibs_mean_face() -> None:
    mean = dlib_mean_face()
    eye_left, eye_right = mean[36:42].mean(0), mean[42:48].mean(0)
    eye_y = (eye_left[1] + eye_right[1]) / 2
    span = mean[60:68, 1].mean() - eye_y  # eye line to the inner lips' line
    assert pytest.approx((mean[29, 1] - eye_y) / span, abs=1e-3) == facebox.NOSE_BELOW_EYES
    assert pytest.approx((mean[:, 1].max() - eye_y) / span, abs=1e-3) == facebox.CHIN_BELOW_EYES
    jaw_half = (mean[:, 0].max() - mean[:, 0].min()) / 2
    ratio = jaw_half / (eye_right[0] - eye_left[0])
    assert pytest.approx(ratio, abs=1e-3) == facebox.JAW_HALF_WIDTH


def test_fallback_and_dlib_boxes_agree_with_the_landmark_rule_on_a_mean_face(
    landmarker: Landmarker,
) -> None:
    image, landmarks = mean_face_image(landmarker)
    size = (image.shape[1], image.shape[0])
    truth = np.array(landmark_box(landmarks, size))
    fallback = np.array(geometry_box(detect_face_geometry(image), size))
    assert np.abs(fallback - truth).max() <= BOX_TOLERANCE_PX, (fallback, truth)
    found = landmarker(image)
    assert found is not None
    assert np.abs(np.array(landmark_box(found, size)) - truth).max() <= BOX_TOLERANCE_PX


def test_jaw_mask_matches_the_official_on_random_labels() -> None:
    rng = np.random.default_rng(2)
    labels = np.zeros((512, 512), np.int64)
    labels[100:460, 120:400] = 1  # skin, with random other classes sprinkled over it
    noise = rng.integers(0, 19, (512, 512))
    sprinkled = rng.random((512, 512)) < 0.2
    labels[sprinkled] = noise[sprinkled]
    labels[300:340, 200:320] = rng.choice([11, 12, 13], (40, 120))
    np.testing.assert_array_equal(jaw_mask(labels), official.jaw_parsing(labels))


def test_blend_mask_matches_the_official_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the same parsing labels: crop box, resize, face-box clip, upper half cleared,
    blur. The official resizes with PIL's bicubic, the engine with OpenCV's. (Outside the face
    box the official mask has no effect: what it blends in there is the frame itself.)"""
    frame = cv2.imread(str(DEFAULT_AVATAR))
    box = (179, 60, 272, 188)
    drawn = np.zeros((512, 512), np.uint8)
    cv2.ellipse(drawn, (256, 270), (150, 200), 0, 0, 360, 1, -1)  # skin
    cv2.ellipse(drawn, (256, 250), (30, 50), 0, 0, 360, 10, -1)  # nose
    cv2.ellipse(drawn, (256, 350), (60, 18), 0, 0, 360, 12, -1)  # lips
    labels = drawn.astype(np.int64)
    monkeypatch.setattr(blend_module, "parse_labels", lambda parser, canvas: labels)
    ours = blend_mask(frame, box, BiSeNet())
    reference, outer = official.prepare_mask(frame, box, official.jaw_parsing(labels))
    x0, y0, x1, y1 = (box[0] - outer[0], box[1] - outer[1], box[2] - outer[0], box[3] - outer[1])
    difference = np.abs(ours.astype(int) - reference[y0:y1, x0:x1].astype(int))
    assert difference.max() <= 8 and difference.mean() < 0.5


def test_paste_back_matches_the_official_blending() -> None:
    frame = cv2.imread(str(DEFAULT_AVATAR))
    box = (179, 60, 272, 188)
    outer = crop_box(box)
    rng = np.random.default_rng(5)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    side = outer[2] - outer[0]
    mask = cv2.GaussianBlur(rng.integers(0, 256, (side, side), dtype=np.uint8), (9, 9), 0)
    x0, y0, x1, y1 = (box[0] - outer[0], box[1] - outer[1], box[2] - outer[0], box[3] - outer[1])
    ours = paste_face(frame, face, box, np.ascontiguousarray(mask[y0:y1, x0:x1]))
    resized = cv2.resize(face, (box[2] - box[0], box[3] - box[1]))
    reference = official.blend(frame, resized, box, mask, list(outer))
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_the_face_parsing_checkpoint_key_list_loads_strictly() -> None:
    """Every tensor of the official BiSeNet (the module tree `79999_iter.pth` was saved
    from), by name and shape, loads strictly into the port."""
    state = {}
    for line in BISENET_KEYS.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, _, dims = line.partition(" ")
        shape = tuple(int(d) for d in dims.split("x")) if dims else ()
        state[name] = torch.zeros(shape, dtype=torch.long if not shape else torch.float32)
    assert len(state) == 191
    BiSeNet().load_state_dict(state, strict=True)
