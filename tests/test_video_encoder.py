"""aiortc's video encoders, tuned: the bitrate follows the receiver only where it matters."""

from __future__ import annotations

from fractions import Fraction

import aiortc.rtcrtpsender
import numpy as np
from aiortc.codecs import get_capabilities
from av import VideoFrame

from gpuserver.video_encoder import SteadyBitrate, observe_video_encodes, tune_video_encoders


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_fall_of_a_fifth_or_more_is_taken_at_once() -> None:
    bitrate = SteadyBitrate(1_000_000, now=Clock())
    assert bitrate.offer(800_000) == 800_000
    assert bitrate.current == 800_000


def test_small_moves_either_way_are_ignored() -> None:
    clock = Clock()
    bitrate = SteadyBitrate(1_000_000, now=clock)
    clock.now = 10.0
    for estimate in (850_000, 1_100_000, 1_240_000, 950_000):
        assert bitrate.offer(estimate) is None
    assert bitrate.current == 1_000_000


def test_a_rise_is_taken_only_once_the_last_change_has_held() -> None:
    clock = Clock()
    bitrate = SteadyBitrate(1_000_000, now=clock)
    clock.now = 1.0
    assert bitrate.offer(1_500_000) is None, "too soon after the start"
    clock.now = 2.0
    assert bitrate.offer(1_500_000) == 1_500_000
    clock.now = 3.0
    assert bitrate.offer(2_000_000) is None, "too soon after the last rise"
    assert bitrate.offer(1_000_000) == 1_000_000, "a fall never waits"


def video_encoder() -> object:
    tune_video_encoders()
    vp8 = next(c for c in get_capabilities("video").codecs if c.mimeType == "video/VP8")
    return aiortc.rtcrtpsender.get_encoder(vp8)


def test_tuning_is_idempotent_and_leaves_audio_encoders_alone() -> None:
    tune_video_encoders()
    factory = aiortc.rtcrtpsender.get_encoder
    tune_video_encoders()
    assert aiortc.rtcrtpsender.get_encoder is factory
    opus = next(c for c in get_capabilities("audio").codecs if c.mimeType == "audio/opus")
    assert type(factory(opus)).__name__ == "OpusEncoder"


def test_the_encoder_keeps_its_bitrate_through_noise_and_reads_back_the_clamped_value() -> None:
    encoder = video_encoder()
    start = encoder.target_bitrate
    encoder.target_bitrate = int(start * 1.1)
    assert encoder.target_bitrate == start
    encoder.target_bitrate = 1  # far below the codec's minimum: it clamps
    clamped = encoder.target_bitrate
    assert 1 < clamped < start
    encoder.target_bitrate = int(clamped * 0.9)
    assert encoder.target_bitrate == clamped, "a move from the clamped value is small"


def test_each_video_encode_is_reported_to_the_observer() -> None:
    times: list[float] = []
    observe_video_encodes(times.append)
    try:
        encoder = video_encoder()
        frame = VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="bgr24")
        frame.pts, frame.time_base = 0, Fraction(1, 90_000)
        packets, _ = encoder.encode(frame)
    finally:
        observe_video_encodes(None)
    assert packets
    assert len(times) == 1 and times[0] > 0
