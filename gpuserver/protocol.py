"""Every WebSocket message of the protocol (docs/protocol.md), as pydantic models.

A leaf module: it imports nothing of the server, so the API, the session and outside
clients can all use it.

Client messages form one union discriminated on `type`; `parse_client_message` turns a raw
frame into one of them or raises `ProtocolError` carrying the error code to send back.
Unknown fields are ignored, as the protocol promises.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1

ErrorCode = Literal[
    "invalid_json",
    "invalid_message",
    "unknown_type",
    "too_large",
    "rate_limited",
    "no_peer",
    "peer_failed",
    "bad_sdp",
    "avatar_not_found",
    "voice_not_found",
    "asr_error",
    "llm_error",
    "tts_error",
    "busy",
    "unauthorized",
    "shutting_down",
    "internal",
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- client -> server -------------------------------------------------------------------


class IceCandidateInit(_Message):
    """The browser's RTCIceCandidateInit."""

    candidate: str
    sdpMid: str | None = None
    sdpMLineIndex: int | None = None


class WebRTCOffer(_Message):
    type: Literal["webrtc_offer"]
    sdp: str
    id: str | None = None


class WebRTCIceCandidate(_Message):
    type: Literal["webrtc_ice_candidate"]
    # null signals the end of the browser's candidates.
    candidate: IceCandidateInit | None
    id: str | None = None


class Chat(_Message):
    type: Literal["chat"]
    text: Annotated[str, Field(min_length=1)]
    id: str | None = None


class Speak(_Message):
    type: Literal["speak"]
    text: Annotated[str, Field(min_length=1)]
    id: str | None = None
    queue: bool = False


class Interrupt(_Message):
    type: Literal["interrupt"]
    id: str | None = None


class SetAvatar(_Message):
    type: Literal["set_avatar"]
    avatar_id: Annotated[str, Field(min_length=1)]
    id: str | None = None


class SetVoice(_Message):
    """Pick this session's TTS voice; null goes back to the server's default."""

    type: Literal["set_voice"]
    voice: Annotated[str, Field(min_length=1, max_length=100)] | None
    id: str | None = None


class Ping(_Message):
    type: Literal["ping"]
    t: Any = None
    id: str | None = None


ClientMessage = Annotated[
    WebRTCOffer | WebRTCIceCandidate | Chat | Speak | Interrupt | SetAvatar | SetVoice | Ping,
    Field(discriminator="type"),
]
CLIENT_TYPES = frozenset(
    {
        "webrtc_offer",
        "webrtc_ice_candidate",
        "chat",
        "speak",
        "interrupt",
        "set_avatar",
        "set_voice",
        "ping",
    }
)
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


# --- server -> client -------------------------------------------------------------------


class AvatarInfo(_Message):
    id: str
    name: str


class IceServerInfo(_Message):
    urls: list[str]
    username: str | None = None
    credential: str | None = None


class BackendReadiness(_Message):
    """One backend: `loading` (e.g. the embedded LLM, for `eta_s` more seconds), `ready`, or
    `unavailable` (its server cannot be reached; `message` says why)."""

    backend: str
    state: Literal["ready", "loading", "unavailable"]
    message: str | None = None
    eta_s: float | None = None


class ReadinessInfo(_Message):
    """Whether a `chat` can be answered now: `ready` is true when the LLM and TTS both are."""

    ready: bool
    llm: BackendReadiness
    tts: BackendReadiness


class SessionInfo(_Message):
    type: Literal["session"] = "session"
    session_id: str
    avatar_id: str
    avatars: list[AvatarInfo]
    ice_servers: list[IceServerInfo]
    protocol: int = PROTOCOL_VERSION
    server_version: str
    # Reconnect with ?session_id=…&resume_key=… within resume_grace_s to resume this session.
    resume_key: str
    resume_grace_s: float
    resumed: bool = False  # this greeting continues a session after a reconnect
    readiness: ReadinessInfo
    # The session's TTS voice; null = the server's default (`tts.voice`, or chosen by text).
    tts_voice: str | None = None
    voice: VoiceInputInfo
    # Served by `gpuserver cluster`: the Ray node and the replica holding this session.
    node_id: str | None = None
    replica: str | None = None


class VoiceInputInfo(_Message):
    """Whether the user can talk: the speech recogniser (null: voice input unavailable) and
    whether speaking over the avatar interrupts it."""

    asr: str | None
    barge_in: bool


class Readiness(ReadinessInfo):
    """Sent whenever the readiness in the greeting changes (not for the `eta_s` countdown)."""

    type: Literal["readiness"] = "readiness"


class WebRTCAnswer(_Message):
    type: Literal["webrtc_answer"] = "webrtc_answer"
    sdp: str
    ref: str | None = None  # the offer's `id`


class Error(_Message):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    ref: str | None = None


class Pong(_Message):
    type: Literal["pong"] = "pong"
    t: Any = None


class AvatarChanged(_Message):
    type: Literal["avatar"] = "avatar"
    avatar_id: str


class VoiceChanged(_Message):
    type: Literal["voice"] = "voice"
    voice: str | None


class UserSpeechStarted(_Message):
    """The user started talking, `t` seconds into their microphone stream."""

    type: Literal["user_speech_started"] = "user_speech_started"
    t: float


class UserSpeechStopped(_Message):
    type: Literal["user_speech_stopped"] = "user_speech_stopped"
    duration_ms: int


class UserTranscript(_Message):
    """What the user said; `final` once per utterance (then it runs as a `chat` turn)."""

    type: Literal["user_transcript"] = "user_transcript"
    text: str
    final: bool


class _TurnEvent(_Message):
    turn_id: str
    ref: str | None = None


class Queued(_TurnEvent):
    """The answer waits for the shared model: `ahead` answers go first; 0 when it starts."""

    type: Literal["queued"] = "queued"
    ahead: int


class LLMText(_TurnEvent):
    type: Literal["llm_text"] = "llm_text"
    delta: str


class Text(_TurnEvent):
    type: Literal["text"] = "text"
    content: str


class SpeechStarted(_TurnEvent):
    type: Literal["speech_started"] = "speech_started"


class SpeechStopped(_TurnEvent):
    type: Literal["speech_stopped"] = "speech_stopped"
    interrupted: bool


class Interrupted(_TurnEvent):
    type: Literal["interrupted"] = "interrupted"
    heard_text: str


class Metrics(_TurnEvent):
    type: Literal["metrics"] = "metrics"
    llm_first_token_ms: float | None = None
    llm_total_ms: float | None = None
    tts_first_audio_ms: float | None = None
    first_frame_ms: float | None = None
    spoken_ms: float | None = None
    interrupted: bool = False
    # Turns from the microphone: recognition time, and the end of the user's speech to
    # this turn's first frame (the conversational latency).
    asr_ms: float | None = None
    speech_end_to_first_frame_ms: float | None = None


ServerMessage = (
    SessionInfo
    | WebRTCAnswer
    | Error
    | Pong
    | AvatarChanged
    | VoiceChanged
    | Readiness
    | UserSpeechStarted
    | UserSpeechStopped
    | UserTranscript
    | Queued
    | LLMText
    | Text
    | SpeechStarted
    | SpeechStopped
    | Interrupted
    | Metrics
)


# --- parsing ----------------------------------------------------------------------------


class ProtocolError(Exception):
    """A client message was rejected; becomes an `error` message with this code and ref."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.ref = ref

    def to_message(self) -> Error:
        return Error(code=self.code, message=self.message, ref=self.ref)


def message_ref(raw: object) -> str | None:
    """The `ref` of an error about `raw`: its string `id` if any, else its string `type`."""
    if not isinstance(raw, dict):
        return None
    for key in ("id", "type"):
        value = raw.get(key)
        if isinstance(value, str):
            return value
    return None


MAX_DEPTH = 32  # nesting of objects/arrays in one message


def parse_client_message(text: str) -> ClientMessage:
    """Decode and validate one client frame, or raise ProtocolError."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"message is not valid JSON: {exc}") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits, deep nesting
        raise ProtocolError(
            "invalid_json", "message is not valid JSON: a number or nesting is too large"
        ) from None
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_message", "message must be a JSON object")
    if (problem := _unsendable(raw)) is not None:
        raise ProtocolError("invalid_message", problem)
    ref = message_ref(raw)
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_message", "message needs a string field 'type'", ref)
    if kind not in CLIENT_TYPES:
        known = ", ".join(sorted(CLIENT_TYPES))
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; known: {known}", ref)
    try:
        return _client_adapter.validate_python(raw)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", _describe(kind, exc), ref) from None


def _unsendable(raw: dict[str, Any]) -> str | None:
    """Why `raw` could not be echoed back as JSON (a `ref`, a `pong`), or None if it can."""
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "message contains text that is not valid Unicode (a lone surrogate)"
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                return f"message is nested deeper than {MAX_DEPTH} levels"
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return None


def _describe(kind: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        # The discriminator value leads every location; the field follows it.
        field = ".".join(str(part) for part in error["loc"][1:]) or "message"
        problems.append(f"field '{field}': {error['msg']}")
    return f"invalid {kind}: " + "; ".join(problems)


def encode(message: ServerMessage) -> str:
    return message.model_dump_json()
