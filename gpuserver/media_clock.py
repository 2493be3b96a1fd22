"""One media clock per session: every 40 ms it sends one video frame and its 640 samples.

The clock is the only place that decides what plays when. Producers fill a bounded
`SpeechQueue` with (frame, audio) pairs of a turn and close the turn with an `EndOfTurn`
marker; at tick k (due at t0 + k·40 ms) the clock pops one pair, or sends the avatar's idle
frame and silence when nothing is ready. Because frame and audio leave together with pts from
the same tick index, lips stay on the voice whatever the producers do.

A late wake-up is never caught up with a burst: missed ticks are skipped (pts jump forward)
and queued speech continues where it was. Speaking state follows what actually leaves:
`speech_started` fires after a turn's first tick is sent, `turn_played` after its last.

The idle loop keeps its phase across speech: speech frames are drawn over the idle frame
they replace (`upcoming_phase` tells a producer which one), the phase advances with every
frame sent and holds while speech is due but not ready (prebuffering, a producer's stall),
so blinks and breathing continue where they were when speech ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gpuserver.media import SAMPLES_PER_TICK, TICK_SECONDS, silence

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpeechTick:
    """One tick of speech: a frame and exactly the 640 samples it was made from."""

    frame: np.ndarray
    audio: np.ndarray
    turn_id: str


@dataclass(frozen=True, slots=True)
class EndOfTurn:
    """Marks that the producer of `turn_id` has queued its last tick."""

    turn_id: str


QueueItem = SpeechTick | EndOfTurn


class SpeechQueue:
    """Bounded FIFO of speech ticks and end-of-turn markers.

    Only ticks count towards the bound, so a producer can always close its turn. `put` of a
    tick waits while the queue is full: a fast producer is paced by playback.
    """

    def __init__(self, max_ticks: int) -> None:
        self.max_ticks = max_ticks
        self._items: deque[QueueItem] = deque()
        self._ticks = 0
        self._markers = 0
        self._epoch = 0  # counts clears
        self._not_full = asyncio.Event()
        self._not_full.set()

    @property
    def ticks(self) -> int:
        return self._ticks

    @property
    def has_end_marker(self) -> bool:
        return self._markers > 0

    async def put(self, item: QueueItem) -> None:
        """Append `item`; a tick waits for room. A tick whose wait outlived a `clear`
        (an interrupt) belongs to a cut turn and is dropped."""
        if isinstance(item, SpeechTick):
            epoch = self._epoch
            while self._ticks >= self.max_ticks:
                self._not_full.clear()
                await self._not_full.wait()
                if epoch != self._epoch:
                    return
            self._ticks += 1
        else:
            self._markers += 1
        self._items.append(item)

    def peek(self) -> QueueItem | None:
        return self._items[0] if self._items else None

    def popleft(self) -> QueueItem:
        item = self._items.popleft()
        if isinstance(item, SpeechTick):
            self._ticks -= 1
            self._not_full.set()
        else:
            self._markers -= 1
        return item

    def clear(self) -> None:
        self._items.clear()
        self._ticks = self._markers = 0
        self._epoch += 1
        self._not_full.set()


class TickSink(Protocol):
    def send_tick(self, index: int, frame: np.ndarray, audio: np.ndarray) -> None:
        """Hand tick `index`'s frame and 640 samples to the outgoing tracks."""


class PlaybackListener(Protocol):
    def speech_started(self, turn_id: str) -> None:
        """The first tick of `turn_id` has been sent."""

    def turn_played(self, turn_id: str, ticks: int) -> None:
        """The end of `turn_id` was reached after `ticks` of its ticks were sent (maybe 0)."""


@dataclass(frozen=True, slots=True)
class PlaybackPosition:
    """How much of a turn has left the clock, when it was interrupted."""

    turn_id: str
    ticks_played: int

    @property
    def samples_played(self) -> int:
        return self.ticks_played * SAMPLES_PER_TICK


@dataclass(slots=True)
class ClockStats:
    ticks_sent: int = 0
    speech_ticks: int = 0
    idle_ticks: int = 0
    skipped_ticks: int = 0


IdleSource = Callable[[int], np.ndarray]  # idle-loop phase -> frame
# A tick that wakes this early is sent now: sleeping less than the timer's resolution
# would only spin.
EARLY_TOLERANCE_S = 0.001


class MediaClock:
    def __init__(
        self,
        queue: SpeechQueue,
        idle: IdleSource,
        sink: TickSink,
        listener: PlaybackListener,
        *,
        prebuffer_ticks: int = 2,
        prebuffer_timeout: float = 0.2,
        on_cut_to_idle: Callable[[float], None] | None = None,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`on_cut_to_idle(seconds)` is told how long an interrupt took to reach the
        first idle tick sent after it."""
        self.queue = queue
        self.idle = idle
        self.sink = sink
        self.listener = listener
        self.prebuffer_ticks = prebuffer_ticks
        self.prebuffer_timeout = prebuffer_timeout
        self.stats = ClockStats()
        self._now = now
        self._sleep = sleep
        self._silence = silence()
        self._running = asyncio.Event()
        self._t0: float | None = None
        self._tick = 0
        self._turn: str | None = None  # the turn whose speech has started and not ended
        self._turn_ticks = 0
        self._flowing = False  # speech is playing without an underrun since it started
        self._prebuffer_since: float | None = None
        self._phase = 0  # the idle-loop frame the next tick shows
        self._cut_at: float | None = None  # when an interrupt cleared speech still playing
        self._on_cut_to_idle = on_cut_to_idle

    # --- control -------------------------------------------------------------------------

    def resume(self) -> None:
        """Start (or continue) ticking: someone consumes the tracks."""
        self._running.set()

    def pause(self) -> None:
        """Stop ticking until `resume`; the queue is kept, ticks missed meanwhile are skipped."""
        self._running.clear()

    @property
    def speaking_turn(self) -> str | None:
        return self._turn

    @property
    def upcoming_phase(self) -> int:
        """The idle-loop phase a speech frame queued now will be shown at (no stalls)."""
        return self._phase + self.queue.ticks

    def interrupt(self) -> PlaybackPosition | None:
        """Drop everything queued; return how far the playing turn got (None if none was)."""
        if self._turn is not None or self.queue.ticks:
            self._cut_at = self._now()
        self.queue.clear()
        position = PlaybackPosition(self._turn, self._turn_ticks) if self._turn else None
        self._turn = None
        self._turn_ticks = 0
        self._flowing = False
        self._prebuffer_since = None
        return position

    # --- the clock -------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._running.wait()
            now = self._now()
            if self._t0 is None:
                self._t0 = now
            due = self._t0 + self._tick * TICK_SECONDS
            if due - now > EARLY_TOLERANCE_S:
                await self._sleep(due - now)
                if not self._running.is_set():
                    continue
            else:
                self._skip_missed(now - due)
            self.step()

    def _skip_missed(self, lateness: float) -> None:
        missed = int(lateness / TICK_SECONDS)
        if missed:
            # Never burst: the stream jumps ahead, queued speech stays queued.
            self._tick += missed
            self.stats.skipped_ticks += missed
            logger.debug("media clock %.0f ms late: skipped %d ticks", lateness * 1000, missed)

    def step(self) -> None:
        """Send tick `self._tick` now and advance. `run` calls it on schedule."""
        index = self._tick
        self._tick += 1
        self._finish_ended_turns()
        item = self._next_speech()
        if item is None:
            self._report_cut()
            self.sink.send_tick(index, self.idle(self._phase), self._silence)
            self.stats.idle_ticks += 1
            if self._turn is None and not self.queue.ticks:
                self._phase += 1  # truly idle: the loop plays on; else speech is due here
        else:
            started = item.turn_id != self._turn
            if started:
                self._turn, self._turn_ticks = item.turn_id, 0
            self._turn_ticks += 1
            self._phase += 1
            self.sink.send_tick(index, item.frame, item.audio)
            self.stats.speech_ticks += 1
            if started:
                self.listener.speech_started(item.turn_id)
            self._finish_ended_turns()
        self.stats.ticks_sent += 1

    def _report_cut(self) -> None:
        """Time the first idle tick after an interrupt (`on_cut_to_idle`)."""
        if self._cut_at is None:
            return
        if self._on_cut_to_idle is not None:
            self._on_cut_to_idle(self._now() - self._cut_at)
        self._cut_at = None

    def _next_speech(self) -> SpeechTick | None:
        head = self.queue.peek()
        if head is None:
            self._flowing = False  # underrun: re-gather a prebuffer before speech resumes
            return None
        if not self._flowing:
            if not self._prebuffered():
                return None
            self._flowing = True
            self._prebuffer_since = None
        item = self.queue.popleft()
        assert isinstance(item, SpeechTick)  # markers were consumed by _finish_ended_turns
        return item

    def _prebuffered(self) -> bool:
        if self.queue.ticks >= self.prebuffer_ticks or self.queue.has_end_marker:
            return True
        now = self._now()
        if self._prebuffer_since is None:
            self._prebuffer_since = now
        return now - self._prebuffer_since >= self.prebuffer_timeout

    def _finish_ended_turns(self) -> None:
        while isinstance(head := self.queue.peek(), EndOfTurn):
            self.queue.popleft()
            ticks = self._turn_ticks if head.turn_id == self._turn else 0
            if ticks:
                self._turn, self._turn_ticks = None, 0
            self.listener.turn_played(head.turn_id, ticks)
