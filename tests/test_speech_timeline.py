"""What the listener heard when a turn was cut, from word timings and samples played."""

from __future__ import annotations

from gpuserver.speech_timeline import SpeechTimeline


def two_sentences() -> SpeechTimeline:
    timeline = SpeechTimeline()
    timeline.begin_segment("Hello there.", 0)
    timeline.add_word("Hello", 0)
    timeline.add_word("there", 8000)
    timeline.begin_segment(" How are you?", 16000)
    for word, start in [("How", 0), ("are", 4000), ("you", 8000)]:
        timeline.add_word(word, start)
    return timeline


def test_nothing_played_means_nothing_heard() -> None:
    assert two_sentences().heard_text(0) == ""


def test_heard_text_ends_at_the_last_started_word() -> None:
    timeline = two_sentences()
    assert timeline.heard_text(100) == "Hello"
    assert timeline.heard_text(9000) == "Hello there"


def test_a_finished_sentence_is_heard_whole_with_its_punctuation() -> None:
    assert two_sentences().heard_text(16500) == "Hello there. How"
    assert two_sentences().heard_text(10**9) == "Hello there. How are you"


def test_words_the_tts_rewrote_keep_the_previous_end() -> None:
    timeline = SpeechTimeline()
    timeline.begin_segment("It costs 42 dollars.", 0)
    timeline.add_word("It", 0)
    timeline.add_word("costs", 3000)
    timeline.add_word("forty-two", 6000)  # not in the text: ignored
    timeline.add_word("dollars", 12000)
    assert timeline.heard_text(7000) == "It costs"
    assert timeline.heard_text(12000) == "It costs 42 dollars"


def test_chinese_words_map_back_to_their_characters() -> None:
    timeline = SpeechTimeline()
    timeline.begin_segment("你好，欢迎使用。", 0)
    for word, start in [("你好", 0), ("欢迎", 6000), ("使", 12000), ("用", 14000)]:
        timeline.add_word(word, start)
    assert timeline.heard_text(7000) == "你好，欢迎"
    assert timeline.text == "你好，欢迎使用。"
