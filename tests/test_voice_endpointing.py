"""Endpointing rules over synthetic VAD sequences: one window = 32 ms = 512 samples.

Defaults: an utterance starts after 200 ms of voice (7 windows) and ends after 500 ms of
silence (16 windows); voice keeps going above 0.35 once started; while the avatar speaks,
voice needs probability 0.8 and a level 20 dB over the noise floor.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gpuserver.config import ASRSettings
from gpuserver.voice.endpointing import (
    NOISE_FLOOR_MIN_DB,
    BargeIn,
    Endpoint,
    EndpointConfig,
    Endpointer,
    SpeechEnd,
    SpeechPause,
    SpeechStart,
)
from gpuserver.voice.vad import WINDOW_SAMPLES, VADWindow

W = WINDOW_SAMPLES
LOUD = -20.0  # dBFS: speech close to the microphone
QUIET = -70.0


def feed(
    endpointer: Endpointer,
    probabilities: Sequence[float],
    level_db: float = LOUD,
    avatar_speaking: bool = False,
    only: tuple[type, ...] = (SpeechStart, SpeechEnd),
) -> list[tuple[int, Endpoint]]:
    """(index of the window that completed it, event) for each event of the kinds `only`,
    indexes from 0 overall."""
    events = []
    for probability in probabilities:
        index = endpointer.position // W
        event = endpointer.push(VADWindow(probability, level_db), avatar_speaking=avatar_speaking)
        if isinstance(event, only):
            events.append((index, event))
    return events


def test_defaults_come_from_the_settings() -> None:
    config = EndpointConfig.from_settings(ASRSettings())
    assert (config.min_speech_ms, config.end_silence_ms, config.max_utterance_s) == (200, 500, 30)


def test_speech_starts_after_200_ms_of_voice_at_its_first_window() -> None:
    endpointer = Endpointer(EndpointConfig())
    assert feed(endpointer, [0.0] * 10 + [0.9] * 6) == []
    assert not endpointer.in_speech
    assert feed(endpointer, [0.9]) == [(16, SpeechStart(10 * W))]
    assert endpointer.in_speech


def test_voice_shorter_than_min_speech_is_ignored() -> None:
    endpointer = Endpointer(EndpointConfig())
    assert feed(endpointer, ([0.0] * 5 + [0.9] * 6) * 5 + [0.0] * 30) == []


def test_a_single_window_dip_does_not_break_an_onset_but_two_do() -> None:
    one_dip = Endpointer(EndpointConfig())
    assert feed(one_dip, [0.9] * 4 + [0.1] + [0.9] * 3) == [(7, SpeechStart(0))]
    two_dips = Endpointer(EndpointConfig())
    assert feed(two_dips, [0.9] * 4 + [0.1] * 2 + [0.9] * 6) == []
    assert feed(two_dips, [0.9]) == [(12, SpeechStart(6 * W))]


def test_speech_ends_after_500_ms_of_silence_at_its_last_voice() -> None:
    endpointer = Endpointer(EndpointConfig())
    feed(endpointer, [0.9] * 20)
    assert feed(endpointer, [0.1] * 15) == []
    assert feed(endpointer, [0.1]) == [(35, SpeechEnd(0, 20 * W))]
    assert not endpointer.in_speech
    assert SpeechEnd(0, 20 * W).duration_ms == 640


def test_pauses_shorter_than_the_end_silence_keep_one_utterance() -> None:
    endpointer = Endpointer(EndpointConfig())
    events = feed(endpointer, ([0.9] * 10 + [0.1] * 15) * 3 + [0.1] * 16)
    assert events == [(6, SpeechStart(0)), (75, SpeechEnd(0, 60 * W))]


def test_once_speaking_voice_continues_above_the_lower_threshold() -> None:
    endpointer = Endpointer(EndpointConfig())
    feed(endpointer, [0.9] * 7)
    assert feed(endpointer, [0.4] * 30) == []  # 0.4 >= 0.5 - 0.15: still speech
    assert feed(endpointer, [0.3] * 16) == [(52, SpeechEnd(0, 37 * W))]


def test_other_timings_are_rounded_up_to_whole_windows() -> None:
    endpointer = Endpointer(EndpointConfig(min_speech_ms=100, end_silence_ms=100))
    assert feed(endpointer, [0.9] * 4 + [0.0] * 4) == [
        (3, SpeechStart(0)),
        (7, SpeechEnd(0, 4 * W)),
    ]


def test_long_speech_is_cut_at_max_utterance_and_continues_as_a_new_one() -> None:
    endpointer = Endpointer(EndpointConfig(max_utterance_s=1.0))  # 31 windows
    events = feed(endpointer, [0.9] * 45)
    assert events == [
        (6, SpeechStart(0)),
        (30, SpeechEnd(0, 31 * W, capped=True)),
        (37, SpeechStart(31 * W)),
    ]


def test_flush_ends_the_utterance_in_progress_only() -> None:
    endpointer = Endpointer(EndpointConfig())
    assert endpointer.flush() is None
    feed(endpointer, [0.9] * 10 + [0.1] * 3)
    assert endpointer.flush() == SpeechEnd(0, 10 * W)
    assert endpointer.flush() is None


class TestEchoGuard:
    """While the avatar speaks, the echo canceller's residue of its voice is not the user."""

    def test_quiet_residue_with_high_probability_is_not_speech(self) -> None:
        endpointer = Endpointer(EndpointConfig())
        # Floor -60 dBFS (nothing heard yet) + 20 dB margin: -45 dBFS residue is too quiet.
        assert feed(endpointer, [0.99] * 60, level_db=-45, avatar_speaking=True) == []
        # The same once the avatar is silent: a quiet user is still a user.
        assert feed(endpointer, [0.99] * 7, level_db=-45)[0][1] == SpeechStart(60 * W)

    def test_loud_clear_speech_barges_in(self) -> None:
        endpointer = Endpointer(EndpointConfig())
        feed(endpointer, [0.0] * 5, level_db=QUIET, avatar_speaking=True)
        events = feed(endpointer, [0.95] * 7, level_db=LOUD, avatar_speaking=True)
        assert events == [(11, SpeechStart(5 * W))]

    def test_uncertain_voice_needs_the_higher_threshold_while_the_avatar_speaks(self) -> None:
        guarded = Endpointer(EndpointConfig())
        assert feed(guarded, [0.7] * 20, avatar_speaking=True) == []
        unguarded = Endpointer(EndpointConfig())
        assert feed(unguarded, [0.7] * 20)[0][1] == SpeechStart(0)

    def test_the_margin_is_over_the_recent_noise_floor(self) -> None:
        endpointer = Endpointer(EndpointConfig())
        assert endpointer.noise_floor_db == NOISE_FLOOR_MIN_DB
        feed(endpointer, [0.05] * 100, level_db=-35)  # a noisy room: 3 s at -35 dBFS
        assert endpointer.noise_floor_db == pytest.approx(-35)
        assert feed(endpointer, [0.95] * 20, level_db=-25, avatar_speaking=True) == []
        assert feed(endpointer, [0.95] * 7, level_db=-12, avatar_speaking=True) != []

    def test_digital_silence_does_not_lower_the_floor_below_minus_60_dbfs(self) -> None:
        endpointer = Endpointer(EndpointConfig())
        feed(endpointer, [0.0] * 100, level_db=-100)
        assert endpointer.noise_floor_db == NOISE_FLOOR_MIN_DB
        assert feed(endpointer, [0.99] * 20, level_db=-45, avatar_speaking=True) == []

    def test_user_speech_does_not_raise_the_noise_floor(self) -> None:
        endpointer = Endpointer(EndpointConfig())
        feed(endpointer, [0.0] * 50, level_db=QUIET)
        feed(endpointer, [0.9] * 200, level_db=LOUD)
        assert endpointer.noise_floor_db == NOISE_FLOOR_MIN_DB


def test_a_pause_inside_an_utterance_is_reported_once_before_its_end() -> None:
    endpointer = Endpointer(EndpointConfig(early_transcribe_ms=250, end_silence_ms=500))
    every = (SpeechStart, SpeechPause, SpeechEnd)
    events = feed(endpointer, [0.9] * 10 + [0.0] * 20, only=every)
    assert events == [
        (6, SpeechStart(0)),
        (17, SpeechPause(0, 10 * W)),  # 8 windows (256 ms) of silence
        (25, SpeechEnd(0, 10 * W)),
    ]


def test_voice_after_a_pause_makes_a_later_pause_and_one_end() -> None:
    endpointer = Endpointer(EndpointConfig(early_transcribe_ms=250, end_silence_ms=500))
    every = (SpeechStart, SpeechPause, SpeechEnd)
    events = feed(endpointer, [0.9] * 10 + [0.0] * 10 + [0.9] * 5 + [0.0] * 20, only=every)
    assert [event for _, event in events] == [
        SpeechStart(0),
        SpeechPause(0, 10 * W),
        SpeechPause(0, 25 * W),
        SpeechEnd(0, 25 * W),
    ]


def test_early_transcription_off_reports_no_pause() -> None:
    endpointer = Endpointer(EndpointConfig(early_transcribe_ms=0))
    assert feed(endpointer, [0.9] * 10 + [0.0] * 20, only=(SpeechPause,)) == []


def test_talking_over_the_avatar_barges_in_sooner_than_an_utterance_starts() -> None:
    endpointer = Endpointer(EndpointConfig(barge_in_ms=96, min_speech_ms=200))
    feed(endpointer, [0.0] * 5, level_db=QUIET, avatar_speaking=True)  # the noise floor
    events = feed(
        endpointer, [0.95] * 8, level_db=LOUD, avatar_speaking=True, only=(BargeIn, SpeechStart)
    )
    assert events == [(7, BargeIn(5 * W)), (11, SpeechStart(5 * W))]


def test_no_barge_in_while_the_avatar_is_silent() -> None:
    endpointer = Endpointer(EndpointConfig(barge_in_ms=96))
    assert feed(endpointer, [0.95] * 10, only=(BargeIn,)) == []
