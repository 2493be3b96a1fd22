"""MuseTalk building blocks on tiny random weights: audio windows, PE, networks, boxes, masks."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gpuserver.engines.musetalk import audio as audio_features
from gpuserver.engines.musetalk.audio import (
    LOOKAHEAD_TICKS,
    AudioWindow,
    AudioWindower,
    frame_features,
    log_mel,
)
from gpuserver.engines.musetalk.blend import blend_mask, crop_box, paste_face
from gpuserver.engines.musetalk.facebox import (
    EXTRA_MARGIN_PX,
    landmark_box,
    load_landmarker,
    locate_boxes,
)
from gpuserver.engines.musetalk.models import load_models
from gpuserver.engines.musetalk.parsing import BiSeNet, _jaw_kernels, jaw_mask
from gpuserver.engines.musetalk.pipeline import MusetalkPipeline, positional_encoding
from gpuserver.media import SAMPLES_PER_TICK
from tests.musetalk_fixtures import noise_speech, tiny_models_dir

__all__ = ["tiny_models_dir"]


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


def official_chunks(hidden: torch.Tensor, samples: int) -> torch.Tensor:
    """`AudioProcessor.get_whisper_chunk` for one 30 s segment, as published."""
    num_frames = math.floor(samples / 16000 * 25)
    actual = math.floor(samples / 16000 * 50)
    feats = hidden[None, :actual]
    feats = torch.cat(
        [torch.zeros_like(feats[:, : 2 * 2]), feats, torch.zeros_like(feats[:, : 2 * 3 * 2])], 1
    )
    clips = [feats[:, 2 * i : 2 * i + 10] for i in range(num_frames)]
    return torch.cat(clips).reshape(num_frames, 50, hidden.shape[-1])


def test_frame_windows_match_the_official_indexing() -> None:
    ticks = 9
    hidden = torch.randn(1500, 5, 384)
    window = AudioWindow(np.zeros(ticks * SAMPLES_PER_TICK, np.float32), 0, 0, ticks)
    ours = frame_features(hidden, window)
    assert ours.shape == (ticks, 50, 384)
    torch.testing.assert_close(ours, official_chunks(hidden, ticks * SAMPLES_PER_TICK))
    # A later window of the same stream: the same frames, cut from a shifted encoding.
    shifted = AudioWindow(np.zeros((ticks - 2) * SAMPLES_PER_TICK, np.float32), 2, 4, 5)
    torch.testing.assert_close(frame_features(hidden[4:], shifted), ours[4:])


def test_windower_yields_one_frame_per_tick_and_holds_the_look_ahead() -> None:
    windower = AudioWindower()
    pcm = noise_speech(20)
    cut: list[AudioWindow] = []
    for size in (1, 3, 2, 7, 7):  # ticks per chunk
        start = sum(w.frame_count for w in cut) + windower.waiting_frames
        windower.push(pcm[start * SAMPLES_PER_TICK : (start + size) * SAMPLES_PER_TICK])
        received = start + size
        while (window := windower.take()) is not None:
            cut.append(window)
        assert windower.waiting_frames == min(LOOKAHEAD_TICKS, received)
    while (window := windower.take(final=True)) is not None:
        cut.append(window)
    frames = [w.first_frame + k for w in cut for k in range(w.frame_count)]
    assert frames == list(range(20))
    for window in cut:  # each window holds its look-ahead (or the end) and left context
        end_tick = window.start_tick + len(window.pcm) // SAMPLES_PER_TICK
        assert end_tick == min(20, window.first_frame + window.frame_count + LOOKAHEAD_TICKS)
        expected = pcm[window.start_tick * SAMPLES_PER_TICK : end_tick * SAMPLES_PER_TICK]
        np.testing.assert_allclose(window.pcm, expected / 32768.0)


def test_windower_keeps_only_the_left_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_features, "LEFT_CONTEXT_TICKS", 4)
    windower = AudioWindower()
    windower.push(noise_speech(30))
    window = windower.take()
    assert window is not None and window.frame_count == 30 - LOOKAHEAD_TICKS
    windower.push(noise_speech(2))
    window = windower.take()
    assert window is not None and (window.start_tick, window.first_frame) == (23, 27)
    assert windower.buffered_ticks == 32 - 25  # from 4 ticks before the next frame


def test_networks_shapes_and_dtypes(pipeline: MusetalkPipeline) -> None:
    assert pipeline.dtype == torch.float32 and pipeline.device.type == "cpu"
    mel = log_mel(pipeline.models.feature_extractor, noise_speech(10) / 32768.0)
    assert mel.shape == (80, 3000) and mel.dtype == np.float32
    hidden = pipeline.encode_audio(np.stack([mel, mel]))
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


def test_face_alignment_landmarks_are_used_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    landmarks = np.random.default_rng(1).uniform(80, 220, (68, 2))
    seen: list[np.ndarray] = []

    class FaceAlignment:
        def __init__(self, kind: str, flip_input: bool, device: str) -> None:
            assert (kind, flip_input, device) == ("2D", False, "cpu")

        def get_landmarks_from_image(self, rgb: np.ndarray) -> list[np.ndarray]:
            seen.append(rgb)
            return [landmarks]

    fake = types.ModuleType("face_alignment")
    fake.FaceAlignment = FaceAlignment  # type: ignore[attr-defined]
    fake.LandmarksType = types.SimpleNamespace(TWO_D="2D")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "face_alignment", fake)
    landmarker = load_landmarker("cpu")
    assert landmarker is not None
    boxes = locate_boxes([frame], landmarker)
    assert tuple(boxes[0]) == landmark_box(landmarks, (300, 300))
    np.testing.assert_array_equal(seen[0], frame[..., ::-1])  # RGB in


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
