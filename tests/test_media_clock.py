"""The media clock: one (frame, 640 samples) pair per tick, idle when empty, no bursts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest

from gpuserver.media import SAMPLES_PER_TICK, TICK_SECONDS
from gpuserver.media_clock import EndOfTurn, MediaClock, SpeechQueue, SpeechTick

IDLE = np.zeros((4, 4, 3), np.uint8)


class VirtualTime:
    """A clock that only moves when the media clock sleeps (or a test stalls it)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class Recorder:
    """Sink and listener: what left the clock, in order."""

    def __init__(self) -> None:
        self.ticks: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.events: list[tuple[str, str, int]] = []

    def send_tick(self, index: int, frame: np.ndarray, audio: np.ndarray) -> None:
        self.ticks.append((index, frame, audio))

    def speech_started(self, turn_id: str) -> None:
        self.events.append(("started", turn_id, len(self.ticks)))

    def turn_played(self, turn_id: str, ticks: int) -> None:
        self.events.append(("played", turn_id, ticks))

    @property
    def indices(self) -> list[int]:
        return [index for index, _, _ in self.ticks]


def speech(turn: str, n: int, first: int = 1) -> list[SpeechTick]:
    """n ticks whose frame and audio both carry the tick's number, to check pairing."""
    return [
        SpeechTick(
            np.full((4, 4, 3), value, np.uint8),
            np.full(SAMPLES_PER_TICK, value, np.int16),
            turn,
        )
        for value in range(first, first + n)
    ]


def make_clock(
    recorder: Recorder, queue_ticks: int = 50, prebuffer: int = 0, time: VirtualTime | None = None
) -> MediaClock:
    time = time or VirtualTime()
    return MediaClock(
        SpeechQueue(queue_ticks),
        lambda tick: IDLE,
        recorder,
        recorder,
        prebuffer_ticks=prebuffer,
        prebuffer_timeout=0.2,
        now=time,
        sleep=time.sleep,
    )


async def until(condition: Callable[[], bool]) -> None:
    """Let the clock task run (virtual time: it never really sleeps) until `condition`."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def fill(clock: MediaClock, items: list) -> None:
    for item in items:
        await clock.queue.put(item)


def test_idle_ticks_are_the_idle_frame_and_exactly_640_samples_of_silence() -> None:
    recorder = Recorder()
    clock = make_clock(recorder)
    for _ in range(5):
        clock.step()
    assert recorder.indices == [0, 1, 2, 3, 4]
    for _, frame, audio in recorder.ticks:
        assert frame is IDLE
        assert audio.shape == (SAMPLES_PER_TICK,)
        assert audio.dtype == np.int16
        assert not audio.any()
    assert clock.stats.idle_ticks == 5


async def test_each_tick_sends_a_frame_with_exactly_the_audio_it_was_made_from() -> None:
    recorder = Recorder()
    clock = make_clock(recorder)
    await fill(clock, [*speech("t1", 6), EndOfTurn("t1")])
    for _ in range(8):
        clock.step()
    spoken = recorder.ticks[:6]
    for expected, (_, frame, audio) in enumerate(spoken, start=1):
        assert (frame == expected).all()
        assert (audio == expected).all()
        assert len(audio) == SAMPLES_PER_TICK
    assert all(frame is IDLE for _, frame, _ in recorder.ticks[6:])


async def test_speech_events_follow_the_ticks_that_actually_left() -> None:
    recorder = Recorder()
    clock = make_clock(recorder)
    clock.step()  # idle first
    await fill(clock, [*speech("t1", 3), EndOfTurn("t1")])
    for _ in range(5):
        clock.step()
    # started right after its first tick (the 2nd tick overall) was sent,
    # played right after its 3rd and last tick, not a tick later.
    assert recorder.events == [("started", "t1", 2), ("played", "t1", 3)]
    assert clock.speaking_turn is None


async def test_a_turn_without_ticks_is_reported_played_with_zero_ticks() -> None:
    recorder = Recorder()
    clock = make_clock(recorder)
    await clock.queue.put(EndOfTurn("empty"))
    clock.step()
    assert recorder.events == [("played", "empty", 0)]


async def test_queued_turns_play_back_to_back() -> None:
    recorder = Recorder()
    clock = make_clock(recorder)
    await fill(clock, [*speech("a", 2), EndOfTurn("a"), *speech("b", 2, first=10), EndOfTurn("b")])
    for _ in range(4):
        clock.step()
    assert [e[:2] for e in recorder.events] == [
        ("started", "a"),
        ("played", "a"),
        ("started", "b"),
        ("played", "b"),
    ]
    assert clock.stats.idle_ticks == 0


async def test_prebuffer_holds_a_new_turn_until_enough_ticks_are_queued() -> None:
    recorder = Recorder()
    clock = make_clock(recorder, prebuffer=3)
    await fill(clock, speech("t1", 2))
    clock.step()
    clock.step()
    assert clock.stats.speech_ticks == 0  # 2 < 3 queued: still idle
    await fill(clock, speech("t1", 1, first=3))
    clock.step()
    assert clock.stats.speech_ticks == 1


async def test_prebuffer_does_not_hold_a_turn_whose_producer_has_finished() -> None:
    recorder = Recorder()
    clock = make_clock(recorder, prebuffer=10)
    await fill(clock, [*speech("short", 2), EndOfTurn("short")])
    clock.step()
    assert clock.stats.speech_ticks == 1


async def test_prebuffer_gives_up_waiting_after_its_timeout() -> None:
    time = VirtualTime()
    recorder = Recorder()
    clock = make_clock(recorder, prebuffer=10, time=time)
    await fill(clock, speech("slow", 1))
    clock.step()
    assert clock.stats.speech_ticks == 0
    time.now += 0.25
    clock.step()
    assert clock.stats.speech_ticks == 1


async def test_run_keeps_the_40ms_schedule_and_never_bursts_after_a_stall() -> None:
    time = VirtualTime()
    recorder = Recorder()
    clock = make_clock(recorder, time=time)
    await fill(clock, [*speech("t1", 30), EndOfTurn("t1")])
    sent_at: list[float] = []
    original = recorder.send_tick

    def send_and_stall(index: int, frame: np.ndarray, audio: np.ndarray, **kw: bool) -> None:
        sent_at.append(time.now)
        original(index, frame, audio, **kw)
        if index == 5:
            time.now += 0.2  # the loop was blocked for 5 ticks

    recorder.send_tick = send_and_stall  # type: ignore[method-assign]
    clock.resume()
    task = asyncio.create_task(clock.run())
    await until(lambda: len(recorder.ticks) >= 20)
    task.cancel()

    indices = recorder.indices
    assert indices == sorted(set(indices))  # strictly increasing: pts monotonic
    gap = [b - a for a, b in pairwise(indices) if b - a > 1]
    assert gap == [5], "the 4 missed ticks are skipped in one jump, after tick 5"
    # No burst: after the jump, ticks leave one per 40 ms again.
    after = sent_at[indices.index(11) :]
    assert all(b - a == pytest.approx(TICK_SECONDS) for a, b in pairwise(after))
    # No speech was lost: the queued ticks continue in order across the stall.
    values = [int(frame[0, 0, 0]) for _, frame, _ in recorder.ticks]
    assert values == list(range(1, 21))
    assert clock.stats.skipped_ticks == 4


async def test_a_paused_clock_sends_nothing_and_resumes_ahead_without_losing_speech() -> None:
    time = VirtualTime()
    recorder = Recorder()
    clock = make_clock(recorder, time=time)
    await fill(clock, speech("t1", 10))
    clock.resume()
    task = asyncio.create_task(clock.run())
    await until(lambda: len(recorder.ticks) >= 3)
    clock.pause()
    for _ in range(10):
        await asyncio.sleep(0)
    sent = len(recorder.ticks)
    time.now += 1.0  # a reconnect took a second
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(recorder.ticks) == sent
    clock.resume()
    await until(lambda: len(recorder.ticks) >= sent + 2)
    task.cancel()
    assert recorder.indices[sent] > recorder.indices[sent - 1] + 20
    values = [int(frame[0, 0, 0]) for _, frame, _ in recorder.ticks]
    assert values[: sent + 2] == list(range(1, sent + 3))


async def test_interrupt_drops_the_queue_and_reports_how_far_the_turn_got() -> None:
    recorder = Recorder()
    clock = make_clock(recorder)
    await fill(clock, [*speech("t1", 10), EndOfTurn("t1")])
    for _ in range(4):
        clock.step()
    position = clock.interrupt()
    assert position is not None
    assert (position.turn_id, position.ticks_played) == ("t1", 4)
    assert position.samples_played == 4 * SAMPLES_PER_TICK
    clock.step()
    assert recorder.ticks[-1][1] is IDLE
    assert clock.queue.ticks == 0
    assert ("played", "t1", 4) not in recorder.events
    assert clock.interrupt() is None


async def test_queue_put_waits_while_full_and_end_markers_always_fit() -> None:
    queue = SpeechQueue(max_ticks=2)
    for item in speech("t", 2):
        await queue.put(item)
    blocked = asyncio.create_task(queue.put(speech("t", 1)[0]))
    await asyncio.sleep(0)
    assert not blocked.done()
    await asyncio.wait_for(queue.put(EndOfTurn("t")), 1)  # markers never wait
    queue.popleft()
    await asyncio.wait_for(blocked, 1)
    assert queue.ticks == 2


async def test_clearing_the_queue_releases_a_waiting_producer_and_drops_its_stale_tick() -> None:
    queue = SpeechQueue(max_ticks=1)
    await queue.put(speech("cut", 1)[0])
    blocked = asyncio.create_task(queue.put(speech("cut", 1)[0]))
    await asyncio.sleep(0)
    queue.clear()  # an interrupt
    await asyncio.wait_for(blocked, 1)
    assert queue.ticks == 0, "a tick of the cut turn never enters after the interrupt"
    await queue.put(speech("next", 1)[0])
    assert queue.ticks == 1


def phased_clock(recorder: Recorder, prebuffer: int = 0) -> MediaClock:
    """A clock whose idle frames carry their loop phase in every pixel."""
    return MediaClock(
        SpeechQueue(50),
        lambda phase: np.full((4, 4, 3), phase % 256, np.uint8),
        recorder,
        recorder,
        prebuffer_ticks=prebuffer,
        now=VirtualTime(),
    )


def shown_phases(recorder: Recorder) -> list[int]:
    return [int(frame[0, 0, 0]) for _, frame, _ in recorder.ticks]


async def test_the_idle_loop_keeps_its_phase_across_speech() -> None:
    recorder = Recorder()
    clock = phased_clock(recorder, prebuffer=2)
    for _ in range(3):
        clock.step()  # idle phases 0, 1, 2
    first = clock.upcoming_phase  # what a producer asks before drawing its first frame
    frames = [
        SpeechTick(np.full((4, 4, 3), 100 + first + k, np.uint8), np.zeros(640, np.int16), "t")
        for k in range(4)
    ]
    await fill(clock, frames[:1])  # the producer is slow: prebuffering holds the phase
    clock.step()
    await fill(clock, [*frames[1:], EndOfTurn("t")])
    for _ in range(7):
        clock.step()
    assert first == 3
    assert shown_phases(recorder) == [0, 1, 2, 3, 103, 104, 105, 106, 7, 8, 9]


async def test_an_underrun_inside_a_turn_holds_the_idle_phase_for_the_rest_of_it() -> None:
    recorder = Recorder()
    clock = phased_clock(recorder)
    tick = lambda k: SpeechTick(  # noqa: E731
        np.full((4, 4, 3), 100 + k, np.uint8), np.zeros(640, np.int16), "t"
    )
    await fill(clock, [tick(0), tick(1)])
    clock.step()
    clock.step()
    clock.step()  # underrun: the producer stalls mid-turn
    clock.step()
    await fill(clock, [tick(2), EndOfTurn("t")])
    clock.step()
    clock.step()
    assert shown_phases(recorder) == [100, 101, 2, 2, 102, 3]


async def test_the_first_idle_tick_after_an_interrupt_is_timed_once() -> None:
    time = VirtualTime()
    recorder = Recorder()
    cut_delays: list[float] = []
    clock = MediaClock(
        SpeechQueue(50), lambda tick: IDLE, recorder, recorder, prebuffer_ticks=0,
        on_cut_to_idle=cut_delays.append, now=time,
    )  # fmt: skip
    await fill(clock, speech("t1", 10))
    clock.step()
    clock.step()
    clock.interrupt()
    time.now += 0.015
    clock.step()
    clock.step()
    assert cut_delays == [pytest.approx(0.015)]
    assert [index for index, frame, _ in recorder.ticks if frame is IDLE] == [2, 3]
    clock.interrupt()  # nothing was speaking: no cut to time
    clock.step()
    assert cut_delays == [pytest.approx(0.015)]


async def test_a_tick_due_within_a_millisecond_is_sent_without_sleeping() -> None:
    time = VirtualTime()
    recorder = Recorder()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.now += seconds + 0.0395  # every wake-up comes 0.5 ms before the next tick
        await asyncio.sleep(0)

    clock = MediaClock(SpeechQueue(5), lambda tick: IDLE, recorder, recorder, now=time, sleep=sleep)
    clock.resume()
    task = asyncio.create_task(clock.run())
    await until(lambda: len(recorder.ticks) >= 6)
    task.cancel()
    assert len(sleeps) <= len(recorder.ticks), "no spinning on sub-millisecond waits"
    assert recorder.indices[:6] == [0, 1, 2, 3, 4, 5]
