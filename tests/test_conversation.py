"""A session's history: system prompt first, bounded by turns and characters."""

from __future__ import annotations

from gpuserver.conversation import ConversationHistory


def test_messages_for_a_new_question_start_with_the_system_prompt() -> None:
    history = ConversationHistory("Be brief.")
    history.add_user("Hi")
    history.add_assistant("Hello!")
    messages = history.messages_for("How are you?")
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "How are you?"),
    ]


def test_old_turns_are_dropped_beyond_the_turn_bound() -> None:
    history = ConversationHistory("", max_turns=2)
    for n in range(5):
        history.add_user(f"q{n}")
        history.add_assistant(f"a{n}")
    assert [m.content for m in history.messages] == ["a2", "q3", "a3", "q4", "a4"]


def test_old_messages_are_dropped_beyond_the_character_bound() -> None:
    history = ConversationHistory("", max_chars=10)
    history.add_user("12345")
    history.add_assistant("67890")
    history.add_user("abc")
    assert [m.content for m in history.messages] == ["67890", "abc"]


def test_empty_assistant_text_is_not_kept() -> None:
    history = ConversationHistory("")
    history.add_assistant("   ")
    assert history.messages == []
