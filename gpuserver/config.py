"""Settings: defaults < TOML file (--config) < env GPUSERVER_* < CLI flags.

Nested keys use `__` in env vars: `GPUSERVER_LLM__BACKEND=openai` is `[llm] backend` in TOML
and `--llm openai` on the command line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# A list setting that an env var may also give as "a, b" (or as a JSON list).
StringList = Annotated[list[str], NoDecode]


def _split_list(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # Origins (besides the page's own) allowed to open /ws and upload; "*" allows any.
    # Empty: same-origin pages and non-browser clients only, so no other web page can
    # drive the server through its visitors' browsers.
    allowed_origins: StringList = []
    # When set, /ws and uploads need "Authorization: Bearer ..." (or ?token=... from
    # browsers, whose WebSocket cannot set headers). An empty value is refused.
    token: SecretStr | None = None
    # Operator routes (/metrics, /api/sessions): this Bearer token, or a loopback peer.
    operator_token: SecretStr | None = None
    # Reverse proxies whose X-Forwarded-For is believed; without any, a request carrying
    # forwarding headers never counts as loopback.
    trusted_proxies: StringList = []
    # On SIGTERM/SIGINT: the longest wait for sessions to close before the process exits.
    drain_timeout_s: float = Field(10.0, gt=0)

    @field_validator("allowed_origins", "trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("token", "operator_token")
    @classmethod
    def _no_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("an empty token would turn auth off: set a real one or unset it")
        return value

    # How often the `openai` LLM/TTS servers are asked whether they are up (GET /models)
    # after the check at start; 0 checks at start only.
    health_check_interval_s: float = Field(30.0, ge=0)


class LimitsSettings(BaseModel):
    max_sessions: int = Field(16, ge=1)
    # Sessions one client address may hold at a time (behind a proxy: see trusted_proxies).
    max_sessions_per_address: int = Field(8, ge=1)
    max_message_bytes: int = Field(64 * 1024, ge=1024)
    chat_per_minute: int = Field(30, ge=1)
    # A token bucket over every frame a client sends, valid or not, before it is even parsed.
    messages_per_second: float = Field(50.0, gt=0)
    # Rejected messages (bad JSON, unknown types, floods...) allowed per 10 s; one more
    # closes the socket (1008).
    invalid_messages_per_10s: int = Field(20, ge=1)
    max_text_chars: int = Field(4000, ge=1)
    # A socket that sends nothing for this long is closed; clients ping to stay
    # (AvatarWebRTCClient pings every 15 s).
    idle_timeout_s: float = Field(60.0, gt=0)
    # Bytes of messages a client may leave unread before it is dropped (close 1008).
    max_unread_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    # A session whose socket dropped waits this long for its client to reconnect and resume
    # it (history, avatar, the peer connection if still alive); 0 ends sessions at once.
    resume_grace_s: float = Field(30.0, ge=0)


class LLMSettings(BaseModel):
    backend: Literal["local", "openai", "echo"] = "local"
    base_url: str = "http://127.0.0.1:11434/v1"
    model: str = ""
    api_key: SecretStr | None = None
    system_prompt: str = (
        "You are a friendly digital human. Answer briefly, in plain spoken sentences, "
        "without lists, markdown or emoji."
    )
    temperature: float = Field(0.7, ge=0, le=2)
    # An answer is spoken: ~160 tokens is already a minute of speech.
    max_tokens: int = Field(160, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    # Total seconds one answer may spend waiting for the server (keep-alives do not count
    # as progress); time the speech pipeline holds the answer back is not counted.
    total_timeout_s: float = Field(120.0, gt=0)
    # Speak each sentence as soon as it is generated; false waits for the whole answer
    # first, as non-streaming avatar pipelines do (the latency benchmark's baseline).
    stream_to_speech: bool = True
    history_turns: int = Field(20, ge=0)
    history_chars: int = Field(8000, ge=0)
    # local: torch threads (process-wide); 1 was fastest for SmolLM2-135M on 2 cores and
    # leaves the other core to video encoding.
    local_threads: int = Field(1, ge=1)
    # local: the model runs in a worker process at this OS priority offset (nice), so media
    # encoding always comes first.
    local_niceness: int = Field(10, ge=0, le=19)
    # local: one worker answers everyone in turns, so each answer is bounded: it ends after
    # this many sentences (0: no cap; a spoken answer worth hearing is short) or this many
    # seconds of generation, whichever comes first (besides max_tokens).
    local_max_sentences: int = Field(2, ge=0)
    local_max_seconds: float = Field(20.0, gt=0)
    # local: a transformers model folder, preferred over the bundled SmolLM2 when it holds
    # one (on CUDA in float16 when available); `gpuserver download-models llm` fills it
    # with local_model_repo from the Hugging Face Hub.
    local_model_dir: Path = Path("models/llm")
    local_model_repo: str = "Qwen/Qwen2.5-0.5B-Instruct"


class TTSSettings(BaseModel):
    backend: Literal["espeak", "openai"] = "espeak"
    # espeak: None picks by language (en-us, or cmn for Chinese text); openai: voice name.
    voice: str | None = None
    speed: float = Field(1.0, gt=0.2, le=4.0)
    base_url: str = "http://127.0.0.1:8880/v1"
    model: str = "tts-1"
    api_key: SecretStr | None = None
    timeout_s: float = Field(30.0, gt=0)
    # Total seconds one synthesis may spend waiting for the server.
    total_timeout_s: float = Field(60.0, gt=0)
    # openai: "pcm" is raw s16le mono at pcm_sample_rate (24 kHz for OpenAI and Kokoro).
    response_format: Literal["pcm", "wav"] = "pcm"
    pcm_sample_rate: int = Field(24_000, ge=8_000, le=192_000)


class ASRSettings(BaseModel):
    """Voice input: speech recognition, voice activity detection and endpointing."""

    # none: voice input unavailable; openai: an OpenAI-compatible /audio/transcriptions server
    # (speaches/faster-whisper, whisper.cpp, vLLM, OpenAI); whisper: transformers in-process.
    backend: Literal["openai", "whisper", "none"] = "none"
    # openai: a local faster-whisper server, e.g. speaches published on 8001 (gpuserver has 8000).
    base_url: str = "http://127.0.0.1:8001/v1"
    # openai: "whisper-1" for OpenAI; local servers want their own id, e.g.
    # "Systran/faster-whisper-small" for speaches.
    model: str = "whisper-1"
    api_key: SecretStr | None = None
    # ISO-639-1 code ("en", "zh"); None lets the recogniser detect the language.
    language: str | None = None
    timeout_s: float = Field(30.0, gt=0)
    # whisper: a transformers Whisper folder; models/whisper is the whisper-tiny MuseTalk uses
    # (`gpuserver download-models asr` adds its tokenizer, and a larger model for GPUs).
    model_dir: Path = Path("models/whisper")
    # whisper: "auto" is CUDA (fp16) when available, else CPU.
    device: str = "auto"
    # Voice this long starts an utterance (shorter blips are ignored).
    min_speech_ms: int = Field(200, ge=32)
    # Silence this long ends it.
    end_silence_ms: int = Field(500, ge=32)
    # Longer speech is cut into utterances of at most this (whisper hears 30 s at a time).
    max_utterance_s: float = Field(30.0, ge=1, le=30)
    # Audio sent to the recogniser before the detected onset and after the last voice, so no
    # syllable is clipped (silero's onset and tail already add ~30-60 ms of their own).
    speech_pad_ms: int = Field(64, ge=0, le=1000)
    # silero-vad speech probability that counts as voice (per 32 ms window).
    vad_threshold: float = Field(0.5, ge=0.2, lt=1)
    # While the avatar speaks, its echo must not count as the user: voice then needs this
    # probability and a level `echo_margin_db` above the recent noise floor.
    echo_threshold: float = Field(0.8, ge=0.2, lt=1)
    echo_margin_db: float = Field(20.0, ge=0)
    # The user's speech onset interrupts the avatar (like an `interrupt` message).
    barge_in: bool = True
    # While the avatar speaks, this much voice (past the echo guard) already cuts it —
    # before an utterance starts (min_speech_ms) — so talking over it stops it at once.
    barge_in_ms: int = Field(96, ge=32)
    # After this much silence inside an utterance, its transcription starts ahead of the end
    # (end_silence_ms), and is kept if the user does not go on: recognition time leaves the
    # critical path. 0 turns it off (one recognition per utterance, never wasted).
    early_transcribe_ms: int = Field(250, ge=0)


class EngineSettings(BaseModel):
    # warp (CPU), musetalk (GPU), clapper (diagnostic: a white frame on every loud tick,
    # to check lip-sync end to end)
    name: Literal["warp", "musetalk", "clapper"] = "warp"
    device: str = "auto"
    batch_size: int = Field(16, ge=1)
    batch_wait_ms: float = Field(15.0, ge=0)
    models_dir: Path = Path("models")
    compile: bool = False
    # Threads drawing frames (warp) or pasting faces back (musetalk), shared by all sessions.
    render_threads: int = Field(2, ge=1)
    # MuseTalk keeps avatar frames up to this longer side (1920: 1080p stays sharp).
    source_max_side: int = Field(1920, ge=256)


class AvatarSettings(BaseModel):
    default: str = "default"
    # User avatars (uploads, prepare-avatar) live here; the bundled default ships in the package.
    dir: Path = Path("avatars")
    cache_dir: Path = Path("cache")
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    # Images are refused above this many pixels before they are decoded (bombs).
    max_image_pixels: int = Field(40_000_000, ge=64 * 64, le=100_000_000)
    max_name_chars: int = Field(64, ge=1, le=256)
    # Prepared avatars kept in memory (least recently used go first; the default stays).
    memory_cache_mb: int = Field(1024, ge=1)


class IceServer(BaseModel):
    urls: list[str]
    username: str | None = None
    credential: str | None = None

    @field_validator("urls", mode="before")
    @classmethod
    def _urls_always_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class WebRTCSettings(BaseModel):
    ice_servers: list[IceServer] = []
    # TURN REST API (coturn use-auth-secret): per-session credentials for these URLs.
    turn_urls: list[str] = []
    turn_secret: SecretStr | None = None
    turn_ttl_s: int = Field(86400, ge=60)
    video_codec: Literal["vp8", "h264"] = "vp8"
    # Starting video bitrate; the receiver's congestion control moves it within the codec's
    # range (VP8 0.25-1.5 Mbit/s, H.264 0.5-3 Mbit/s). aiortc starts VP8 at 0.5, too blurry.
    video_bitrate_kbps: int = Field(1000, ge=250, le=3000)
    # The only addresses used for host candidates; empty = every interface.
    host_addresses: list[str] = []
    # A peer connection not connected this long after its offer is closed (error peer_failed).
    connect_timeout_s: float = Field(20.0, gt=0)
    # Trickled candidates one peer connection takes (each makes the server probe an address).
    max_remote_candidates: int = Field(20, ge=1)
    # (frame, audio) pairs buffered ahead of the media clock: 25 ticks = 1 s.
    queue_ticks: int = Field(25, ge=2)
    # Ticks a turn gathers before its first tick plays, so bursty producers don't stutter.
    prebuffer_ticks: int = Field(2, ge=0)
    # Longest wait for that prebuffer before playing what is there.
    prebuffer_timeout_ms: float = Field(200.0, ge=0)


class ClusterSettings(BaseModel):
    """`gpuserver cluster`: the app on Ray Serve, one replica per GPU (gpuserver.cluster)."""

    # An existing Ray cluster ("ray://HEAD:10001", or "auto" on a cluster node); None starts
    # a throwaway local cluster of `local_nodes` nodes with pretend GPUs on 127.0.0.1.
    address: str | None = None
    local_nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1)
    # Replicas (one GPU each); None = one per GPU the cluster has when it starts.
    replicas: int | None = Field(None, ge=1)
    # Set to autoscale between `replicas` and this many with the sessions' load (Ray's
    # autoscaler adds GPU boxes when replicas cannot be placed).
    max_replicas: int | None = Field(None, ge=1)
    # Ray's default (20 s) cuts sessions mid-turn when a replica is stopped; a replica that
    # is being stopped tells its sessions `shutting_down`, lets their turns finish and closes
    # them, and is only killed after this long.
    graceful_shutdown_timeout_s: float = Field(300.0, gt=0)
    # How often a replica asks Serve whether it is being stopped.
    drain_poll_s: float = Field(1.0, gt=0)
    # Connections Serve's proxy holds unassigned: a burst being routed, or every replica's
    # spare slots taken. Beyond it Serve refuses the handshake (HTTP 5xx), not `busy`.
    max_queued_requests: int = Field(100, ge=1)
    # "HeadOnly": one address (the head). "EveryNode": a proxy per node, behind your balancer.
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"


class LoggingSettings(BaseModel):
    level: str = "INFO"
    dir: Path = Path("logs")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GPUSERVER_", env_nested_delimiter="__", extra="ignore"
    )

    server: ServerSettings = ServerSettings()
    limits: LimitsSettings = LimitsSettings()
    llm: LLMSettings = LLMSettings()
    tts: TTSSettings = TTSSettings()
    asr: ASRSettings = ASRSettings()
    engine: EngineSettings = EngineSettings()
    avatars: AvatarSettings = AvatarSettings()
    webrtc: WebRTCSettings = WebRTCSettings()
    logging: LoggingSettings = LoggingSettings()
    cluster: ClusterSettings = ClusterSettings()

    def ice_servers_for(self, session_id: str) -> list[IceServer]:
        """The configured ICE servers plus, with a TURN secret, fresh TURN REST credentials."""
        servers = list(self.webrtc.ice_servers)
        if self.webrtc.turn_urls and self.webrtc.turn_secret is not None:
            username, credential = turn_rest_credentials(
                self.webrtc.turn_secret.get_secret_value(), session_id, self.webrtc.turn_ttl_s
            )
            servers.append(
                IceServer(urls=self.webrtc.turn_urls, username=username, credential=credential)
            )
        return servers


def turn_rest_credentials(
    secret: str, user: str, ttl_s: int, now: float | None = None
) -> tuple[str, str]:
    """coturn's `use-auth-secret` scheme: username "expiry:user", HMAC-SHA1 credential."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < `config_file` (TOML) < env GPUSERVER_* < `overrides` (CLI)."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if config_file is not None:
                sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
            return sources

    return Settings.model_construct(**dict(_Layered(**overrides)))
