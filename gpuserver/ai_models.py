"""The AI backends: LLM and TTS picked from settings, and the seed's `generate_video_stream`.

LLM and TTS backends live in `gpuserver.llm` and `gpuserver.tts` behind small interfaces;
one turn's speech is a `SpeechPipeline` (gpuserver/speech_pipeline.py).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from gpuserver.asr import ASRBackend, create_asr
from gpuserver.avatar_manager import AvatarManager
from gpuserver.config import Settings
from gpuserver.llm.base import LLMBackend
from gpuserver.speech_pipeline import SpeechPipeline
from gpuserver.speech_timeline import SpeechTimeline
from gpuserver.text_chunker import split_text
from gpuserver.tts.base import TTSBackend
from gpuserver.voice.endpointing import EndpointConfig
from gpuserver.voice.vad import SileroVAD
from gpuserver.webrtc_streamer import WebRTCStreamer

logger = logging.getLogger(__name__)


def create_llm(settings: Settings) -> LLMBackend:
    config = settings.llm
    if config.backend == "echo":
        from gpuserver.llm.echo import EchoLLM

        return EchoLLM()
    if config.backend == "local":
        from gpuserver.llm.local import LocalLLM

        llm = LocalLLM.from_settings(config)
        llm.start_loading()  # ~20 s in the background, so the first chat need not wait
        return llm
    if config.backend == "openai":
        from gpuserver.llm.openai import OpenAILLM

        return OpenAILLM(
            config.base_url,
            config.model,
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            timeout_s=config.timeout_s,
            total_timeout_s=config.total_timeout_s,
        )
    raise ValueError(f"LLM backend {config.backend!r} is not available in this build")


@dataclass(frozen=True, eq=False)
class Listening:
    """Voice input's shared parts: the recogniser, the one VAD model and the endpoint rules."""

    asr: ASRBackend
    vad: SileroVAD
    endpoints: EndpointConfig

    async def aclose(self) -> None:
        await self.asr.aclose()
        self.vad.close()


def create_listening(settings: Settings) -> Listening | None:
    """Voice input as configured, or None when `asr.backend` is none."""
    asr = create_asr(settings.asr)
    if asr is None:
        return None
    return Listening(asr, SileroVAD(), EndpointConfig.from_settings(settings.asr))


def create_tts(settings: Settings) -> TTSBackend:
    config = settings.tts
    if config.backend == "espeak":
        from gpuserver.tts.espeak import EspeakTTS

        return EspeakTTS(voice=config.voice, speed=config.speed)
    if config.backend == "openai":
        from gpuserver.tts.openai import OpenAITTS

        return OpenAITTS(
            config.base_url,
            config.model,
            voice=config.voice,
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            speed=config.speed,
            response_format=config.response_format,
            pcm_sample_rate=config.pcm_sample_rate,
            timeout_s=config.timeout_s,
            total_timeout_s=config.total_timeout_s,
        )
    raise ValueError(f"TTS backend {config.backend!r} is not available in this build")


class AIModels:
    """The LLM, TTS and (when configured) speech recognition shared by every session, and
    the seed's speaking entry point."""

    def __init__(
        self,
        llm: LLMBackend,
        tts: TTSBackend,
        avatars: AvatarManager,
        streamer: WebRTCStreamer,
        listening: Listening | None = None,
    ) -> None:
        self.llm = llm
        self.tts = tts
        self.avatars = avatars
        self.streamer = streamer
        self.listening = listening

    async def aclose(self) -> None:
        await self.llm.aclose()
        await self.tts.aclose()
        if self.listening is not None:
            await self.listening.aclose()

    async def generate_video_stream(
        self,
        text: str | AsyncIterable[str],
        avatar_id: str,
        session_id: str,
        voice: str | None = None,
    ) -> str:
        """Speak `text` (a whole text, or chunks as an LLM streams them) with avatar
        `avatar_id`, in `voice` (None: the configured one), into session `session_id`'s
        stream; return the turn id.

        The seed's id-based entry point for apps that drive speech themselves: it resolves
        the ids once and runs a `SpeechPipeline`. It returns when the last tick is queued
        (not played); the session's `interrupt` cuts it like any turn.
        """
        avatar = await self.avatars.prepared(avatar_id)
        media = self.streamer.get(session_id)
        turn_id = uuid.uuid4().hex[:12]
        chunks = _iterate(split_text(text)) if isinstance(text, str) else text
        pipeline = SpeechPipeline(
            self.tts, self.avatars.engine, avatar, media.clock, turn_id, SpeechTimeline(), voice
        )
        await pipeline.speak(chunks)
        return turn_id


async def _iterate(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item
