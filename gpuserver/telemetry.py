"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own per app.

Events are recorded where they happen (a turn's first frame, an interrupt reaching idle, a
video frame's encode); levels (sessions, queue depth, ticks sent) are read from the live
objects when scraped, so the media clock's hot path only bumps its own plain counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
ENCODE_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.1)


@dataclass(frozen=True, slots=True)
class MediaLevels:
    """What one session's media looks like right now."""

    speaking: bool
    peer_connected: bool
    queued_ticks: int
    ticks_speech: int
    ticks_idle: int
    ticks_skipped: int


@dataclass(frozen=True, slots=True)
class Levels:
    """Where the scrape-time figures come from (callables, so this module imports nothing
    of the server)."""

    sessions: Callable[[], int]
    media: Callable[[], Iterable[MediaLevels]]  # every open session's, plus closed ones' ticks
    engine_batch: Callable[[], int | None]  # the engine's latest batch size, if it batches


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        latency = {"buckets": LATENCY_BUCKETS, "registry": self.registry}
        self.first_frame = Histogram(
            "gpuserver_first_frame_seconds",
            "From a turn's chat/speak message to its first speaking frame leaving the server.",
            **latency,
        )
        self.llm_first_token = Histogram(
            "gpuserver_llm_first_token_seconds",
            "From a chat message to the LLM's first token.",
            **latency,
        )
        self.tts_first_audio = Histogram(
            "gpuserver_tts_first_audio_seconds",
            "From a turn's message to its first synthesized audio.",
            **latency,
        )
        self.interrupt_to_idle = Histogram(
            "gpuserver_interrupt_to_idle_seconds",
            "From an interrupt to the first idle frame sent after it.",
            **latency,
        )
        self.video_encode = Histogram(
            "gpuserver_video_encode_seconds",
            "Encode time of one video frame.",
            buckets=ENCODE_BUCKETS,
            registry=self.registry,
        )
        self.turns = Counter(
            "gpuserver_turns", "Turns started, by kind.", ["kind"], registry=self.registry
        )
        self.interrupts = Counter(
            "gpuserver_interrupts", "Turns cut by an interrupt.", registry=self.registry
        )
        self.errors = Counter(
            "gpuserver_errors", "Error messages sent to clients, by code.", ["code"],
            registry=self.registry,
        )  # fmt: skip

    def watch(self, levels: Levels) -> None:
        """Report the levels `levels` reads at every scrape."""
        self.registry.register(_LevelCollector(levels))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LevelCollector(Collector):
    def __init__(self, levels: Levels) -> None:
        self._levels = levels

    def collect(self) -> Iterator[Metric]:
        media = list(self._levels.media())
        yield _gauge("gpuserver_sessions", "Open WebSocket sessions.", self._levels.sessions())
        yield _gauge(
            "gpuserver_peer_connections",
            "Sessions whose peer connection is connected.",
            sum(m.peer_connected for m in media),
        )
        yield _gauge(
            "gpuserver_speaking_sessions",
            "Sessions whose avatar is speaking now.",
            sum(m.speaking for m in media),
        )
        yield _gauge(
            "gpuserver_speech_queue_ticks",
            "Speech ticks queued ahead of the media clocks, all sessions.",
            sum(m.queued_ticks for m in media),
        )
        frames = CounterMetricFamily(
            "gpuserver_frames", "Media clock ticks, by what was sent.", labels=["kind"]
        )
        frames.add_metric(["speech"], sum(m.ticks_speech for m in media))
        frames.add_metric(["idle"], sum(m.ticks_idle for m in media))
        frames.add_metric(["skipped"], sum(m.ticks_skipped for m in media))
        yield frames
        if (batch := self._levels.engine_batch()) is not None:
            yield _gauge("gpuserver_engine_batch_size", "The engine's latest batch.", batch)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
