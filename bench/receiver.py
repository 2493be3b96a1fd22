"""What a benchmark's receiving client saw: the avatar's mouth closed, the first speaking frame.

Shared by the benchmarks that time something "at the receiver" (bench/interrupt.py,
bench/voice_latency.py, bench/sessions.py), on frames an `AvatarClient` recorded.
"""

from __future__ import annotations

import cv2
import numpy as np
from av import VideoFrame

from gpuserver.avatar_manager import bundled_default_source
from gpuserver.client import AvatarClient, ReceivedVideo
from gpuserver.media import TICK_SECONDS

MOUTH = (slice(122, 168), slice(188, 258))  # the default avatar's mouth, with a margin
LOUD_RMS = 300.0
SILENT_RMS = 50.0
# "Closed" means closed for good: 10 frames (0.4 s), longer than any pause inside speech.
CLOSED_FRAMES = 10
SPEECH_BEFORE_S = 0.5  # the speech a closed mouth is told from: its last half second


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class ClosedMouth:
    """Tells decoded frames whose mouth looks like the idle portrait's (closed).

    A frame's error is its mouth region's mean difference from the portrait. Calibrated on idle
    frames of the same session, the idle level is their worst error. The encoder's quality
    moves with its bitrate, so a closed mouth later in a session can sit above that level; a
    mouth counts as closed when its error is nearer the idle level than the level of the
    speech just before the moment measured from (and at most 2x the idle level, at least
    1.5 luma levels, when there is no speech to compare with).
    """

    def __init__(self) -> None:
        bgr = cv2.imread(str(bundled_default_source()))
        luma = VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")
        self.reference = luma.to_ndarray(format="gray")[MOUTH].astype(np.float32)
        self.idle_level = 0.75

    def error(self, frame: ReceivedVideo) -> float:
        assert frame.luma is not None, "the client must keep video (keep_video=True)"
        return float(np.abs(frame.luma[MOUTH].astype(np.float32) - self.reference).mean())

    def calibrate(self, idle: list[ReceivedVideo]) -> None:
        self.idle_level = max(self.error(frame) for frame in idle)

    def threshold(self, frames: list[ReceivedVideo], after: float) -> float:
        """The error below which a mouth is closed, for frames decoded after `after`."""
        speech = [self.error(f) for f in frames if after - SPEECH_BEFORE_S < f.arrival <= after]
        floor = max(2.0 * self.idle_level, 1.5)
        if not speech:
            return floor
        return max(floor, (self.idle_level + float(np.median(speech))) / 2)

    def first_closed(self, frames: list[ReceivedVideo], after: float) -> float | None:
        """Arrival of the first frame after `after` from which the mouth stays closed."""
        threshold = self.threshold(frames, after)
        later = [frame for frame in frames if frame.arrival > after]
        closed = [self.error(frame) <= threshold for frame in later]
        for i in range(len(later) - CLOSED_FRAMES + 1):
            if all(closed[i : i + CLOSED_FRAMES]):
                return later[i].arrival
        return None


def first_silent_audio(client: AvatarClient, after: float) -> float | None:
    """RTP arrival of the first audio frame decoded silent after `after`."""
    arrivals = client.media.audio_rtp_arrival
    quiet = (
        arrivals.get(round(frame.media_time, 4), frame.arrival)
        for frame in client.media.audio
        if frame.arrival > after and frame.rms < SILENT_RMS
    )
    return next(quiet, None)


def first_speaking_frame(client: AvatarClient, after: float) -> float | None:
    """RTP arrival of the video frame paired with the first loud audio after `after`."""
    for audio in client.media.audio:
        if audio.arrival >= after and audio.rms > LOUD_RMS:
            tick = round(audio.media_time / TICK_SECONDS) * TICK_SECONDS
            return client.media.video_rtp_arrival.get(round(tick, 4))
    return None


def window_fps(client: AvatarClient, start: float, end: float) -> list[float]:
    """Frames received in each whole second of [start, end)."""
    arrivals = np.array([frame.arrival for frame in client.media.video])
    edges = np.arange(start, end - 0.999, 1.0)
    return [float(((arrivals >= t) & (arrivals < t + 1.0)).sum()) for t in edges]
