"""The speaking pipeline: text -> TTS -> lip-sync frames -> the session's WebRTC streamer.

LLM and TTS backends live in `gpuserver.llm` and `gpuserver.tts` behind small interfaces;
this module picks them from settings and joins them to the avatar engine. Speech starts after
the first chunk (sentence) is synthesized, not after the whole text.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator

import numpy as np

from gpuserver.avatar_manager import AvatarManager
from gpuserver.config import Settings
from gpuserver.llm.base import LLMBackend
from gpuserver.media import TickAligner
from gpuserver.speech_timeline import SpeechTimeline
from gpuserver.text_chunker import split_text
from gpuserver.tts.base import TTSBackend
from gpuserver.webrtc_streamer import WebRTCStreamer

logger = logging.getLogger(__name__)


def create_llm(settings: Settings) -> LLMBackend:
    config = settings.llm
    if config.backend == "echo":
        from gpuserver.llm.echo import EchoLLM

        return EchoLLM()
    if config.backend == "local":
        from gpuserver.llm.local import LocalLLM

        llm = LocalLLM(
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            threads=config.local_threads,
        )
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
        )
    raise ValueError(f"LLM backend {config.backend!r} is not available in this build")


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
        )
    raise ValueError(f"TTS backend {config.backend!r} is not available in this build")


class AIModels:
    """LLM + TTS + avatar engine, shared by every session."""

    def __init__(
        self,
        llm: LLMBackend,
        tts: TTSBackend,
        avatars: AvatarManager,
        streamer: WebRTCStreamer,
    ) -> None:
        self.llm = llm
        self.tts = tts
        self.avatars = avatars
        self.streamer = streamer

    async def generate_video_stream(
        self,
        text: str | AsyncIterable[str],
        avatar_id: str,
        session_id: str,
        *,
        turn_id: str,
        timeline: SpeechTimeline | None = None,
        voice: str | None = None,
    ) -> None:
        """Speak `text` (a whole text, or chunks as an LLM streams them) into the session.

        Each chunk is synthesized, lip-synced and queued tick by tick on the session's
        streamer; the call returns when the last tick is queued (not played).
        """
        chunks = _iterate(split_text(text)) if isinstance(text, str) else text
        audio = self.synthesize_ticks(chunks, timeline or SpeechTimeline(), voice)
        async for frame, pcm in self.avatars.generate_av_stream(audio, avatar_id):
            await self.streamer.stream_frame(session_id, frame, pcm, turn_id)

    async def synthesize_ticks(
        self, chunks: AsyncIterable[str], timeline: SpeechTimeline, voice: str | None = None
    ) -> AsyncIterator[np.ndarray]:
        """Tick-aligned PCM of every chunk in turn, in `voice` (None: the configured one);
        records words in `timeline`."""
        position = 0
        async for chunk in chunks:
            if not chunk.strip():
                continue
            timeline.begin_segment(chunk, position)
            aligner = TickAligner()
            async for speech in self.tts.synthesize(chunk, voice):
                timeline.audio_started()
                for word in speech.words:
                    timeline.add_word(word.text, word.start)
                if len(ticks := aligner.push(speech.pcm)):
                    position += len(ticks)
                    yield ticks
            # Pad each chunk to whole ticks: its tail must not wait for the next sentence.
            if len(tail := aligner.flush()):
                position += len(tail)
                yield tail


async def _iterate(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item
