"""Endpointing: when an utterance starts and ends, from per-window VAD results.

A pure state machine over 32 ms windows (no clock, no I/O), so its timing rules are tested
with synthetic probability sequences. Positions are sample counts at 16 kHz from the start
of the stream: window k covers [k·512, (k+1)·512).

- Onset: `min_speech_ms` of voice windows in a run that no two non-voice windows in a row
  interrupt; the utterance starts at the run's first window.
- Voice: probability >= `threshold` to start; once speaking, >= threshold - 0.15 keeps it
  going (silero's own hysteresis), so soft syllables do not split an utterance.
- End: `end_silence_ms` of consecutive non-voice; the utterance ends after its last voice.
- Cap: an utterance reaching `max_utterance_s` ends there; voice that goes on starts anew.
- Barge-in: while the avatar speaks, `barge_in_ms` of voice in an onset run (sooner than
  an utterance starts) is reported once, so the avatar can stop at once.
- Pause: `early_transcribe_ms` of silence inside an utterance is reported once per pause,
  so its transcription can start before the end is certain.
- Echo guard: while the avatar speaks (the caller's flag), the browser's echo canceller
  leaves a residue of the avatar's voice. Voice then needs `echo_threshold` and a level at
  least `echo_margin_db` above the recent noise floor (the 20th percentile of the levels of
  the last 3 s of non-speech windows, never taken below -60 dBFS, so a digitally silent
  line does not make any whisper loud enough).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from gpuserver.config import ASRSettings
from gpuserver.media import SAMPLE_RATE
from gpuserver.voice.vad import WINDOW_MS, WINDOW_SAMPLES, VADWindow

_HYSTERESIS = 0.15
_NOISE_WINDOWS = 3000 // WINDOW_MS  # 3 s of history
_NOISE_PERCENTILE = 0.2
NOISE_FLOOR_MIN_DB = -60.0


@dataclass(frozen=True)
class EndpointConfig:
    """The timing rules above (ASRSettings documents each), plus `pad_ms`: audio kept on
    both sides of an utterance for the recogniser, so no syllable is clipped."""

    min_speech_ms: int = 200
    end_silence_ms: int = 500
    max_utterance_s: float = 30.0
    threshold: float = 0.5
    echo_threshold: float = 0.8
    echo_margin_db: float = 20.0
    pad_ms: int = 64
    barge_in_ms: int = 96
    early_transcribe_ms: int = 250

    @classmethod
    def from_settings(cls, asr: ASRSettings) -> EndpointConfig:
        return cls(
            min_speech_ms=asr.min_speech_ms,
            end_silence_ms=asr.end_silence_ms,
            max_utterance_s=asr.max_utterance_s,
            threshold=asr.vad_threshold,
            echo_threshold=asr.echo_threshold,
            echo_margin_db=asr.echo_margin_db,
            pad_ms=asr.speech_pad_ms,
            barge_in_ms=asr.barge_in_ms,
            early_transcribe_ms=asr.early_transcribe_ms,
        )


@dataclass(frozen=True)
class SpeechStart:
    """An utterance began at sample `start` (the first window of its onset)."""

    start: int


@dataclass(frozen=True)
class BargeIn:
    """The user's voice over the avatar's, from sample `start`: not yet an utterance."""

    start: int


@dataclass(frozen=True)
class SpeechPause:
    """The utterance [start, end) paused: it may be complete (`SpeechEnd` says so later)."""

    start: int
    end: int


@dataclass(frozen=True)
class SpeechEnd:
    """The utterance [start, end) ended: its last voice window ends at `end`.

    `capped`: cut at max_utterance_s rather than ended by silence.
    """

    start: int
    end: int
    capped: bool = False

    @property
    def duration_ms(self) -> int:
        return (self.end - self.start) * 1000 // SAMPLE_RATE


Endpoint = SpeechStart | BargeIn | SpeechPause | SpeechEnd


class Endpointer:
    """Feed it every window of one stream in order; it reports starts and ends."""

    def __init__(self, config: EndpointConfig) -> None:
        self._config = config
        self._onset_windows = math.ceil(config.min_speech_ms / WINDOW_MS)
        self._end_windows = math.ceil(config.end_silence_ms / WINDOW_MS)
        self._barge_in_windows = math.ceil(config.barge_in_ms / WINDOW_MS)
        early = math.ceil(config.early_transcribe_ms / WINDOW_MS)
        self._pause_windows = early if 0 < early < self._end_windows else None
        self._max_samples = round(config.max_utterance_s * 1000 / WINDOW_MS) * WINDOW_SAMPLES
        self._position = 0  # samples pushed so far
        self._onset: int | None = None  # start of the current run of voice, before an utterance
        self._voice_run = 0
        self._dipped = False  # the onset run's latest window was a tolerated dip
        self._barged_in = False  # reported for the current onset run
        self._start: int | None = None  # the utterance being spoken
        self._last_voice_end = 0
        self._silence_run = 0
        self._noise: deque[float] = deque(maxlen=_NOISE_WINDOWS)

    @property
    def in_speech(self) -> bool:
        return self._start is not None

    @property
    def position(self) -> int:
        """Samples pushed so far (the end of the latest window)."""
        return self._position

    @property
    def noise_floor_db(self) -> float:
        if not self._noise:
            return NOISE_FLOOR_MIN_DB
        levels = sorted(self._noise)
        return max(levels[int(len(levels) * _NOISE_PERCENTILE)], NOISE_FLOOR_MIN_DB)

    def push(self, window: VADWindow, *, avatar_speaking: bool) -> Endpoint | None:
        """The next window; returns what it completed, if anything."""
        start, self._position = self._position, self._position + WINDOW_SAMPLES
        if self._start is None:
            return self._idle(window, start, avatar_speaking)
        return self._speaking(window, avatar_speaking)

    def flush(self) -> SpeechEnd | None:
        """The stream ended: end the utterance in progress, if any."""
        if self._start is None:
            return None
        return self._end(capped=False)

    def _idle(
        self, window: VADWindow, start: int, avatar_speaking: bool
    ) -> SpeechStart | BargeIn | None:
        if not self._is_voice(window, avatar_speaking, speaking=False):
            if self._onset is not None and not self._dipped:
                self._dipped = True  # one short dip (a stop consonant) does not break an onset
                return None
            self._onset, self._voice_run, self._dipped = None, 0, False
            self._barged_in = False
            self._noise.append(window.level_db)
            return None
        if self._onset is None:
            self._onset = start
        self._voice_run, self._dipped = self._voice_run + 1, False
        if self._voice_run < self._onset_windows:
            barging = avatar_speaking and self._voice_run >= self._barge_in_windows
            if barging and not self._barged_in:
                self._barged_in = True
                return BargeIn(self._onset)
            return None
        self._start, self._onset, self._voice_run = self._onset, None, 0
        self._barged_in = False
        self._last_voice_end, self._silence_run = self._position, 0
        return SpeechStart(self._start)

    def _speaking(self, window: VADWindow, avatar_speaking: bool) -> SpeechEnd | SpeechPause | None:
        assert self._start is not None
        if self._is_voice(window, avatar_speaking, speaking=True):
            self._last_voice_end, self._silence_run = self._position, 0
        else:
            self._silence_run += 1
            if self._silence_run >= self._end_windows:
                return self._end(capped=False)
            if self._silence_run == self._pause_windows:
                return SpeechPause(self._start, self._last_voice_end)
        if self._position - self._start >= self._max_samples:
            return self._end(capped=True)
        return None

    def _end(self, *, capped: bool) -> SpeechEnd:
        assert self._start is not None
        end = SpeechEnd(self._start, self._last_voice_end, capped)
        self._start, self._silence_run = None, 0
        return end

    def _is_voice(self, window: VADWindow, avatar_speaking: bool, *, speaking: bool) -> bool:
        config = self._config
        threshold = config.echo_threshold if avatar_speaking else config.threshold
        if speaking:
            threshold -= _HYSTERESIS
        if window.probability < threshold:
            return False
        return not avatar_speaking or (
            window.level_db >= self.noise_floor_db + config.echo_margin_db
        )
