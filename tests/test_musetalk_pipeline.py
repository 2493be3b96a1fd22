"""MuseTalk building blocks on tiny random weights: audio windows, PE, networks, boxes, masks."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gpuserver.config import EngineSettings
from gpuserver.engines.musetalk import audio as audio_features
from gpuserver.engines.musetalk.audio import (
    LOOKAHEAD_TICKS,
    AudioWindow,
    AudioWindower,
    log_mel,
)
from gpuserver.engines.musetalk.blend import blend_mask, crop_box, paste_face
from gpuserver.engines.musetalk.engine import MusetalkEngine
from gpuserver.engines.musetalk.facebox import (
    EXTRA_MARGIN_PX,
    Landmarker,
    landmark_box,
    load_landmarker,
    locate_boxes,
    smooth_boxes,
)
from gpuserver.engines.musetalk.models import load_models
from gpuserver.engines.musetalk.parsing import BiSeNet, _jaw_kernels, jaw_mask
from gpuserver.engines.musetalk.pipeline import MusetalkPipeline, positional_encoding
from gpuserver.engines.musetalk.prepare import load_frames
from gpuserver.media import SAMPLES_PER_TICK
from tests.musetalk_fixtures import DEFAULT_AVATAR, landmarker, noise_speech, tiny_models_dir

__all__ = ["landmarker", "tiny_models_dir"]


@pytest.fixture(scope="module")
def pipeline(tiny_models_dir: Path) -> MusetalkPipeline:
    return MusetalkPipeline(load_models(tiny_models_dir, "cpu"))


def test_positional_encoding_is_the_official_formula() -> None:
    table = positional_encoding(50, 384)
    assert table.shape == (50, 384) and table.dtype == torch.float32
    for pos in (0, 1, 17, 49):
        for i in (0, 1, 100, 191):
            angle = pos / 10000 ** (2 * i / 384)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_windower_yields_one_frame_per_tick_and_holds_the_look_ahead() -> None:
    windower = AudioWindower()
    pcm = noise_speech(20)
    cut: list[AudioWindow] = []
    received = 0
    for size in (1, 3, 2, 7, 7):  # ticks per chunk
        windower.push(pcm[received * SAMPLES_PER_TICK : (received + size) * SAMPLES_PER_TICK])
        received += size
        while (window := windower.take()) is not None:
            cut.append(window)
        assert windower.waiting_frames == min(LOOKAHEAD_TICKS, received)
    while (window := windower.take(final=True)) is not None:
        cut.append(window)
    frames = [w.first_frame + k for w in cut for k in range(w.frame_count)]
    assert frames == list(range(20))
    for window in cut:  # each window holds the utterance from its start to the newest audio
        assert window.start_tick == 0
        end_tick = len(window.pcm) // SAMPLES_PER_TICK
        assert end_tick >= min(20, window.first_frame + window.frame_count + LOOKAHEAD_TICKS)
        np.testing.assert_allclose(window.pcm, pcm[: end_tick * SAMPLES_PER_TICK] / 32768.0)


def test_windows_are_anchored_at_the_utterance_start_and_segment_boundaries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Official segments, shrunk to 10 ticks: a window starts at the segment of its first
    frame's earliest step and ends with the newest audio of the last segment it touches."""
    monkeypatch.setattr(audio_features, "SEGMENT_TICKS", 10)
    windower = AudioWindower()
    pcm = noise_speech(35)
    cut: list[tuple[AudioWindow, int]] = []
    for tick in range(35):  # 40 ms chunks
        windower.push(pcm[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK])
        while (window := windower.take()) is not None:
            cut.append((window, tick + 1))
        assert windower.buffered_ticks <= 2 * 10 + LOOKAHEAD_TICKS + 1
    assert [w.first_frame for w, _ in cut] == list(range(35 - LOOKAHEAD_TICKS))
    for window, received in cut:
        frame = window.first_frame
        assert window.start_tick == 10 * ((max(0, frame - 2)) // 10)
        touched_end = 10 * ((frame + 2) // 10) + 10  # the segment of its latest step
        end_tick = window.start_tick + len(window.pcm) // SAMPLES_PER_TICK
        assert end_tick == min(received, touched_end)
        expected = pcm[window.start_tick * SAMPLES_PER_TICK : end_tick * SAMPLES_PER_TICK]
        np.testing.assert_allclose(window.pcm, expected / 32768.0)
    # Frames within 2 ticks of a boundary see both segments; others only their own.
    spans = {w.first_frame: len(w.pcm) // SAMPLES_PER_TICK for w, _ in cut}
    assert spans[12] == 12 - 10 + 1 + LOOKAHEAD_TICKS and spans[9] > 10


def test_a_long_final_window_spans_at_most_two_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_features, "SEGMENT_TICKS", 10)
    windower = AudioWindower()
    windower.push(noise_speech(45))
    windows = []
    while (window := windower.take(final=True)) is not None:
        windows.append(window)
    assert [(w.start_tick, w.first_frame, w.frame_count) for w in windows] == [
        (0, 0, 18),
        (10, 18, 10),
        (20, 28, 10),
        (30, 38, 7),
    ]
    assert all(len(w.pcm) <= 2 * 10 * SAMPLES_PER_TICK for w in windows)


def test_networks_shapes_and_dtypes(pipeline: MusetalkPipeline) -> None:
    assert pipeline.dtype == torch.float32 and pipeline.device.type == "cpu"
    mel = log_mel(pipeline.models.feature_extractor, noise_speech(10) / 32768.0)
    assert mel.shape == (1, 80, 3000) and mel.dtype == np.float32
    hidden = pipeline.encode_audio(np.concatenate([mel, mel]))
    assert hidden.shape == (2, 1500, 5, 384)
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    latents = pipeline.encode_crops(crops)
    assert latents.shape == (3, 8, 32, 32) and latents.dtype == torch.float32
    torch.testing.assert_close(pipeline.encode_crops(crops), latents)  # posterior mean
    assert not torch.allclose(latents[:, :4], latents[:, 4:])  # masked half vs reference
    lower_black = crops.copy()
    lower_black[:, 128:] = 0
    torch.testing.assert_close(pipeline.encode_crops(lower_black)[:, :4], latents[:, :4])
    faces = pipeline.generate(latents, torch.randn(3, 50, 384))
    assert faces.shape == (3, 256, 256, 3) and faces.dtype == np.uint8


def test_batched_generation_equals_one_by_one(pipeline: MusetalkPipeline) -> None:
    torch.manual_seed(3)
    latents, tokens = torch.randn(4, 8, 32, 32), torch.randn(4, 50, 384)
    batched = pipeline.generate(latents, tokens).astype(int)
    single = np.concatenate(
        [pipeline.generate(latents[i : i + 1], tokens[i : i + 1]) for i in range(4)]
    )
    assert np.abs(batched - single).max() <= 1


def test_landmark_box_is_the_v15_rule() -> None:
    rng = np.random.default_rng(0)
    landmarks = rng.uniform(100, 200, (68, 2))
    landmarks[29] = (150, 140)
    landmarks[8] = (150, 230)  # the chin, lowest point
    x0, y0, x1, y1 = landmark_box(landmarks, (400, 400))
    assert (x0, x1) == (int(landmarks[:, 0].min()), int(landmarks[:, 0].max()))
    assert (y0, y1) == (140 - (230 - 140), 230 + EXTRA_MARGIN_PX)
    assert landmark_box(landmarks, (400, 235))[3] == 235  # clipped to the frame


def test_dlib_landmarks_give_the_default_portraits_box(landmarker: Landmarker) -> None:
    frame = cv2.imread(str(DEFAULT_AVATAR))
    landmarks = landmarker(frame)
    assert landmarks is not None and landmarks.shape == (68, 2)
    x0, y0, x1, y1 = landmark_box(landmarks, (512, 512))
    # The face (x177-272, eyes at y~101, chin at y~178): nose at the crop's half-height.
    assert 170 < x0 < 185 and 265 < x1 < 280 and 175 < y1 - EXTRA_MARGIN_PX < 185
    assert abs((y0 + y1 - EXTRA_MARGIN_PX) / 2 - landmarks[29, 1]) <= 1
    assert tuple(locate_boxes([frame], landmarker)[0]) == (x0, y0, x1, y1)
    assert landmarker(np.full((300, 300, 3), 128, np.uint8)) is None


def test_without_dlib_the_opencv_fallback_locates_the_face(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "dlib" else real_find_spec(name)
    )
    assert load_landmarker() is None
    assert "OpenCV fallback" in caplog.text
    frame = cv2.imread(str(DEFAULT_AVATAR))
    x0, y0, x1, y1 = locate_boxes([frame], None)[0]
    assert 165 < x0 < 185 and 265 < x1 < 285 and 40 < y0 < 70 and 180 < y1 < 205


def test_video_boxes_are_smoothed_over_time() -> None:
    rng = np.random.default_rng(0)
    steady = np.tile([100, 50, 200, 180], (40, 1))
    jittery = steady + rng.integers(-3, 4, steady.shape)
    smoothed = smooth_boxes(jittery)
    assert smoothed.shape == steady.shape and smoothed.dtype == np.int32

    def shimmer(boxes: np.ndarray) -> float:  # mean frame-to-frame movement
        return float(np.abs(np.diff(boxes, axis=0)).mean())

    assert shimmer(smoothed) < 0.5 * shimmer(jittery)
    np.testing.assert_array_equal(smooth_boxes(steady), steady)
    moving = steady + np.arange(40)[:, None]  # a head moving steadily: no lag
    np.testing.assert_array_equal(smooth_boxes(moving)[2:-2], moving[2:-2])
    np.testing.assert_array_equal(smooth_boxes(steady[:1]), steady[:1])


def test_blend_mask_covers_the_lower_face_only_and_paste_touches_nothing_else() -> None:
    frame = cv2.imread(str(Path(__file__).parents[1] / "gpuserver/assets/avatars/default.png"))
    box = (170, 73, 278, 178)
    mask = blend_mask(frame, box, None)
    assert mask.shape == (178 - 73, 278 - 170) and mask.dtype == np.uint8
    outer = crop_box(box)
    half = (outer[1] + outer[3]) // 2 - box[1]  # blurred by a 17 px kernel: 8 px spill
    assert mask[: half - 9].max() == 0 and mask[half + 10 : half + 30, 20:90].min() > 200
    face = np.full((256, 256, 3), 255, np.uint8)
    pasted = paste_face(frame, face, box, mask)
    changed = np.argwhere(np.any(pasted != frame, axis=2))
    assert changed[:, 0].min() >= box[1] + half - 9 and changed[:, 0].max() < box[3]
    assert changed[:, 1].min() >= box[0] and changed[:, 1].max() < box[2]


def test_face_parsing_port_and_jaw_mode() -> None:
    kernel, cheek_kernel, cheeks = _jaw_kernels()
    assert kernel.shape == (33, 33) and kernel[:10].sum() == 0
    assert kernel[10].sum() == 1 and kernel[20].sum() == 21 and kernel[32].sum() == 21
    assert cheek_kernel.shape == (3, 35) and cheeks[:, 166].all() and not cheeks[:, 167:346].any()
    labels = np.zeros((512, 512), np.int64)
    labels[150:400, 150:360] = 1  # skin
    labels[230:300, 230:280] = 10  # nose: removed
    labels[320:340, 220:290] = 12  # upper lip: kept
    mask = jaw_mask(labels)
    assert mask[260, 250] == 0 and mask[330, 250] == 255 and mask[200, 200] == 255
    assert mask[100, 100] == 0
    logits = BiSeNet().eval()(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 19, 64, 64)


def test_source_frames_keep_their_resolution_up_to_the_setting(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    full_hd = tmp_path / "hd.png"
    cv2.imwrite(str(full_hd), np.full((1080, 1920, 3), 90, np.uint8))
    assert load_frames(full_hd)[0].shape == (1080, 1920, 3)  # 1080p stays sharp by default
    assert load_frames(full_hd, max_side=960)[0].shape == (540, 960, 3)
    settings = EngineSettings(name="musetalk", models_dir=tiny_models_dir, source_max_side=1280)
    assert MusetalkEngine.from_settings(settings)._source_max_side == 1280
