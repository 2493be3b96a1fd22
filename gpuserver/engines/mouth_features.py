"""Audio -> mouth pose for 2-D lip-sync, one 640-sample block (one video frame) at a time.

Loudness opens the jaw (a noise gate closes it in pauses); the first two formants pick the
viseme family: a high first formant drops the jaw for "ah", a high second formant spreads
the lips ("ee"), a low one rounds them ("oo"); hiss (s, f) keeps the teeth nearly together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpuserver.media import SAMPLE_RATE, SAMPLES_PER_TICK

GATE_DB = -45.0  # below this (dBFS RMS) the block is silence: the mouth closes
FULL_DB = -22.0  # speech this loud (or louder than the running peak) opens fully
PEAK_DECAY_DB = 0.03  # per block: the loudness reference follows quieter voices slowly
ATTACK = 0.7  # per-block smoothing factors: open fast, close more slowly (no flapping)
RELEASE = 0.4
SHAPE_RATE = 0.4

_BIN_HZ = SAMPLE_RATE / SAMPLES_PER_TICK  # 25 Hz
_FREQS = np.fft.rfftfreq(SAMPLES_PER_TICK, 1 / SAMPLE_RATE)
_WINDOW = np.hanning(SAMPLES_PER_TICK).astype(np.float32)
_KERNEL = np.hanning(9)[1:-1]
_ENVELOPE_KERNEL = _KERNEL / _KERNEL.sum()  # ~150 Hz wide: merges harmonics into formants
_HISS = _FREQS >= 4000
_VOICED = (_FREQS >= 150) & (_FREQS < 4000)
_F1_RANGE = (200.0, 1000.0)
_F2_MAX_HZ = 3000.0
_F2_MIN_GAP_HZ = 350.0  # F2 is sought this far above F1 so F1's skirt is not taken for it
# F1 300 Hz ("ee", "oo") .. 750 Hz ("ah") -> jaw; F2 800 Hz "oo" .. 1250 neutral .. 2200 "ee".
_F1_TO_OPEN = ((300.0, 750.0), (0.4, 1.0))
_F2_TO_SHAPE = ((800.0, 1250.0, 2200.0), (-1.0, 0.0, 1.0))


@dataclass(frozen=True)
class MouthPose:
    open: float  # jaw drop, 0 (closed) .. 1 (wide "ah")
    shape: float  # -1 rounded ("oo") .. 0 neutral .. +1 spread ("ee")


@dataclass(frozen=True)
class BlockFeatures:
    level: float  # 0 at the noise gate .. 1 at full loudness
    open_factor: float  # how far this sound drops the jaw at full loudness, 0..1
    shape: float  # target lip shape, -1 .. 1


def loudness_db(block: np.ndarray) -> float:
    """RMS level of int16 PCM in dB relative to full scale."""
    samples = block.astype(np.float32) / 32768.0
    return float(10 * np.log10(np.mean(samples * samples) + 1e-12))


def spectral_features(block: np.ndarray) -> tuple[float, float]:
    """(open_factor, shape) of one block from its first two formants and its hiss."""
    spectrum = np.fft.rfft(block.astype(np.float32) * _WINDOW)
    power = spectrum.real**2 + spectrum.imag**2
    envelope = np.convolve(power, _ENVELOPE_KERNEL, mode="same")
    f1 = _peak_hz(envelope, *_F1_RANGE)
    f2 = _peak_hz(envelope, f1 + _F2_MIN_GAP_HZ, _F2_MAX_HZ)
    hiss = float(power[_HISS].sum() / (power[_VOICED].sum() + power[_HISS].sum() + 1e-9))
    open_factor = float(np.interp(f1, *_F1_TO_OPEN)) * (1 - 0.75 * hiss)
    return open_factor, float(np.interp(f2, *_F2_TO_SHAPE))


def _peak_hz(envelope: np.ndarray, low: float, high: float) -> float:
    start, stop = int(low / _BIN_HZ), int(high / _BIN_HZ) + 1
    return (start + int(np.argmax(envelope[start:stop]))) * _BIN_HZ


class MouthTracker:
    """Turns successive 640-sample blocks into smoothed mouth poses.

    Causal one-pole smoothing (fast attack, slower release) keeps the mouth from flapping
    at the frame rate; state lives for one utterance stream.
    """

    def __init__(self) -> None:
        self._open = 0.0
        self._shape = 0.0
        self._peak_db = FULL_DB

    def step(self, block: np.ndarray) -> MouthPose:
        features = self._features(block)
        target_open = features.level * features.open_factor
        rate = ATTACK if target_open > self._open else RELEASE
        self._open += rate * (target_open - self._open)
        if features.level > 0:  # quiet blocks have unreliable formants: they steer less
            self._shape += SHAPE_RATE * features.level * (features.shape - self._shape)
        else:
            self._shape -= SHAPE_RATE * self._shape
        return MouthPose(self._open, self._shape)

    def _features(self, block: np.ndarray) -> BlockFeatures:
        db = loudness_db(block)
        if db <= GATE_DB:
            return BlockFeatures(0.0, 0.0, 0.0)
        self._peak_db = max(FULL_DB, self._peak_db - PEAK_DECAY_DB, db)
        # Squared: consonants (10-15 dB below the vowels) barely open the mouth.
        level = min(1.0, (db - GATE_DB) / (self._peak_db - GATE_DB)) ** 2
        open_factor, shape = spectral_features(block)
        return BlockFeatures(level, open_factor, shape)
