"""Speech recognition backends by kind (`asr.backend`): openai, whisper, or none."""

from __future__ import annotations

from gpuserver.asr.base import ASRBackend, ASRError
from gpuserver.config import ASRSettings

__all__ = ["ASRBackend", "ASRError", "create_asr"]


def create_asr(config: ASRSettings) -> ASRBackend | None:
    """The configured backend, or None for `none` (voice input unavailable).

    Raises ASRError when the backend cannot work (e.g. the whisper folder is incomplete).
    """
    if config.backend == "none":
        return None
    if config.backend == "openai":
        from gpuserver.asr.openai import OpenAIASR

        return OpenAIASR(
            config.base_url,
            config.model,
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            language=config.language,
            timeout_s=config.timeout_s,
        )
    if config.backend == "whisper":
        from gpuserver.asr.whisper import WhisperASR

        return WhisperASR(config.model_dir, device=config.device, language=config.language)
    raise ValueError(f"ASR backend {config.backend!r} is not available in this build")
