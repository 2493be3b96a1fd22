"""aiortc's video encoders, tuned for a talking head: start bitrate, steady bitrate, timing.

aiortc rebuilds its VP8 and H.264 encoders whenever the receiver's estimate (REMB) moves the
target by more than 10 %, and a rebuilt encoder restarts with a key frame at a constant rate:
the face goes blurry and sharpens over the next few hundred ms. A receiver nudges its
estimate every few packets — while ramping up, and all the time on a busy machine — so the
stream was rebuilt every second or two (measured: a mouth closed by an interrupt took up to
1 s to *look* closed at 4 sessions on 2 cores). `SteadyBitrate` lets through only the moves
that matter. aiortc creates encoders through a module-level factory, which
`tune_video_encoders` wraps, process-wide.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiortc.rtcrtpsender
from aiortc.codecs import h264, vpx
from av.frame import Frame

EncodeObserver = Callable[[float], None]
_encode_observer: EncodeObserver | None = None


def set_start_bitrate(kbps: int) -> None:
    """The bitrate aiortc's encoders start at (a module default in aiortc, so process-wide)."""
    for codec in (vpx, h264):
        codec.DEFAULT_BITRATE = max(codec.MIN_BITRATE, min(kbps * 1000, codec.MAX_BITRATE))


class SteadyBitrate:
    """Which of a receiver's bitrate estimates an encoder takes.

    A fall of `fall` or more is taken at once: the path is congested, and sending more only
    adds delay. A rise of `rise` or more is taken once `hold_s` have passed since the last
    change. Smaller moves are the estimator's noise and are ignored.
    """

    def __init__(
        self,
        current: int,
        *,
        fall: float = 0.2,
        rise: float = 0.25,
        hold_s: float = 2.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.current = current
        self._fall = fall
        self._rise = rise
        self._hold_s = hold_s
        self._now = now
        self._changed_at = now()

    def offer(self, estimate: int) -> int | None:
        """The new target if `estimate` is worth a rebuild, else None."""
        now = self._now()
        falls = estimate <= self.current * (1 - self._fall)
        held = now - self._changed_at >= self._hold_s
        rises = held and estimate >= self.current * (1 + self._rise)
        if not (falls or rises):
            return None
        self.current, self._changed_at = estimate, now
        return estimate


class _TunedEncoder:
    """Forwards to aiortc's video encoder, steadies its bitrate and times each `encode`."""

    def __init__(self, encoder: Any) -> None:
        object.__setattr__(self, "_encoder", encoder)
        object.__setattr__(self, "_bitrate", SteadyBitrate(encoder.target_bitrate))

    def encode(self, frame: Frame, force_keyframe: bool = False) -> Any:
        started = time.perf_counter()
        result = self._encoder.encode(frame, force_keyframe)
        if (observe := _encode_observer) is not None:
            observe(time.perf_counter() - started)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "target_bitrate":  # the sender forwards each REMB here
            if (steady := self._bitrate.offer(value)) is None:
                return
            self._encoder.target_bitrate = steady
            self._bitrate.current = self._encoder.target_bitrate  # as the codec clamped it
            return
        setattr(self._encoder, name, value)


def tune_video_encoders() -> None:
    """Make aiortc create every video encoder through `_TunedEncoder` (idempotent)."""
    factory = aiortc.rtcrtpsender.get_encoder
    if getattr(factory, "__wrapped__", None) is not None:
        return

    def tuned(codec: Any) -> Any:
        encoder = factory(codec)
        return _TunedEncoder(encoder) if codec.mimeType.startswith("video/") else encoder

    tuned.__wrapped__ = factory  # type: ignore[attr-defined]
    aiortc.rtcrtpsender.get_encoder = tuned


def observe_video_encodes(observer: EncodeObserver | None) -> None:
    """Report every video frame's encode time to `observer` (process-wide; None stops)."""
    global _encode_observer
    _encode_observer = observer
    tune_video_encoders()
