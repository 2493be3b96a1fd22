"""Settings: defaults < TOML file (--config) < env GPUSERVER_* < CLI flags.

Nested keys use `__` in env vars: `GPUSERVER_LLM__BACKEND=openai` is `[llm] backend` in TOML
and `--llm openai` on the command line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # Origins allowed to open /ws and call the API; "*" allows any (embedding apps).
    allowed_origins: list[str] = ["*"]
    # When set, /ws needs ?token=... (or "Authorization: Bearer ...").
    token: SecretStr | None = None


class LimitsSettings(BaseModel):
    max_sessions: int = Field(16, ge=1)
    max_message_bytes: int = Field(64 * 1024, ge=1024)
    chat_per_minute: int = Field(30, ge=1)
    # A token bucket over every client message, against floods.
    messages_per_second: float = Field(50.0, gt=0)
    max_text_chars: int = Field(4000, ge=1)


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
    # openai: "pcm" is raw s16le mono at pcm_sample_rate (24 kHz for OpenAI and Kokoro).
    response_format: Literal["pcm", "wav"] = "pcm"
    pcm_sample_rate: int = Field(24_000, ge=8_000, le=192_000)


class EngineSettings(BaseModel):
    name: Literal["warp", "musetalk"] = "warp"
    device: str = "auto"
    batch_size: int = Field(16, ge=1)
    batch_wait_ms: float = Field(15.0, ge=0)
    models_dir: Path = Path("models")
    compile: bool = False


class AvatarSettings(BaseModel):
    default: str = "default"
    # User avatars (uploads, prepare-avatar) live here; the bundled default ships in the package.
    dir: Path = Path("avatars")
    cache_dir: Path = Path("cache")
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024)


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
    # (frame, audio) pairs buffered ahead of the media clock: 25 ticks = 1 s.
    queue_ticks: int = Field(25, ge=2)
    # Ticks a turn gathers before its first tick plays, so bursty producers don't stutter.
    prebuffer_ticks: int = Field(2, ge=0)
    # Longest wait for that prebuffer before playing what is there.
    prebuffer_timeout_ms: float = Field(200.0, ge=0)


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
    engine: EngineSettings = EngineSettings()
    avatars: AvatarSettings = AvatarSettings()
    webrtc: WebRTCSettings = WebRTCSettings()
    logging: LoggingSettings = LoggingSettings()

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
