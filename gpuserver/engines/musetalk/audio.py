"""Whisper audio features per video frame, from streamed 16 kHz PCM.

Official features (`AudioProcessor.get_audio_feature` + `get_whisper_chunk`): the clip is
cut into 30 s segments from its start; each segment's log-mel is padded with silence to
whisper's fixed 30 s input and encoded on its own; the 5 encoder hidden states of all
segments, concatenated (50 steps/s), are cut off at the clip's end. Frame i takes steps
[2i-4, 2i+6), i.e. audio [40i-80, 40i+120) ms, as 10 steps x 5 states = 50 tokens of 384,
time-major; steps before the clip start or past its end are zero vectors.

Streaming does exactly that on the audio received so far. The stream (one `frames()` call,
i.e. one utterance) is the clip: a window starts at the segment boundary (utterance start
or a 30 s multiple) of its first frame's earliest step and holds every received sample up
to the end of the last segment its frames touch, so each encoder input is the official
segment truncated at the newest audio, at the official positions, with the official past.
A frame cut once its whole segment has arrived (a sentence delivered at once, or any frame
of a segment the stream has left) equals the whole-clip feature; a frame cut earlier
differs from it only through its segment's audio that had not arrived yet: whisper's
encoder attends across the whole 30 s, and the log-mel's dynamic-range floor (max - 8) is
taken over the segment's input. A window spans at most two segments (frames within 80 ms
of a boundary use both); every segment costs one 30 s encoder pass, whatever its length.

Look-ahead (latency): frame i is cut once LOOKAHEAD_TICKS = 3 ticks after its own have
arrived, i.e. once audio up to 160 ms after frame i starts (120 ms after it ends) is in.
Its own steps end 120 ms after its start and whisper's front end (25 ms STFT window, two
k=3 convolutions) reaches 12.5 ms further, so 132.5 ms rounded up to whole ticks: every
input of the frame's own window is real audio. The first frame of an utterance therefore
needs its first 160 ms of audio; each later frame leaves 120 ms after its own audio, before
batching and inference time. At the end of the stream (or after a stall, see `stream`)
the held frames are cut at once, the missing steps being zero as at the end of a clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from gpuserver.media import SAMPLE_RATE, SAMPLES_PER_TICK, TICK_SECONDS

STEPS_PER_TICK = 2  # whisper encoder: 50 steps/s at 25 fps
SAMPLES_PER_STEP = SAMPLES_PER_TICK // STEPS_PER_TICK  # 320
PAD_TICKS_LEFT = 2  # official audio_padding_length_left / right
PAD_TICKS_RIGHT = 2
STEPS_PER_FRAME = STEPS_PER_TICK * (PAD_TICKS_LEFT + PAD_TICKS_RIGHT + 1)  # 10
HIDDEN_STATES = 5  # embeddings + 4 encoder layers of whisper-tiny
LOOKAHEAD_TICKS = 3
LOOKAHEAD_MS = LOOKAHEAD_TICKS * TICK_SECONDS * 1000  # 120 ms after the frame's own audio
SEGMENT_SAMPLES = 30 * SAMPLE_RATE  # whisper's fixed input, the official segment
SEGMENT_TICKS = SEGMENT_SAMPLES // SAMPLES_PER_TICK  # 750
SEGMENT_STEPS = SEGMENT_TICKS * STEPS_PER_TICK  # 1500
MAX_WINDOW_SEGMENTS = 2


@dataclass(frozen=True)
class AudioWindow:
    """Audio for one encoder call and the frames it yields.

    `pcm` (float32 in [-1, 1]) starts at tick `start_tick`, a segment boundary, and spans at
    most MAX_WINDOW_SEGMENTS segments; the call yields frames `first_frame ..
    first_frame + frame_count - 1`.
    """

    pcm: np.ndarray
    start_tick: int
    first_frame: int
    frame_count: int


def segment_start(tick: int) -> int:
    """The first tick of the official 30 s segment holding `tick` (clamped at 0)."""
    return SEGMENT_TICKS * (max(0, tick) // SEGMENT_TICKS)


class AudioWindower:
    """The audio buffer of one stream: cuts encoder windows as frames get ready."""

    def __init__(self) -> None:
        self._buffer = np.zeros(0, np.float32)
        self._buffer_tick = 0  # tick at which the buffer starts (a segment boundary)
        self._ticks = 0  # ticks received
        self._next_frame = 0

    @property
    def buffered_ticks(self) -> int:
        return len(self._buffer) // SAMPLES_PER_TICK

    @property
    def waiting_frames(self) -> int:
        """Frames received but not yet cut (held back for look-ahead)."""
        return self._ticks - self._next_frame

    def push(self, pcm: np.ndarray) -> None:
        """Append int16 PCM, a whole number of ticks."""
        if len(pcm) % SAMPLES_PER_TICK:
            raise ValueError(f"audio chunk of {len(pcm)} samples is not whole ticks")
        samples = pcm.astype(np.float32) / 32768.0
        self._buffer = np.concatenate([self._buffer, samples])
        self._ticks += len(pcm) // SAMPLES_PER_TICK

    def take(self, final: bool = False) -> AudioWindow | None:
        """The next window, or None if no frame is ready.

        `final`: no audio is coming (for now): frames need no look-ahead, and steps past the
        buffer are zero, as at the end of an official clip.
        """
        first = self._next_frame
        ready = self._ticks if final else self._ticks - LOOKAHEAD_TICKS
        start = segment_start(first - PAD_TICKS_LEFT)
        # The last frame's last step must stay within the window's segments.
        limit = start + MAX_WINDOW_SEGMENTS * SEGMENT_TICKS - PAD_TICKS_RIGHT
        count = min(ready, limit) - first
        if count <= 0:
            return None
        last_segment_end = segment_start(first + count - 1 + PAD_TICKS_RIGHT) + SEGMENT_TICKS
        stop = min(self._ticks, last_segment_end)
        pcm = self._buffer[
            (start - self._buffer_tick) * SAMPLES_PER_TICK : (stop - self._buffer_tick)
            * SAMPLES_PER_TICK
        ]
        self._next_frame = first + count
        keep_from = segment_start(self._next_frame - PAD_TICKS_LEFT)
        self._buffer = self._buffer[(keep_from - self._buffer_tick) * SAMPLES_PER_TICK :]
        self._buffer_tick = keep_from
        return AudioWindow(pcm.copy(), start, first, count)


def log_mel(extractor: WhisperFeatureExtractor, pcm: np.ndarray) -> np.ndarray:
    """Whisper's log-mels of `pcm` cut into 30 s segments, each padded to 30 s:
    [segments, 80, 3000] float32 (CPU work)."""
    segments = [pcm[i : i + SEGMENT_SAMPLES] for i in range(0, max(1, len(pcm)), SEGMENT_SAMPLES)]
    features = extractor(segments, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return features.astype(np.float32)


def frame_features(hidden: torch.Tensor, window: AudioWindow) -> torch.Tensor:
    """Cut a window's encoder states (its segments' [1500, 5, 384] concatenated in time) into
    frame tokens [frames, 50, 384].

    Steps outside the window's audio (before the stream start, or past the received audio)
    are zero vectors.
    """
    frames = torch.arange(window.frame_count, device=hidden.device) + window.first_frame
    offsets = torch.arange(STEPS_PER_FRAME, device=hidden.device) - STEPS_PER_TICK * PAD_TICKS_LEFT
    steps = STEPS_PER_TICK * frames[:, None] + offsets[None, :]  # global steps [frames, 10]
    local = steps - STEPS_PER_TICK * window.start_tick
    valid = (local >= 0) & (local < len(window.pcm) // SAMPLES_PER_STEP)
    picked = hidden[local.clamp(0, hidden.shape[0] - 1)] * valid[..., None, None]
    return picked.reshape(window.frame_count, STEPS_PER_FRAME * HIDDEN_STATES, hidden.shape[-1])
