"""Whisper audio features per video frame, from streamed 16 kHz PCM.

Official features (`AudioProcessor.get_whisper_chunk`): whisper-tiny's 5 encoder hidden
states at 50 steps/s; frame i takes steps [2i-4, 2i+6), i.e. audio [40i-80, 40i+120) ms,
as 10 steps x 5 states = 50 tokens of 384, time-major. Steps before the start or past the
end of the audio are zero vectors (feature-space padding, as official).

Streaming: a rolling buffer re-encodes a window of recent audio whenever frames become
ready. Frame i is ready once LOOKAHEAD_TICKS ticks after it exist (or the stream ended).

Look-ahead, a latency cost: the window's last step ends 120 ms after frame i starts, and
whisper's front end (25 ms FFT window, two k=3 convolutions) reaches ~12 ms further, so a
frame needs audio up to 132.5 ms past its start, 92.5 ms past its end. Audio arrives in
whole 40 ms ticks, hence LOOKAHEAD_TICKS = 3: a frame leaves 120 ms after its own audio
ends. (The encoder's self-attention sees the whole window, so later audio still shifts
features slightly; 3 ticks keep every input of the frame's own window real audio.)

Window: whisper's encoder takes exactly 30 s of log-mel (the feature extractor pads with
silence; transformers rejects other lengths, and the model was trained that way). The
padding is therefore not avoidable without departing from how the features were trained,
and since the encoder's cost is fixed by those 30 s, each window carries as much real
context as is useful: LEFT_CONTEXT_TICKS (2 s) before its first new frame. The official
code encodes whole clips (up to 30 s); 2 s of past around each 200 ms frame window is a
choice that bounds memory and re-encoded audio, not a measured optimum. Many frames share
one encoder call: everything ready when it runs (TTS chunks coalesce while an encode is in
flight), up to MAX_WINDOW_FRAMES.
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
LOOKAHEAD_MS = LOOKAHEAD_TICKS * TICK_SECONDS * 1000  # 120 ms of added latency
LEFT_CONTEXT_TICKS = 50  # 2 s
WHISPER_TICKS = 30 * SAMPLE_RATE // SAMPLES_PER_TICK  # 750: the encoder's fixed 30 s input
MAX_WINDOW_FRAMES = WHISPER_TICKS - LEFT_CONTEXT_TICKS - LOOKAHEAD_TICKS


@dataclass(frozen=True)
class AudioWindow:
    """Audio for one encoder call and the frames it yields.

    `pcm` (float32 in [-1, 1]) starts at tick `start_tick`; the call yields frames
    `first_frame .. first_frame + frame_count - 1`.
    """

    pcm: np.ndarray
    start_tick: int
    first_frame: int
    frame_count: int


class AudioWindower:
    """The rolling audio buffer of one stream: cuts encoder windows as frames get ready."""

    def __init__(self) -> None:
        self._buffer = np.zeros(0, np.float32)
        self._buffer_tick = 0  # tick at which the buffer starts
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
        ready = self._ticks if final else self._ticks - LOOKAHEAD_TICKS
        count = min(ready - self._next_frame, MAX_WINDOW_FRAMES)
        if count <= 0:
            return None
        first = self._next_frame
        start = max(0, first - LEFT_CONTEXT_TICKS)
        stop = min(self._ticks, first + count + LOOKAHEAD_TICKS)
        offset = start - self._buffer_tick
        pcm = self._buffer[
            offset * SAMPLES_PER_TICK : (stop - self._buffer_tick) * SAMPLES_PER_TICK
        ]
        self._next_frame = first + count
        keep_from = max(0, self._next_frame - LEFT_CONTEXT_TICKS)
        self._buffer = self._buffer[(keep_from - self._buffer_tick) * SAMPLES_PER_TICK :]
        self._buffer_tick = keep_from
        return AudioWindow(pcm.copy(), start, first, count)


def log_mel(extractor: WhisperFeatureExtractor, pcm: np.ndarray) -> np.ndarray:
    """Whisper's log-mel of `pcm` padded to 30 s: [80, 3000] float32 (CPU work)."""
    features = extractor(pcm, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return features[0].astype(np.float32)


def frame_features(hidden: torch.Tensor, window: AudioWindow) -> torch.Tensor:
    """Cut a window's encoder states [1500, 5, 384] into frame tokens [frames, 50, 384].

    Steps outside the window's audio (before the stream start, or past a final window's
    end) are zero vectors.
    """
    frames = torch.arange(window.frame_count, device=hidden.device) + window.first_frame
    offsets = torch.arange(STEPS_PER_FRAME, device=hidden.device) - STEPS_PER_TICK * PAD_TICKS_LEFT
    steps = STEPS_PER_TICK * frames[:, None] + offsets[None, :]  # global steps [frames, 10]
    local = steps - STEPS_PER_TICK * window.start_tick
    valid = (local >= 0) & (local < len(window.pcm) // SAMPLES_PER_STEP)
    picked = hidden[local.clamp(0, hidden.shape[0] - 1)] * valid[..., None, None]
    return picked.reshape(window.frame_count, STEPS_PER_FRAME * HIDDEN_STATES, hidden.shape[-1])
