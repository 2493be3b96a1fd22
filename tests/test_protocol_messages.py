"""Parsing client frames into protocol messages, and the error each bad frame earns."""

from __future__ import annotations

import json

import pytest

from gpuserver.protocol import (
    BackendReadiness,
    Chat,
    Error,
    Ping,
    ProtocolError,
    Readiness,
    ReadinessInfo,
    SessionInfo,
    SetVoice,
    Speak,
    WebRTCIceCandidate,
    encode,
    parse_client_message,
)


def reject(frame: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(frame)
    return caught.value


def test_each_client_type_parses_into_its_model() -> None:
    assert parse_client_message('{"type": "ping", "t": 5}') == Ping(type="ping", t=5)
    chat = parse_client_message('{"type": "chat", "text": "hi", "id": "c1"}')
    assert chat == Chat(type="chat", text="hi", id="c1")
    speak = parse_client_message('{"type": "speak", "text": "hi", "queue": true}')
    assert isinstance(speak, Speak) and speak.queue
    voice = parse_client_message('{"type": "set_voice", "voice": "de"}')
    assert voice == SetVoice(type="set_voice", voice="de")
    default = parse_client_message('{"type": "set_voice", "voice": null}')
    assert isinstance(default, SetVoice) and default.voice is None


def test_unknown_fields_are_ignored() -> None:
    assert parse_client_message('{"type": "interrupt", "extra": [1, 2]}').type == "interrupt"


def test_a_null_candidate_means_end_of_candidates() -> None:
    message = parse_client_message('{"type": "webrtc_ice_candidate", "candidate": null}')
    assert isinstance(message, WebRTCIceCandidate)
    assert message.candidate is None


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_message", None),
        ('"chat"', "invalid_message", None),
        ('{"text": "no type"}', "invalid_message", None),
        ('{"type": 7}', "invalid_message", None),
        ('{"type": "dance", "id": "d1"}', "unknown_type", "d1"),
        ('{"type": "dance"}', "unknown_type", "dance"),
        ('{"type": "chat"}', "invalid_message", "chat"),
        ('{"type": "chat", "text": 3, "id": "x"}', "invalid_message", "x"),
        ('{"type": "set_avatar"}', "invalid_message", "set_avatar"),
        ('{"type": "webrtc_offer"}', "invalid_message", "webrtc_offer"),
        ('{"type": "set_voice"}', "invalid_message", "set_voice"),
        ('{"type": "set_voice", "voice": ""}', "invalid_message", "set_voice"),
    ],
)
def test_bad_frames_get_the_documented_code_and_ref(frame: str, code: str, ref: str | None) -> None:
    error = reject(frame)
    assert (error.code, error.ref) == (code, ref)


def test_invalid_fields_are_named_in_the_message() -> None:
    assert "field 'text'" in reject('{"type": "chat", "text": 3}').message
    assert "field 'avatar_id'" in reject('{"type": "set_avatar"}').message


def test_server_messages_carry_their_type_and_urls_lists() -> None:
    ready = BackendReadiness(backend="espeak", state="ready")
    loading = BackendReadiness(backend="local", state="loading", eta_s=20.0)
    readiness = ReadinessInfo(ready=False, llm=loading, tts=ready)
    info = SessionInfo(
        session_id="s",
        avatar_id="default",
        avatars=[],
        ice_servers=[],
        server_version="0",
        resume_key="k",
        resume_grace_s=30.0,
        readiness=readiness,
    )
    data = json.loads(encode(info))
    assert data["type"] == "session" and data["protocol"] == 1
    assert data["readiness"]["llm"] == {
        "backend": "local", "state": "loading", "message": None, "eta_s": 20.0
    }  # fmt: skip
    assert data["tts_voice"] is None
    change = json.loads(encode(Readiness(**readiness.model_dump())))
    assert change["type"] == "readiness" and change["ready"] is False
    error = json.loads(encode(Error(code="busy", message="full")))
    assert error == {"type": "error", "code": "busy", "message": "full", "ref": None}
